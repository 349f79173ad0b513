"""Reliability probe: try every bad input netfold should refuse or handle, and classify the outcome.

Run (about 2-4 minutes on 2 cores, tiny models only):

    PYTHONPATH=$PWD/src OMP_NUM_THREADS=1 python benchmarks/reliability.py

Writes ``docs/reliability.md`` (the table) and ``benchmarks/results/reliability.json``, both
atomically (temporary file, then ``os.replace``). ``--only PATTERN`` runs a subset (fnmatch on
case names) and then writes nothing unless ``--json`` / ``--md`` are given; ``--list`` lists
the cases.

Every case is a name, a category, what it tries, the outcomes it accepts, and a function that
runs it. The outcome is decided by checks on what happened, never typed in:

- "clear error": an exception of type ValueError / TypeError / FileNotFoundError (or, on the
  CLI, exit code 2 with no traceback and one ``error:`` line) whose message is one line and
  names what was wrong (each case lists the words that count as naming it), with the model
  (every tensor's bytes, every plain module attribute, the HF config) and the case's folder
  (every file's bytes, no leftovers) unchanged;
- "handled": no error and the result checked correct (planted duplicate channels fold exactly
  in float64, a saved model reloads with the same weights/outputs, no code ran);
- "silent wrong result": no error but a wrong result (inexact on planted duplicates, a bad
  input accepted and ignored, corrupted weights loaded);
- "corrupted model": an exception, and the model changed;
- "corrupted save": the case's folder is neither the old state nor the new complete save
  (partial or stale output, a folder that does not load, leftovers after a failed save);
- "code executed": a marker file that a payload in a loaded file would create exists;
- "raw error": any other exception type, a multi-line message, a message that does not name
  the bad input, a timeout, or a CLI run with a traceback / exit code other than 2;
- "harness error": this script itself failed (must be zero).

The kill -9 save test uses ``benchmarks/save_crash.py`` (``run(n, seed) -> dict``) when it
exists, else its own loop: a worker process forks a child per save, kills it with SIGKILL at a
random point of the save, and loads the folder, which must hold the old or the new model.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import fnmatch
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import netfold  # noqa: E402
from netfold import FoldConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "reliability.json"
DEFAULT_MD = ROOT / "docs" / "reliability.md"

CLEAR = "clear error"
HANDLED = "handled"
SILENT = "silent wrong result"
CORRUPT_MODEL = "corrupted model"
CORRUPT_SAVE = "corrupted save"
CODE = "code executed"
RAW = "raw error"
HARNESS = "harness error"
OUTCOMES = (CLEAR, HANDLED, SILENT, CORRUPT_MODEL, CORRUPT_SAVE, CODE, RAW, HARNESS)
FAILURES = (SILENT, CORRUPT_MODEL, CORRUPT_SAVE, CODE, RAW, HARNESS)
CLEAR_TYPES = (ValueError, TypeError, FileNotFoundError)
F64 = torch.float64
EXACT_TOL = 1e-9  # relative to the output's scale; float64 merges of duplicates reach ~1e-15
LLM_EXACT_TOL = 1e-9
CLI_TIMEOUT = 180
CASE_TIMEOUT = 120
PAYLOAD_WAIT = 1.0


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case that ran past its time limit."""


# ------------------------------------------------------------------------------ fingerprints
def _digest(t: torch.Tensor) -> tuple:
    """Shape, dtype, device and a hash of the bytes (NaN-safe, unlike torch.equal)."""
    t = t.detach()
    if t.device.type == "meta":
        return ("meta", tuple(t.shape), str(t.dtype))
    b = t.cpu().contiguous().reshape(-1)
    if b.dtype == torch.bool:
        b = b.to(torch.uint8)
    raw = b.view(torch.uint8).numpy().tobytes() if b.numel() else b""
    return (tuple(t.shape), str(t.dtype), str(t.device), hashlib.sha256(raw).hexdigest())


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, (tuple, list)) and all(_plain(x) for x in v)


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Everything a failed call must leave as it was: tensors, plain attributes, HF config."""
    fp: dict[str, Any] = {}
    for name, m in model.named_modules():
        attrs = {
            k: repr(v)
            for k, v in vars(m).items()
            if _plain(v) and (not k.startswith("_") or k.startswith("_netfold"))
        }
        attrs["__type__"] = type(m).__name__
        attrs["__slots__"] = repr(sorted(m._parameters)) + repr(sorted(m._buffers))
        for k in ("_netfold_arch", "_netfold_edits"):
            if k in vars(m):
                attrs[k] = json.dumps(vars(m)[k], sort_keys=True, default=str)
        fp[f"module:{name}"] = attrs
        for tname, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None:
                fp[f"tensor:{name}.{tname}"] = _digest(t)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        fp["config"] = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    return fp


def diff_keys(a: dict, b: dict, limit: int = 3) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k)][:limit]


def tree_fingerprint(root: Path) -> dict[str, str]:
    """{relative path: sha256 or "<dir>"} of everything under ``root`` (hidden files too)."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel, d))] = "<dir>"
        for f in filenames:
            p = Path(dirpath) / f
            key = os.path.normpath(os.path.join(rel, f))
            try:
                out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
            except OSError as e:
                out[key] = f"<unreadable {e.errno}>"
    return out


# ------------------------------------------------------------------------------ attempts
@dataclass
class Ctx:
    """Per-case working state: a fresh folder, a marker folder, the seed."""

    dir: Path
    markers: Path
    seed: int
    src: Path

    def marker(self, name: str = "pwned") -> Path:
        return self.markers / name


@dataclass
class Attempt:
    value: Any = None
    exc: BaseException | None = None
    model_diff: list[str] = field(default_factory=list)
    files_diff: list[str] = field(default_factory=list)


def attempt(
    ctx: Ctx, call: Callable[[], Any], model: nn.Module | None = None, files: bool = True
) -> Attempt:
    """Run ``call`` (product code); record its value or exception and what it changed."""
    fm = model_fingerprint(model) if model is not None else None
    ft = tree_fingerprint(ctx.dir) if files else None
    a = Attempt()
    try:
        a.value = call()
    except CaseTimeout:
        raise
    except Exception as e:  # product errors of every kind are what this script classifies
        a.exc = e
    if fm is not None:
        a.model_diff = diff_keys(fm, model_fingerprint(model))
    if ft is not None:
        a.files_diff = diff_keys(ft, tree_fingerprint(ctx.dir))
    return a


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:220]


def error_outcome(a: Attempt, names: Iterable[str] = ()) -> tuple[str, str]:
    """Classify an attempt that raised (see the module docstring)."""
    e = a.exc
    assert e is not None
    desc = _first_line(e)
    if a.model_diff:
        return CORRUPT_MODEL, f"{desc}; the model changed ({', '.join(a.model_diff)})"
    if a.files_diff:
        return CORRUPT_SAVE, f"{desc}; the folder changed ({', '.join(a.files_diff)})"
    if not isinstance(e, CLEAR_TYPES):
        return RAW, desc
    msg = str(e).strip()
    if not msg or "\n" in msg:
        return RAW, f"{desc} [message has {len(msg.splitlines())} lines]"
    names = tuple(names)
    if names and not any(n.lower() in msg.lower() for n in names):
        return RAW, f"{desc} [does not name {names[0]!r}]"
    return CLEAR, desc


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().to(F64), ref.detach().to(F64)
    if out.shape != ref.shape:
        return math.inf
    if not bool(torch.isfinite(out).all()):
        return math.inf
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1.0))


# ------------------------------------------------------------------------------ registry
@dataclass
class Case:
    name: str
    category: str
    tried: str
    fn: Callable[[Ctx], tuple[str, str]]
    expected: tuple[str, ...] = (CLEAR,)
    timeout: int = CASE_TIMEOUT
    payload: bool = False  # plants a marker payload: wait for background processes to land


CASES: list[Case] = []


def case(
    category: str,
    tried: str,
    expected: tuple[str, ...] = (CLEAR,),
    timeout: int = 0,
    payload: bool = False,
):
    def deco(fn):
        CASES.append(
            Case(fn.__name__, category, tried, fn, expected, timeout or CASE_TIMEOUT, payload)
        )
        return fn

    return deco


# ------------------------------------------------------------------------------ models
def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_mlp(seed: int = 0, dtype: torch.dtype = F64) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5)
    )
    return model.to(dtype).eval(), torch.randn(16, 20, generator=seeded(seed + 1), dtype=dtype)


SAVED_MLP_KW = {"in_channels": 1, "num_classes": 3, "image_size": 8, "hidden": [32, 16]}


def saved_mlp(seed: int = 0) -> nn.Module:
    """A netfold:mlp (registered architecture), so netfold.save / load can rebuild it."""
    from netfold.models import build_model

    torch.manual_seed(seed)
    return build_model("mlp", **SAVED_MLP_KW).eval()


def save_mlp(model: nn.Module, d: Path) -> None:
    netfold.save(model, d, arch="netfold:mlp", kwargs=dict(SAVED_MLP_KW))


def tiny_llama(
    seed: int = 0,
    hidden: int = 32,
    heads: int = 4,
    kv: int = 2,
    inter: int = 48,
    layers: int = 2,
    vocab: int = 64,
) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hidden // heads,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random init has tiny weights; make the heads matter
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                lin.weight.mul_(8.0)
    return model


def llama_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def state_equal(a: nn.Module, b: nn.Module) -> tuple[bool, str]:
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in sa.items():
        if k not in sb:
            return False, f"missing {k}"
        w = sb[k]
        if w.shape != v.shape or w.dtype != v.dtype or _digest(w)[-1] != _digest(v)[-1]:
            return False, f"{k} differs"
    return True, ""


# ------------------------------------------------------------------------------ planting
def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def _block_size(model: nn.Module, g) -> int:
    """Size of the blocks duplicates must stay inside (conv groups touching the space)."""
    align = int(getattr(g, "align", 1) or 1)
    for name in list(g.producers) + list(g.channel_ops):
        m = _get(model, name)
        if isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups < m.out_channels:
            align = max(align, m.groups)
    for c in g.consumers:
        m = _get(model, c.module)
        if isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups < m.in_channels:
            align = max(align, int(getattr(c, "groups", m.groups)))
    return g.size // align if g.size % align == 0 else g.size


def plant_duplicates(model: nn.Module, groups: list) -> dict[str, tuple[int, int]]:
    """In every foldable group, make each odd channel of a block a copy of the one before it.

    Producer rows and per-channel parameters (channel_ops) are copied so the activations are
    duplicates; consumer columns are copied too so the clustering features of a duplicate pair
    are identical (folding then merges exactly: mean of equal rows, sum of the columns).

    Returns:
        {group name: (size, distinct channels)} for the groups planted.
    """
    planted: dict[str, tuple[int, int]] = {}
    with torch.no_grad():
        for g in groups:
            if not g.foldable or g.size < 2 or getattr(g, "head_size", 1) != 1:
                continue
            b = _block_size(model, g)
            if b < 2:
                continue
            # adjacent pairs (0, 1), (2, 3), ...: a merged channel's index differs from its
            # members', so an op that reads channel indices (argmax, max(dim=1), topk) notices
            src = torch.tensor([i - (i % b) % 2 for i in range(g.size)])
            ok = True
            for name in list(g.producers) + list(g.channel_ops):
                m = _get(model, name)
                for t in list(m._parameters.values()) + list(m._buffers.values()):
                    if t is not None and t.dim() >= 1 and t.shape[0] == g.size:
                        t.copy_(t[src])
            for c in g.consumers:
                m = _get(model, c.module)
                w = m.weight
                rep = int(getattr(c, "repeat", 1))
                off = int(getattr(c, "offset", 0))
                cg = m.groups if isinstance(m, nn.modules.conv._ConvNd) else 1
                if cg == 1:
                    cols = w.shape[1]
                    if (off + g.size) * rep > cols:
                        ok = False
                        continue
                    v = w[:, off * rep : (off + g.size) * rep]
                    v = v.reshape(w.shape[0], g.size, rep, -1)
                    w[:, off * rep : (off + g.size) * rep] = v[:, src].reshape(
                        w[:, off * rep : (off + g.size) * rep].shape
                    )
                elif cg == m.in_channels and m.in_channels == m.out_channels:
                    continue  # depthwise as consumer: a channel op, rows handled above
                else:
                    in_per = m.in_channels // cg
                    out_per = m.out_channels // cg
                    for i in range(g.size):
                        j = int(src[i])
                        if j == i:
                            continue
                        ci, cj = off + i, off + j
                        gi, gj = ci // in_per, cj // in_per
                        if gi != gj:
                            ok = False
                            continue
                        rows = slice(gi * out_per, (gi + 1) * out_per)
                        w[rows, ci % in_per] = w[rows, cj % in_per]
            if ok:
                d = (g.size // b) * ((b + 1) // 2)
                planted[g.name] = (g.size, d)
    return planted


def fold_planted(
    ctx: Ctx,
    make: Callable[[], tuple[nn.Module, Any]],
    run: Callable[[nn.Module, Any], torch.Tensor],
    *,
    require_control: bool = False,
) -> tuple[str, str]:
    """Trace, plant duplicates in every foldable group, fold them away, compare in float64."""
    model, x = make()
    control, _ = make()
    a = attempt(ctx, lambda: netfold.find_groups(model, x), model)
    if a.exc is not None:
        return error_outcome(a, ("trace", "not supported", "cannot"))
    groups = a.value
    planted = plant_duplicates(model, groups)
    ref = run(model, x)
    frozen = [
        f"{g.name}: {g.frozen_reasons[0]}" for g in groups if g.frozen_reasons and g.producers
    ]
    if planted:
        ratios = {name: 1.0 - d / n for name, (n, d) in planted.items()}
        cfg = FoldConfig(ratio=0.0, ratios=ratios, repair="none", n_init=5)
    else:
        cfg = FoldConfig(ratio=0.5, repair="none", n_init=5)
    a = attempt(ctx, lambda: netfold.fold(model, cfg, example_inputs=x), model)
    if a.exc is not None:
        return error_outcome(a)
    rep = a.value
    try:
        out = run(model, x)
    except Exception as e:
        return SILENT, f"fold returned but the model no longer runs: {_first_line(e)}"
    err = rel_err(out, ref)
    folded = [g for g in rep.groups if g.width_after < g.width_before]
    info = (
        f"{len(folded)} group(s) folded, {len(frozen)} frozen"
        + (f" ({frozen[0][:90]})" if frozen else "")
        + f"; planted-duplicate error {err:.1e}"
    )
    if err > EXACT_TOL:
        return SILENT, f"planted duplicates not folded exactly: {info}"
    if folded:
        cref = run(control, x)
        try:
            netfold.fold(control, cfg, example_inputs=x)
            cerr = rel_err(run(control, x), cref)
        except Exception as e:  # the control only measures the check's power
            cerr = math.nan
            info += f"; control raised {_first_line(e)}"
        info += f"; control without duplicates {cerr:.1e}"
        if require_control and not cerr > 1e3 * EXACT_TOL:
            return HARNESS, f"negative control is exact too: the check cannot fail ({info})"
    elif not frozen and planted:
        return SILENT, f"nothing folded although groups were foldable: {info}"
    return HANDLED, info


# ------------------------------------------------------------------------------ configs
def _config_case(kwargs: dict[str, Any], names: tuple[str, ...]):
    def fn(ctx: Ctx) -> tuple[str, str]:
        model, x = tiny_mlp()
        a = attempt(ctx, lambda: netfold.fold(model, FoldConfig(**kwargs), example_inputs=x), model)
        if a.exc is not None:
            return error_outcome(a, names)
        widths = [(g.width_before, g.width_after) for g in a.value.groups]
        return SILENT, f"FoldConfig({kwargs}) accepted; folded widths {widths}"

    return fn


CONFIG_CASES = [
    ("ratio_negative", {"ratio": -0.1}, "FoldConfig(ratio=-0.1)", ("ratio",)),
    ("ratio_one", {"ratio": 1.0}, "FoldConfig(ratio=1.0)", ("ratio",)),
    ("ratio_above_one", {"ratio": 1.5}, "FoldConfig(ratio=1.5)", ("ratio",)),
    ("ratio_nan", {"ratio": float("nan")}, "FoldConfig(ratio=nan)", ("ratio",)),
    ("ratio_string", {"ratio": "0.5"}, "FoldConfig(ratio='0.5')", ("ratio",)),
    (
        "target_sparsity_negative",
        {"target_sparsity": -0.2},
        "FoldConfig(target_sparsity=-0.2)",
        ("target_sparsity",),
    ),
    (
        "target_sparsity_one",
        {"target_sparsity": 1.0},
        "FoldConfig(target_sparsity=1.0)",
        ("target_sparsity",),
    ),
    (
        "per_group_ratio_out_of_range",
        {"ratios": {"*": 1.5}},
        "FoldConfig(ratios={'*': 1.5})",
        ("ratio",),
    ),
    ("unknown_method", {"method": "kmeanz"}, "FoldConfig(method='kmeanz')", ("method",)),
    ("unknown_repair", {"repair": "magic"}, "FoldConfig(repair='magic')", ("repair",)),
    (
        "unknown_allocation",
        {"allocation": "greedy"},
        "FoldConfig(allocation='greedy')",
        ("allocation",),
    ),
    ("negative_round_to", {"round_to": -8}, "FoldConfig(round_to=-8)", ("round_to",)),
    (
        "negative_min_channels",
        {"min_channels": -1},
        "FoldConfig(min_channels=-1)",
        ("min_channels",),
    ),
    ("zero_n_init", {"n_init": 0}, "FoldConfig(n_init=0)", ("n_init",)),
    ("skip_as_string", {"skip": "0"}, "FoldConfig(skip='0') (a str, not a list)", ("skip",)),
]

for _name, _kw, _tried, _names in CONFIG_CASES:
    _fn = _config_case(_kw, _names)
    _fn.__name__ = _name
    case("config", _tried)(_fn)


@case("config", "FoldConfig(ratio=0.3, target_sparsity=0.2): two targets at once")
def ratio_with_target_sparsity(ctx: Ctx) -> tuple[str, str]:
    model, x = tiny_mlp()
    a = attempt(
        ctx,
        lambda: netfold.fold(model, FoldConfig(ratio=0.3, target_sparsity=0.2), example_inputs=x),
        model,
    )
    if a.exc is not None:
        return error_outcome(a, ("ratio", "target_sparsity"))
    widths = [g.width_after for g in a.value.groups]
    ref, _ = tiny_mlp()
    by_ratio = [
        g.width_after for g in netfold.fold(ref, FoldConfig(ratio=0.3), example_inputs=x).groups
    ]
    used = "ratio" if widths == by_ratio else "target_sparsity"
    return SILENT, f"accepted; {used} used, the other silently ignored (widths {widths})"


def _unmatched_pattern_case(kw: dict[str, Any], names: tuple[str, ...]):
    def fn(ctx: Ctx) -> tuple[str, str]:
        model, x = tiny_mlp()
        cfg = FoldConfig(ratio=0.5, **kw)
        a = attempt(ctx, lambda: netfold.fold(model, cfg, example_inputs=x), model)
        if a.exc is not None:
            return error_outcome(a, names)
        ref, _ = tiny_mlp()
        plain = netfold.fold(ref, FoldConfig(ratio=0.5), example_inputs=x)
        same = [g.width_after for g in a.value.groups] == [g.width_after for g in plain.groups]
        what = "had no effect" if same else "changed the widths"
        return SILENT, f"pattern matches no group, accepted; it {what}"

    return fn


for _name, _kw, _tried in (
    (
        "ratios_pattern_matches_nothing",
        {"ratios": {"no_such_layer*": 0.1}},
        "ratios={'no_such_layer*': 0.1}",
    ),
    ("skip_pattern_matches_nothing", {"skip": ("no_such_layer*",)}, "skip=('no_such_layer*',)"),
):
    _fn = _unmatched_pattern_case(_kw, ("no_such_layer",))
    _fn.__name__ = _name
    case("config", _tried)(_fn)


@case("config", "netfold.fold(model, {'ratio': 0.5}): a dict instead of a FoldConfig")
def wrong_config_type(ctx: Ctx) -> tuple[str, str]:
    model, x = tiny_mlp()
    a = attempt(ctx, lambda: netfold.fold(model, {"ratio": 0.5}, example_inputs=x), model)
    if a.exc is not None:
        return error_outcome(a, ("config",))
    return SILENT, "a dict was accepted as the config"


@case("config", "netfold.fold(<a string>, FoldConfig()): not a model")
def wrong_model_type(ctx: Ctx) -> tuple[str, str]:
    a = attempt(ctx, lambda: netfold.fold("resnet18", FoldConfig()))
    if a.exc is not None:
        return error_outcome(a, ("model",))
    return SILENT, "a string was accepted as the model"


# ------------------------------------------------------------------------------ models
def _nonfinite_case(value: float):
    def fn(ctx: Ctx) -> tuple[str, str]:
        model, x = tiny_mlp()
        with torch.no_grad():
            model[2].weight[3, 4] = value
        a = attempt(
            ctx, lambda: netfold.fold(model, FoldConfig(ratio=0.5), example_inputs=x), model
        )
        if a.exc is not None:
            return error_outcome(a, ("weight", "tensor", "parameter"))  # names the tensor
        return SILENT, f"a model with {value} weights was folded"

    return fn


for _name, _v in (("nan_weights", float("nan")), ("inf_weights", float("inf"))):
    _fn = _nonfinite_case(_v)
    _fn.__name__ = _name
    case("model", f"fold a model with one {_v} weight")(_fn)


@case("model", "fold a model whose parameters live on the meta device (not materialised)")
def meta_device_model(ctx: Ctx) -> tuple[str, str]:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    a = attempt(ctx, lambda: netfold.fold(model, FoldConfig(ratio=0.5)), model)
    if a.exc is not None:
        return error_outcome(a, ("meta", "materiali"))
    return SILENT, "a meta-device model was 'folded'"


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(20, 32), nn.Linear(32, 5)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = h * 2
        return self.fc2(h)


@case("model", "fold a model with data-dependent control flow (untraceable by torch.fx)")
def untraceable_model(ctx: Ctx) -> tuple[str, str]:
    torch.manual_seed(0)
    model = _Untraceable().double().eval()
    x = torch.randn(4, 20, dtype=F64)
    a = attempt(ctx, lambda: netfold.fold(model, FoldConfig(ratio=0.5), example_inputs=x), model)
    if a.exc is not None:
        return error_outcome(a, ("trace",))
    return SILENT, "an untraceable model was folded"


# Op-kind models: every one float64, input (N, C, H, W) or (N, T, F).
class _Seq(nn.Module):
    def __init__(self, rnn: type) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.rnn = rnn(16, 12, batch_first=True)
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        y = self.rnn(h)[0]
        return self.out(y[:, -1])


class _MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        y = self.attn(h, h, h)[0]
        return self.out(y.mean(1))


class _ConvNet(nn.Module):
    """conv1 (3 -> 8) -> op -> conv2 -> pool -> fc; ``op`` names the channel-axis operation."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1b = nn.Conv2d(3, 8, 3, padding=1)
        c2_in = {"chunk": 4, "split": 4, "topk": 8, "cat": 16}.get(op, 8)
        groups = 2 if op == "grouped_conv" else 1
        self.mid = nn.Conv2d(8, 8, 3, padding=1, groups=8 if op == "depthwise_conv" else groups)
        self.bn = nn.BatchNorm2d(8)
        self.se = None
        if op == "se_block":
            from torchvision.ops import SqueezeExcitation

            self.se = SqueezeExcitation(8, 4)
        self.conv2 = nn.Conv2d(c2_in, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        extra = None
        op = self.op
        if op == "chunk":
            a, b = h.chunk(2, dim=1)
            h = a * torch.sigmoid(b)
        elif op == "split":
            a, b = torch.split(h, 4, dim=1)
            h = a + b
        elif op == "topk":
            extra = h.topk(2, dim=1).values
        elif op == "max_dim1":
            v, i = torch.max(h, dim=1, keepdim=True)  # values and indices: which channel won
            extra = v + i.to(h.dtype)
        elif op == "sort":
            extra = h.sort(dim=1).values[:, 1:2]
        elif op == "argmax":
            extra = h.argmax(dim=1, keepdim=True).to(h.dtype)
        elif op == "cat":
            h = torch.cat([h, torch.relu(self.conv1b(x))], dim=1)
        elif op in ("grouped_conv", "depthwise_conv"):
            h = torch.relu(self.bn(self.mid(h)))
        elif op == "channel_shuffle":
            n, c, hh, ww = h.shape
            h = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)
        elif op == "se_block":
            h = self.se(h)
        y = torch.relu(self.conv2(h))
        out = self.fc(y.mean((2, 3)))
        if extra is not None:
            out = out + extra.mean((1, 2, 3)).unsqueeze(1)
        return out


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    g = seeded(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def _op_case(op: str, build: Callable[[], nn.Module], shape: tuple[int, ...]):
    def fn(ctx: Ctx) -> tuple[str, str]:
        def make():
            torch.manual_seed(ctx.seed)
            m = _randomise_bn(build(), ctx.seed).double().eval()
            return m, torch.randn(*shape, generator=seeded(ctx.seed + 1), dtype=F64)

        def run(m, x):
            with torch.no_grad():
                return m(x)

        return fold_planted(ctx, make, run)

    fn.__name__ = f"op_{op}"
    return fn


_SEQ_SHAPE = (4, 5, 8)
_IMG_SHAPE = (4, 3, 8, 8)
OP_CASES = [
    ("lstm", lambda: _Seq(nn.LSTM), _SEQ_SHAPE, "Linear -> nn.LSTM -> Linear"),
    ("gru", lambda: _Seq(nn.GRU), _SEQ_SHAPE, "Linear -> nn.GRU -> Linear"),
    ("multihead_attention", _MHA, _SEQ_SHAPE, "Linear -> nn.MultiheadAttention -> Linear"),
]
for _op, _what in (
    ("chunk", "Tensor.chunk(2, dim=1) over channels (GLU)"),
    ("split", "torch.split(h, 4, dim=1) over channels"),
    ("topk", "h.topk(2, dim=1) over channels"),
    ("max_dim1", "torch.max(h, dim=1) over channels (values and indices)"),
    ("sort", "h.sort(dim=1) over channels"),
    ("argmax", "h.argmax(dim=1) over channels"),
    ("cat", "torch.cat([a, b], dim=1) along channels"),
    ("grouped_conv", "a grouped conv (groups=2) between convs"),
    ("depthwise_conv", "a depthwise conv + BatchNorm between convs"),
    ("channel_shuffle", "a channel shuffle (view/transpose/reshape)"),
    ("se_block", "torchvision SqueezeExcitation block"),
):
    OP_CASES.append((_op, (lambda o=_op: _ConvNet(o)), _IMG_SHAPE, _what))

for _op, _build, _shape, _what in OP_CASES:
    case(
        "model",
        f"{_what}: planted duplicate channels in every foldable group, folded (float64)",
        expected=(HANDLED, CLEAR),
    )(_op_case(_op, _build, _shape))


@case(
    "model",
    "CIFAR ResNet18 (width 1/8, float64) with planted duplicate channels: must fold exactly",
    expected=(HANDLED,),
)
def planted_duplicates_resnet(ctx: Ctx) -> tuple[str, str]:
    from netfold.models import build_model

    def make():
        torch.manual_seed(1)
        m = build_model("resnet18_cifar", in_channels=3, num_classes=10, width=0.125)
        m = _randomise_bn(m, 1).double().eval()
        return m, torch.randn(4, 3, 32, 32, generator=seeded(2), dtype=F64)

    def run(m, x):
        with torch.no_grad():
            return m(x)

    return fold_planted(ctx, make, run, require_control=True)


def _bert(seed: int) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return transformers.BertModel(cfg).double().eval()


def _vit(seed: int) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(cfg).double().eval()


_Q = ("query", "key", "value", "q_proj", "k_proj", "v_proj")
_O = ("attention.output.dense", "o_proj")
_MLP_PAIRS = ((".intermediate.dense", ".output.dense"), (".mlp.fc1", ".mlp.fc2"))


def plant_encoder(model: nn.Module) -> tuple[int, int]:
    """Head 1 := head 0 (q/k/v rows, o columns) and MLP channels [n/2:] := [:n/2] per layer.

    Returns:
        (attention blocks planted, MLPs planted).
    """
    hd = model.config.hidden_size // model.config.num_attention_heads
    mods = dict(model.named_modules())
    n_attn = n_mlp = 0
    with torch.no_grad():
        for name, m in mods.items():
            if not isinstance(m, nn.Linear):
                continue
            last = name.rsplit(".", 1)[-1]
            if last in _Q:
                m.weight[hd : 2 * hd] = m.weight[:hd]
                m.bias[hd : 2 * hd] = m.bias[:hd]
                n_attn += last in ("query", "q_proj")
            elif any(name.endswith(o) for o in _O):
                m.weight[:, hd : 2 * hd] = m.weight[:, :hd]
            for first, second in _MLP_PAIRS:
                if name.endswith(first):
                    fc2 = mods.get(name[: -len(first)] + second)
                    if isinstance(fc2, nn.Linear) and fc2.in_features == m.out_features:
                        h = m.out_features // 2
                        m.weight[h:] = m.weight[:h]
                        m.bias[h:] = m.bias[:h]
                        fc2.weight[:, h:] = fc2.weight[:, :h]
                        n_mlp += 1
    return n_attn, n_mlp


def _encoder_case(make: Callable[[int], nn.Module], run: Callable[[nn.Module], torch.Tensor]):
    def fn(ctx: Ctx) -> tuple[str, str]:
        model = make(0)
        n_attn, n_mlp = plant_encoder(model)
        if not (n_attn and n_mlp):
            return HARNESS, f"planting found {n_attn} attention blocks and {n_mlp} MLPs"
        ref = run(model)
        # heads: 4 -> 3 (heads 0 and 1 merge); MLP channels: n -> n / 2
        cfg = FoldConfig(ratio=0.0, ratios={"*attention*": 0.25, "*": 0.5}, repair="none", n_init=5)
        a = attempt(ctx, lambda: netfold.fold(model, cfg), model)
        if a.exc is not None:
            return error_outcome(a)
        err = rel_err(run(model), ref)
        folded = sum(g.width_after < g.width_before for g in a.value.groups)
        if err > EXACT_TOL or folded < n_attn + n_mlp:
            return SILENT, f"{folded} groups folded; planted-duplicate error {err:.1e}"
        control = make(0)
        cref = run(control)
        netfold.fold(control, cfg)
        cerr = rel_err(run(control), cref)
        return (
            HANDLED,
            f"{folded} groups folded; error {err:.1e} (control without duplicates {cerr:.1e})",
        )

    return fn


_IDS = torch.randint(0, 100, (2, 12), generator=seeded(0))
_PIX = torch.randn(2, 1, 16, 16, generator=seeded(0), dtype=F64)


def _bert_out(m: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return m(input_ids=_IDS).last_hidden_state


def _vit_out(m: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return m(pixel_values=_PIX).logits


_fn = _encoder_case(_bert, _bert_out)
_fn.__name__ = "bert_through_fold"
case(
    "model",
    "netfold.fold(tiny BertModel) with planted duplicate heads and MLP channels",
    (HANDLED,),
)(_fn)
_fn = _encoder_case(_vit, _vit_out)
_fn.__name__ = "vit_through_fold"
case("model", "netfold.fold(tiny ViTForImageClassification) with planted duplicates", (HANDLED,))(
    _fn
)


def _plant_llama(model: nn.Module) -> None:
    """MLP channels [n/2:] := [:n/2]; query head 1 := 0 and 3 := 2 (within each KV group)."""
    with torch.no_grad():
        for layer in model.model.layers:
            m, a = layer.mlp, layer.self_attn
            h = m.gate_proj.out_features // 2
            m.gate_proj.weight[h:] = m.gate_proj.weight[:h]
            m.up_proj.weight[h:] = m.up_proj.weight[:h]
            m.down_proj.weight[:, h:] = m.down_proj.weight[:, :h]
            hd = a.head_dim
            for src, dst in ((0, 1), (2, 3)):
                a.q_proj.weight[dst * hd : (dst + 1) * hd] = a.q_proj.weight[
                    src * hd : (src + 1) * hd
                ]
                a.o_proj.weight[:, dst * hd : (dst + 1) * hd] = a.o_proj.weight[
                    :, src * hd : (src + 1) * hd
                ]


@case(
    "model", "tiny Llama (float64) with planted duplicate MLP channels and query heads", (HANDLED,)
)
def planted_duplicates_llama(ctx: Ctx) -> tuple[str, str]:
    from netfold.config import LLMConfig

    ids = torch.randint(0, 64, (2, 12), generator=seeded(1))
    cfg = FoldConfig(ratio=0.5, repair="none", n_init=5, llm=LLMConfig(protect=0.0))
    model = tiny_llama().double()
    _plant_llama(model)
    ref = llama_logits(model, ids)
    a = attempt(ctx, lambda: netfold.fold(model, cfg), model)
    if a.exc is not None:
        return error_outcome(a)
    err = rel_err(llama_logits(model, ids), ref)
    if not a.value.params_after < a.value.params_before:
        return (
            SILENT,
            f"nothing was folded (params {a.value.params_before} -> {a.value.params_after})",
        )
    control = tiny_llama().double()
    cref = llama_logits(control, ids)
    netfold.fold(control, cfg)
    cerr = rel_err(llama_logits(control, ids), cref)
    if not cerr > 1e3 * LLM_EXACT_TOL:
        return HARNESS, f"control without duplicates is exact too ({cerr:.1e})"
    info = f"error {err:.1e} (control without duplicates {cerr:.1e})"
    return (HANDLED, info) if err <= LLM_EXACT_TOL else (SILENT, f"not exact: {info}")


@case(
    "model",
    "tiny Llama (hidden 64, 8 heads, 2 KV) folded to 6 heads (6 does not divide 64), "
    "saved with netfold.save, reloaded with netfold.load",
    (HANDLED,),
)
def llama_heads_not_dividing_hidden(ctx: Ctx) -> tuple[str, str]:
    model = tiny_llama(hidden=64, heads=8, kv=2, inter=96)
    ids = torch.randint(0, 64, (2, 12), generator=seeded(1))
    a = attempt(ctx, lambda: netfold.fold(model, FoldConfig(ratio=0.25)), model)
    if a.exc is not None:
        return error_outcome(a)
    heads = model.model.layers[0].self_attn.q_proj.out_features // 8
    if heads != 6:
        return HARNESS, f"expected 6 heads after the fold, got {heads}"
    out = ctx.dir / "folded"
    a = attempt(ctx, lambda: netfold.save(model, out))
    if a.exc is not None:
        return error_outcome(a)
    return _reload_check(ctx, out, model, lambda m: llama_logits(m, ids), "6-head Llama")


def _reload_check(
    ctx: Ctx, d: Path, model: nn.Module, run: Callable[[nn.Module], torch.Tensor], what: str
) -> tuple[str, str]:
    """After a save that returned: the folder must load as ``model`` (same outputs)."""
    a = attempt(ctx, lambda: netfold.load(d))
    if a.exc is not None:
        return CORRUPT_SAVE, f"saved, but the folder does not load: {_first_line(a.exc)}"
    try:
        err = rel_err(run(a.value), run(model))
    except Exception as e:
        return CORRUPT_SAVE, f"saved, reloaded, but does not run: {_first_line(e)}"
    if err > 1e-6:
        return CORRUPT_SAVE, f"reloaded {what} differs from the saved one (error {err:.1e})"
    return HANDLED, f"{what} saved and reloaded (output error {err:.1e})"


# ------------------------------------------------------------------------------ data
def _data_case(data: Callable[[], Any], names: tuple[str, ...] = ("data",)):
    def fn(ctx: Ctx) -> tuple[str, str]:
        model, x = tiny_mlp()
        a = attempt(
            ctx,
            lambda: netfold.fold(
                model, FoldConfig(ratio=0.5, repair="data"), example_inputs=x, data=data()
            ),
            model,
        )
        if a.exc is not None:
            return error_outcome(a, names)
        return SILENT, "bad calibration data accepted; the model was folded with it"

    return fn


for _name, _data, _tried in (
    (
        "empty_calibration_data",
        lambda: torch.empty(0, 20, dtype=F64),
        "repair='data', data of 0 samples",
    ),
    ("empty_calibration_list", lambda: [], "repair='data', data=[]"),
    (
        "nan_calibration_data",
        lambda: torch.full((32, 20), float("nan"), dtype=F64),
        "repair='data', NaN data",
    ),
    (
        "wrong_shape_data",
        lambda: torch.randn(32, 7, dtype=F64),
        "repair='data', data (32, 7) for a model taking (N, 20)",
    ),
    (
        "wrong_dtype_data",
        lambda: torch.randint(0, 5, (32, 20)),
        "repair='data', int64 data for a float64 model",
    ),
):
    _fn = _data_case(_data)
    _fn.__name__ = _name
    case("data", _tried)(_fn)


def _llm_ids_case(ids: Callable[[], torch.Tensor]):
    def fn(ctx: Ctx) -> tuple[str, str]:
        model = tiny_llama()
        cfg = FoldConfig(ratio=0.25, repair="data")
        a = attempt(ctx, lambda: netfold.fold(model, cfg, data=ids()), model)
        if a.exc is not None:
            return error_outcome(a, ("data", "vocab", "token"))
        return SILENT, "out-of-range token ids accepted"

    return fn


for _name, _ids, _tried in (
    (
        "llm_ids_above_vocab",
        lambda: torch.randint(64, 128, (2, 16)),
        "tiny Llama, repair='data', ids >= vocab (64)",
    ),
    (
        "llm_ids_negative",
        lambda: -torch.randint(1, 10, (2, 16)),
        "tiny Llama, repair='data', negative ids",
    ),
):
    _fn = _llm_ids_case(_ids)
    _fn.__name__ = _name
    case("data", _tried)(_fn)


@case("data", "data=... given with repair='ar' (which does not read data)")
def data_with_repair_ar(ctx: Ctx) -> tuple[str, str]:
    model, x = tiny_mlp()
    data = torch.randn(64, 20, generator=seeded(5), dtype=F64) * 10 + 3
    cfg = FoldConfig(ratio=0.5, repair="ar")
    a = attempt(ctx, lambda: netfold.fold(model, cfg, example_inputs=x, data=data), model)
    if a.exc is not None:
        return error_outcome(a, ("data",))
    ref, _ = tiny_mlp()
    netfold.fold(ref, cfg, example_inputs=x)
    same, _ = state_equal(model, ref)
    return SILENT, "data silently ignored (same weights as without data)" if same else (
        "data accepted and changed the result although repair='ar' is data-free"
    )


@case("data", "repair='data' without data=")
def data_missing_for_repair_data(ctx: Ctx) -> tuple[str, str]:
    model, x = tiny_mlp()
    a = attempt(
        ctx, lambda: netfold.fold(model, FoldConfig(repair="data"), example_inputs=x), model
    )
    if a.exc is not None:
        return error_outcome(a, ("data",))
    return SILENT, "folded without the data repair='data' needs"


# ------------------------------------------------------------------------------ files
def _payload_case(arch: str, kwargs_of: Callable[[Path], Any]):
    def fn(ctx: Ctx) -> tuple[str, str]:
        d = ctx.dir / "saved"
        save_mlp(saved_mlp(), d)
        meta = json.loads((d / "netfold.json").read_text())
        meta["arch"], meta["kwargs"] = arch, kwargs_of(ctx.marker())
        (d / "netfold.json").write_text(json.dumps(meta))
        a = attempt(ctx, lambda: netfold.load(d))
        if a.exc is not None:
            return error_outcome(a, ("arch", "regist", "refus", "not allowed", "trust", "unknown"))
        return SILENT, f"loaded a model from arch {arch!r}"

    return fn


for _name, _arch, _kw in (
    ("payload_os_system", "os:system", lambda m: {"command": f"touch {m}"}),
    ("payload_posix_system", "posix:system", lambda m: {"command": f"touch {m}"}),
    ("payload_subprocess_run", "subprocess:run", lambda m: {"args": ["touch", str(m)]}),
    ("payload_subprocess_popen", "subprocess:Popen", lambda m: {"args": ["touch", str(m)]}),
    ("payload_builtins_exec", "builtins:exec", lambda m: {"source": f"open({str(m)!r}, 'w')"}),
):
    _fn = _payload_case(_arch, _kw)
    _fn.__name__ = _name
    case(
        "files",
        f"netfold.load of a folder whose netfold.json names {_arch} with a marker payload",
        payload=True,
    )(_fn)


def _edits_case(edits: list[dict[str, Any]]):
    def fn(ctx: Ctx) -> tuple[str, str]:
        d = ctx.dir / "saved"
        model = saved_mlp()
        save_mlp(model, d)
        meta = json.loads((d / "netfold.json").read_text())
        meta["edits"] = edits
        (d / "netfold.json").write_text(json.dumps(meta))
        a = attempt(ctx, lambda: netfold.load(d))
        if a.exc is not None:
            return error_outcome(
                a, ("edit", "spec", "unknown", "attribute", "refus", "not allowed")
            )
        x = torch.randn(2, 1, 8, 8, generator=seeded(0))
        try:
            err = rel_err(a.value(x), model(x))
        except Exception as e:
            return SILENT, f"loaded a model that no longer runs: {_first_line(e)}"
        if err > 1e-6:
            return SILENT, f"the edit silently changed the model (error {err:.1e})"
        return HANDLED, "the edit was harmless and the model loads unchanged"

    return fn


for _name, _edits, _tried in (
    (
        "hostile_edit_module_type",
        [{"op": "replace", "module": "1", "spec": {"type": "os.system", "command": "touch x"}}],
        "netfold.json edits replacing a module by type 'os.system'",
    ),
    (
        "hostile_edit_patch_forward",
        [{"op": "patch", "module": "", "params": {}, "attrs": {"forward": 1}}],
        "netfold.json edits patching the model's forward attribute",
    ),
):
    _fn = _edits_case(_edits)
    _fn.__name__ = _name
    case("files", _tried, (CLEAR, HANDLED), payload=True)(_fn)


_EVIL_PY = "open({marker!r}, 'w').close()\n"


def _hf_remote_case(model_type: str):
    def fn(ctx: Ctx) -> tuple[str, str]:
        d = ctx.dir / "hf"
        model = tiny_llama()
        model.save_pretrained(d)  # stock transformers save: the folder a user downloads
        cfg = json.loads((d / "config.json").read_text())
        cfg["model_type"] = model_type
        cfg["auto_map"] = {
            "AutoConfig": "evil_config.EvilConfig",
            "AutoModelForCausalLM": "evil_model.EvilModel",
        }
        cfg["trust_remote_code"] = True
        (d / "config.json").write_text(json.dumps(cfg))
        for f in ("evil_config.py", "evil_model.py"):
            (d / f).write_text(_EVIL_PY.format(marker=str(ctx.marker())))
        a = attempt(ctx, lambda: netfold.load(d))
        if a.exc is not None:
            return error_outcome(
                a, ("remote", "model_type", "trust", "auto_map", "unsupported", model_type)
            )
        same, why = state_equal(model, a.value)
        if not same:
            return SILENT, f"loaded, but not the saved weights ({why})"
        return HANDLED, "auto_map / trust_remote_code ignored; the stock Llama loaded"

    return fn


_fn = _hf_remote_case("llama")
_fn.__name__ = "hf_auto_map_llama"
case(
    "files",
    "netfold.load of a HF folder (model_type llama) whose config.json has auto_map and "
    "trust_remote_code: true, with .py files that would create a marker",
    (HANDLED, CLEAR),
    payload=True,
)(_fn)
_fn = _hf_remote_case("evilnet")
_fn.__name__ = "hf_auto_map_unknown_type"
case(
    "files",
    "netfold.load of a HF folder with an unknown model_type resolvable only through auto_map",
    payload=True,
)(_fn)


def _damaged_json_case(write: Callable[[Path], None]):
    def fn(ctx: Ctx) -> tuple[str, str]:
        d = ctx.dir / "saved"
        save_mlp(saved_mlp(), d)
        write(d / "netfold.json")
        a = attempt(ctx, lambda: netfold.load(d))
        if a.exc is not None:
            return error_outcome(a, ("netfold.json",))
        return SILENT, "a damaged netfold.json loaded"

    return fn


def _rewrite_json(edit: Callable[[dict], dict]) -> Callable[[Path], None]:
    def w(p: Path) -> None:
        p.write_text(json.dumps(edit(json.loads(p.read_text()))))

    return w


for _name, _write, _tried in (
    (
        "damaged_json_syntax",
        lambda p: p.write_text('{"format": "netfold-model/1", "arch": '),
        "netfold.json truncated (invalid JSON)",
    ),
    (
        "damaged_json_missing_keys",
        _rewrite_json(lambda m: {"format": m["format"]}),
        "netfold.json with only the format key",
    ),
    (
        "damaged_json_wrong_types",
        _rewrite_json(lambda m: {**m, "kwargs": [1, 2], "widths": "all"}),
        "netfold.json with kwargs a list and widths a string",
    ),
    (
        "damaged_json_not_object",
        lambda p: p.write_text("[1, 2, 3]"),
        "netfold.json holding a JSON list",
    ),
):
    _fn = _damaged_json_case(_write)
    _fn.__name__ = _name
    case("files", _tried)(_fn)


def _patched_weights_case(patch: Callable[[bytearray], None], what: str):
    def fn(ctx: Ctx) -> tuple[str, str]:
        d = ctx.dir / "saved"
        model = saved_mlp()
        save_mlp(model, d)
        f = d / "model.safetensors"
        raw = bytearray(f.read_bytes())
        patch(raw)
        f.write_bytes(bytes(raw))
        a = attempt(ctx, lambda: netfold.load(d))
        if a.exc is not None:
            return error_outcome(
                a, ("model.safetensors", "checksum", "sha", "nan", "finite", "corrupt", "integrity")
            )
        same, why = state_equal(model, a.value)
        if same:
            return HARNESS, "the patch did not change any weight"
        return SILENT, f"{what} loaded without complaint ({why})"

    return fn


def _flip(raw: bytearray) -> None:
    for i in range(len(raw) - 40, len(raw) - 24):  # inside the last tensor's data
        raw[i] ^= 0x5A


def _nan_last(raw: bytearray) -> None:
    raw[-4:] = struct.pack("<f", float("nan"))  # the last float32 of the last tensor


case("files", "netfold.load after 16 bytes of model.safetensors' tensor data were flipped")(
    _patched_weights_case(_flip, "flipped weights")
)
CASES[-1].name = "flipped_bytes_safetensors"
case("files", "netfold.load after one weight in model.safetensors was patched to NaN")(
    _patched_weights_case(_nan_last, "a NaN weight")
)
CASES[-1].name = "nan_patched_safetensors"


@case("files", "netfold.save of a model holding a NaN weight (netfold format)")
def save_nan_weights(ctx: Ctx) -> tuple[str, str]:
    model = saved_mlp()
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    out = ctx.dir / "out"
    a = attempt(ctx, lambda: save_mlp(model, out), model)
    if a.exc is not None:
        return error_outcome(a, ("nan", "finite"))
    return SILENT, "NaN weights were written without an error"


@case("files", "netfold.save of a tiny Llama holding a NaN weight (HF format)")
def save_nan_weights_hf(ctx: Ctx) -> tuple[str, str]:
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    out = ctx.dir / "out"
    a = attempt(ctx, lambda: netfold.save(model, out), model)
    if a.exc is not None:
        return error_outcome(a, ("nan", "finite"))
    return SILENT, "NaN weights were written without an error"


@case(
    "files",
    "netfold.save of a tiny Llama (HF format) into a folder holding a CNN/MLP save",
    (HANDLED, CLEAR),
)
def llm_saved_over_cnn(ctx: Ctx) -> tuple[str, str]:
    d = ctx.dir / "out"
    save_mlp(saved_mlp(), d)
    llm = tiny_llama()
    a = attempt(ctx, lambda: netfold.save(llm, d))
    if a.exc is not None:
        return error_outcome(a, ("out", str(d)))
    ids = torch.randint(0, 64, (2, 8), generator=seeded(0))
    stale = sorted(set(os.listdir(d)) & {"netfold.json"})
    res = _reload_check(ctx, d, llm, lambda m: llama_logits(m, ids), "Llama")
    if res[0] != HANDLED and stale:
        return CORRUPT_SAVE, f"stale {stale[0]} from the old save kept: {res[1]}"
    return res


@case(
    "files",
    "netfold.save of an MLP (netfold format) into a folder holding a HF Llama save",
    (HANDLED, CLEAR),
)
def cnn_saved_over_llm(ctx: Ctx) -> tuple[str, str]:
    d = ctx.dir / "out"
    netfold.save(tiny_llama(), d)
    model = saved_mlp(3)
    a = attempt(ctx, lambda: save_mlp(model, d))
    if a.exc is not None:
        return error_outcome(a, ("out", str(d)))
    x = torch.randn(2, 1, 8, 8, generator=seeded(0))
    res = _reload_check(ctx, d, model, lambda m: m(x), "MLP")
    stale = sorted(set(os.listdir(d)) & {"config.json", "generation_config.json"})
    if res[0] == HANDLED and stale:
        return CORRUPT_SAVE, (
            f"netfold.load gets the MLP, but the old HF save's {stale} remain: the folder mixes "
            "two saves (a Hugging Face loader still reads the stale config)"
        )
    return res


def _save_into_file_case(hf: bool):
    def fn(ctx: Ctx) -> tuple[str, str]:
        target = ctx.dir / "a_file"
        target.write_text("precious\n")
        model = tiny_llama() if hf else saved_mlp()
        call = (lambda: netfold.save(model, target)) if hf else (lambda: save_mlp(model, target))
        a = attempt(ctx, call, model)
        if a.exc is not None:
            return error_outcome(a, (str(target), "a_file", "directory", "exists", "file"))
        return SILENT, "save into a path that is a file returned without error"

    return fn


_fn = _save_into_file_case(False)
_fn.__name__ = "save_into_file_path"
case("files", "netfold.save (netfold format) into a path that is an existing file")(_fn)
_fn = _save_into_file_case(True)
_fn.__name__ = "save_hf_into_file_path"
case("files", "netfold.save (HF format) into a path that is an existing file")(_fn)


@case("files", "netfold.save over a good save with metadata that is not JSON-serialisable")
def save_bad_metadata_over_existing(ctx: Ctx) -> tuple[str, str]:
    d = ctx.dir / "out"
    save_mlp(saved_mlp(), d)
    model = saved_mlp(7)
    a = attempt(
        ctx,
        lambda: netfold.save(
            model, d, arch="netfold:mlp", kwargs=dict(SAVED_MLP_KW), metadata={"x": object()}
        ),
        model,
    )
    if a.exc is not None:
        return error_outcome(a, ("metadata", "json", "serializ", "serialis"))
    return SILENT, "unserialisable metadata accepted"


# ------------------------------------------------------------------------------ kill -9
@case(
    "files",
    "kill -9 at random points of 30 saves (15 netfold format, 15 HF format); after each kill "
    "the folder must load as the old or the new model",
    (HANDLED,),
    timeout=420,
)
def kill9_saves(ctx: Ctx) -> tuple[str, str]:
    n = ARGS_CRASH_SAVES
    mod_path = ROOT / "benchmarks" / "save_crash.py"
    if mod_path.is_file():
        spec = importlib.util.spec_from_file_location("save_crash", mod_path)
        mod = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        spec.loader.exec_module(mod)
        res = mod.run(n, ctx.seed)
        source = "benchmarks/save_crash.py"
    else:
        proc = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--crash-worker",
                str(ctx.dir),
                "--crash-saves",
                str(n),
                "--seed",
                str(ctx.seed),
            ],
            capture_output=True,
            text=True,
            timeout=400,
            env=_child_env(ctx),
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return HARNESS, f"crash worker exited {proc.returncode}: {' | '.join(tail)}"
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        source = "benchmarks/reliability.py --crash-worker"
    KILL9_RESULT.clear()
    KILL9_RESULT.update(res, source=source)
    corrupted = int(res.get("corrupted", 0))
    saves = int(res.get("saves", 0))
    if saves < n:
        return HARNESS, f"only {saves} of {n} saves ran"
    extra = ", ".join(
        f"{k} {v}"
        for k, v in res.items()
        if k not in ("saves", "corrupted", "details") and _plain(v)
    )
    detail = f"{corrupted} of {saves} killed saves left a corrupted folder ({extra}; {source})"
    return (CORRUPT_SAVE if corrupted else HANDLED), detail


KILL9_RESULT: dict[str, Any] = {}
ARGS_CRASH_SAVES = 30


def crash_worker(root: Path, n: int, seed: int) -> dict[str, Any]:
    """Fork a child per save, SIGKILL it at a random point, check the folder (old or new)."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    formats = {
        # old and new differ in shape too (as an original and its folded copy do), so a
        # folder mixing the two saves' files cannot load as either
        "netfold": (
            lambda s: _crash_mlp(s),
            lambda m, d: netfold.save(m, d, arch="netfold:mlp", kwargs=dict(m._crash_kwargs)),
        ),
        "hf": (
            lambda s: tiny_llama(
                seed=s, hidden=128, heads=4, kv=2, inter=512 if s == 1 else 384, layers=4, vocab=512
            ),
            lambda m, d: netfold.save(m, d),
        ),
    }
    per = {"netfold": n - n // 2, "hf": n // 2}
    out: dict[str, Any] = {"saves": 0, "corrupted": 0, "killed_mid_save": 0, "details": []}
    for fmt, (make, save) in formats.items():
        models = [make(1), make(2)]
        d = root / f"crash_{fmt}" / "model"
        d.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        save(models[0], d)
        t_save = time.perf_counter() - t0
        current = 0
        for i in range(per[fmt]):
            new = 1 - current
            delay = rng.uniform(0.0, 1.3 * t_save)
            pid = os.fork()
            if pid == 0:  # child: one save, then exit without cleanup handlers
                try:
                    save(models[new], d)
                finally:
                    os._exit(0)
            time.sleep(delay)
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                out["killed_mid_save"] += 1
            out["saves"] += 1
            state = _crash_state(d, models[current], models[new])
            if state == "old":
                pass
            elif state == "new":
                current = new
            else:
                out["corrupted"] += 1
                out["details"].append(f"{fmt} save {i}: {state}")
                shutil.rmtree(d, ignore_errors=True)
                save(models[current], d)
        leftovers = sorted(p.name for p in d.parent.iterdir() if p.name != "model")
        out[f"{fmt}_leftovers"] = len(leftovers)
        out[f"{fmt}_save_seconds"] = round(t_save, 4)
    return out


def _crash_mlp(seed: int) -> nn.Module:
    from netfold.models import build_model

    kw = {"in_channels": 1, "num_classes": 10, "image_size": 32}
    kw["hidden"] = [1024, 1024] if seed == 1 else [1024, 768]
    torch.manual_seed(seed)
    m = build_model("mlp", **kw).eval()
    m._crash_kwargs = kw
    return m


def _crash_state(d: Path, old: nn.Module, new: nn.Module) -> str:
    try:
        m = netfold.load(d)
    except Exception as e:
        return f"does not load ({_first_line(e)})"
    if state_equal(old, m)[0]:
        return "old"
    if state_equal(new, m)[0]:
        return "new"
    return "loads as neither the old nor the new model"


# ------------------------------------------------------------------------------ CLI
def _child_env(ctx: Ctx) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ctx.src)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("NETFOLD_DEBUG", None)
    return env


def cli(ctx: Ctx, args: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(
            [sys.executable, "-m", "netfold.cli", *args],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            cwd=ctx.dir,
            env=_child_env(ctx),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return None


def cli_outcome(
    ctx: Ctx,
    args: Callable[[Ctx], list[str]],
    names: tuple[str, ...] = (),
    *,
    rc0: str = SILENT,
    before_work: bool = False,
) -> tuple[str, str]:
    """Run the CLI; classify exit code, stderr and what changed in the case folder."""
    argv = args(ctx)
    before = tree_fingerprint(ctx.dir)
    p = cli(ctx, argv)
    changed = diff_keys(before, tree_fingerprint(ctx.dir))
    if p is None:
        return RAW, f"timed out after {CLI_TIMEOUT} s"
    err_lines = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()]
    last = err_lines[-1][:200] if err_lines else (p.stderr.strip().splitlines() or [""])[-1][:200]
    desc = f"exit {p.returncode}: {last}"
    if p.returncode == 0:
        if rc0 == HANDLED and changed:
            return CORRUPT_SAVE, f"exit 0 but the folder changed ({', '.join(changed)})"
        return (
            rc0,
            f"exit 0 ({p.stdout.strip().splitlines()[-1][:150] if p.stdout.strip() else 'no output'})",
        )
    if changed:
        return CORRUPT_SAVE, f"{desc}; the folder changed ({', '.join(changed)})"
    if "Traceback" in p.stderr:
        return RAW, f"exit {p.returncode} with a traceback: {last}"
    if p.returncode != 2:
        return RAW, desc
    if len(err_lines) != 1:
        return RAW, f"{desc} [{len(err_lines)} error lines]"
    if names and not any(n.lower() in err_lines[0].lower() for n in names):
        return RAW, f"{desc} [does not name {names[0]!r}]"
    if before_work and p.stdout.strip():
        return (
            RAW,
            f"{desc} [refused only after the work ran: stdout {p.stdout.strip().splitlines()[0][:60]!r}]",
        )
    return CLEAR, desc


def _cli_model(ctx: Ctx) -> str:
    d = ctx.dir / "model"
    save_mlp(saved_mlp(), d)
    return str(d)


def _cli_case(args: Callable[[Ctx], list[str]], names: tuple[str, ...] = (), **kw):
    def fn(ctx: Ctx) -> tuple[str, str]:
        return cli_outcome(ctx, args, names, **kw)

    return fn


def _out_is_file(ctx: Ctx) -> list[str]:
    m = _cli_model(ctx)
    (ctx.dir / "taken").write_text("precious\n")
    return ["fold", m, "--ratio", "0.5", "--out", str(ctx.dir / "taken")]


def _out_unwritable(ctx: Ctx) -> list[str]:
    return ["fold", _cli_model(ctx), "--ratio", "0.5", "--out", "/proc/netfold-reliability/folded"]


def _payload_dir(ctx: Ctx) -> list[str]:
    d = Path(_cli_model(ctx))
    meta = json.loads((d / "netfold.json").read_text())
    meta["arch"], meta["kwargs"] = "os:system", {"command": f"touch {ctx.marker()}"}
    (d / "netfold.json").write_text(json.dumps(meta))
    return ["eval", str(d)]


def _damaged_dir(ctx: Ctx) -> list[str]:
    d = Path(_cli_model(ctx))
    (d / "netfold.json").write_text('{"format": "netfold-model/1"}')
    return ["eval", str(d)]


def _hf_auto_map_dir(ctx: Ctx) -> list[str]:
    d = ctx.dir / "hf"
    tiny_llama().save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil_model.EvilModel"}
    cfg["trust_remote_code"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil_model.py").write_text(_EVIL_PY.format(marker=str(ctx.marker())))
    return ["eval", str(d)]


for _name, _args, _names, _kw, _tried, _expected in (
    (
        "cli_out_is_file",
        _out_is_file,
        ("--out",),
        {"before_work": True},
        "netfold fold MODEL --out <an existing file>",
        (CLEAR,),
    ),
    (
        "cli_out_unwritable",
        _out_unwritable,
        ("--out",),
        {"before_work": True},
        "netfold fold MODEL --out /proc/... (unwritable)",
        (CLEAR,),
    ),
    (
        "cli_unknown_model",
        lambda c: ["fold", "no_such_model_xyz", "--ratio", "0.5"],
        ("no_such_model_xyz",),
        {},
        "netfold fold no_such_model_xyz",
        (CLEAR,),
    ),
    (
        "cli_bad_model_kwargs",
        lambda c: ["fold", _cli_model(c), "--model-kwargs", "{bad json"],
        ("kwargs",),
        {},
        "netfold fold MODEL --model-kwargs '{bad json'",
        (CLEAR,),
    ),
    (
        "cli_nonexistent_input",
        lambda c: ["fold", str(c.dir / "missing" / "model"), "--ratio", "0.5"],
        ("missing",),
        {},
        "netfold fold <a path that does not exist>",
        (CLEAR,),
    ),
    (
        "cli_nonexistent_gguf",
        lambda c: ["eval", str(c.dir / "missing.gguf")],
        ("missing.gguf",),
        {},
        "netfold eval <a .gguf that does not exist>",
        (CLEAR,),
    ),
    (
        "cli_bad_ratio",
        lambda c: ["fold", _cli_model(c), "--ratio", "1.5"],
        ("ratio",),
        {},
        "netfold fold MODEL --ratio 1.5",
        (CLEAR,),
    ),
    (
        "cli_unknown_repair",
        lambda c: ["fold", _cli_model(c), "--repair", "magic"],
        ("repair",),
        {},
        "netfold fold MODEL --repair magic",
        (CLEAR,),
    ),
    (
        "cli_ratio_and_target",
        lambda c: ["fold", _cli_model(c), "--ratio", "0.3", "--target-sparsity", "0.2"],
        ("ratio",),
        {},
        "netfold fold MODEL --ratio 0.3 --target-sparsity 0.2",
        (CLEAR,),
    ),
    (
        "cli_unknown_dataset",
        lambda c: ["eval", _cli_model(c), "--data", "imagenet"],
        ("imagenet",),
        {},
        "netfold eval MODEL --data imagenet",
        (CLEAR,),
    ),
    (
        "cli_eval_payload_dir",
        _payload_dir,
        (),
        {},
        "netfold eval DIR whose netfold.json names os:system",
        (CLEAR,),
    ),
    (
        "cli_eval_damaged_json",
        _damaged_dir,
        ("netfold.json",),
        {},
        "netfold eval DIR with a netfold.json missing its keys",
        (CLEAR,),
    ),
    (
        "cli_eval_hf_auto_map",
        _hf_auto_map_dir,
        (),
        {"rc0": HANDLED},
        "netfold eval HF_DIR whose config.json has auto_map + trust_remote_code",
        (HANDLED, CLEAR),
    ),
):
    _fn = _cli_case(_args, _names, **_kw)
    _fn.__name__ = _name
    case(
        "cli",
        _tried,
        _expected,
        timeout=CLI_TIMEOUT + 30,
        payload="payload" in _name or "auto_map" in _name,
    )(_fn)


# ------------------------------------------------------------------------------ runner
def _alarm(signum, frame):
    raise CaseTimeout()


def run_case(c: Case, tmp: Path, seed: int, src: Path) -> dict[str, Any]:
    """Run one case isolated: its own folder, markers, seed, time limit."""
    cdir = tmp / c.name
    markers = tmp / f"{c.name}.markers"
    cdir.mkdir(parents=True)
    markers.mkdir()
    s = (seed + zlib.crc32(c.name.encode())) % (2**31)
    ctx = Ctx(cdir, markers, s, src)
    torch.manual_seed(s)
    random.seed(s)
    t0 = time.perf_counter()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(c.timeout)
    try:
        outcome, detail = c.fn(ctx)
    except CaseTimeout:
        outcome, detail = RAW, f"timed out after {c.timeout} s"
    except Exception as e:  # a bug in this script, not in netfold
        tb = traceback.extract_tb(e.__traceback__)[-1]
        outcome, detail = HARNESS, f"{_first_line(e)} (at {Path(tb.filename).name}:{tb.lineno})"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    if c.payload:
        time.sleep(PAYLOAD_WAIT)  # a payload started in the background (Popen) lands late
    if any(markers.iterdir()):
        outcome, detail = CODE, f"marker file created by the payload; {detail}"
    detail = detail.replace(str(tmp), "<tmp>")  # run-independent text
    if outcome not in OUTCOMES:
        outcome, detail = HARNESS, f"unknown outcome {outcome!r}: {detail}"
    return {
        "name": c.name,
        "category": c.category,
        "tried": c.tried,
        "expected": list(c.expected),
        "outcome": outcome,
        "as_expected": outcome in c.expected,
        "detail": detail,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def git_revision() -> dict[str, Any]:
    """The commit and whether tracked files differ from it (this benchmark's outputs aside)."""
    from netfold.bench import meta

    return {
        "revision": meta.git_commit(),
        "dirty": meta.git_dirty(ignore=("reliability.md", "reliability.json")),
    }


def machine() -> dict[str, Any]:
    from netfold.bench import meta

    return meta.machine()


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def totals(results: list[dict[str, Any]]) -> dict[str, int]:
    t = {o: sum(r["outcome"] == o for r in results) for o in OUTCOMES}
    t["cases"] = len(results)
    t["as_expected"] = sum(r["as_expected"] for r in results)
    return t


HEADLINE = (
    ("silent wrong results", SILENT),
    ("corrupted models", CORRUPT_MODEL),
    ("corrupted saves", CORRUPT_SAVE),
    ("code executed from a file", CODE),
)


def render_md(doc: dict[str, Any]) -> str:
    t = doc["totals"]
    k9 = doc.get("kill9") or {}
    lines = [
        "# Reliability: every bad input tried",
        "",
        "Generated by `python benchmarks/reliability.py` (do not edit by hand); raw results in",
        "`benchmarks/results/reliability.json`. Each case runs isolated (own folder, own seed,",
        "time limit); its outcome is decided by checks, not typed in:",
        "",
        "- **clear error**: ValueError / TypeError / FileNotFoundError (CLI: exit 2, no traceback,",
        "  one `error:` line) with a one-line message naming the bad input, and the model (every",
        "  tensor's bytes, module attributes, HF config) and the case folder (every file's bytes,",
        "  no leftovers) unchanged;",
        "- **handled**: no error and the result checked: planted duplicate channels fold exactly",
        "  (float64, relative error <= 1e-9), a save reloads as the saved model, no code ran;",
        "- **silent wrong result**: no error, wrong result (inexact fold, bad input accepted and",
        "  ignored, damaged weights loaded);",
        "- **corrupted model**: an exception, and the model changed;",
        "- **corrupted save**: the folder is neither the old state nor the new complete save;",
        "- **code executed**: a payload's marker file exists;",
        "- **raw error**: another exception type, a multi-line message, a message not naming the",
        "  bad input, a timeout, a CLI traceback or an exit code other than 2;",
        "- **harness error**: this script failed (must be 0).",
        "",
        f"Command: `{doc['command']}`  ",
        f"Revision: `{doc['git']['revision']}`{' (uncommitted changes)' if doc['git'].get('dirty') else ''}  ",
        f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, "
        f"{doc['machine']['platform']}, Python {doc['machine']['python']}, torch "
        f"{doc['machine']['torch']}, transformers {doc['machine']['transformers']}  ",
        f"Run: {doc['time']}, {doc['seconds']:.0f} s",
        "",
        "## Totals",
        "",
        "| | count |",
        "|---|---:|",
    ]
    for label, o in HEADLINE:
        extra = ""
        if o == CORRUPT_SAVE and k9:
            extra = f" (kill -9: {k9.get('corrupted', '?')} of {k9.get('saves', '?')} saves)"
        lines.append(f"| {label}{extra} | **{t[o]}** |")
    for o in (RAW, HARNESS, CLEAR, HANDLED):
        lines.append(f"| {o} | {t[o]} |")
    lines.append(f"| cases | {t['cases']} |")
    lines.append(f"| outcome as expected | {t['as_expected']} of {t['cases']} |")
    for cat in ("config", "model", "data", "files", "cli"):
        rows = [r for r in doc["cases"] if r["category"] == cat]
        if not rows:
            continue
        lines += [
            "",
            f"## {cat}",
            "",
            "| case | tried | expected | outcome | detail |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            mark = "" if r["as_expected"] else " ✗"
            cells = [
                f"`{r['name']}`",
                r["tried"],
                " / ".join(r["expected"]),
                f"**{r['outcome']}**{mark}",
                r["detail"],
            ]
            lines.append(
                "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
            )
    lines += [
        "",
        "✗: the outcome is not one the case accepts. Totals count every case; a clear error",
        "where folding was expected (e.g. an encoder refused) is not a failure of the",
        "error-message requirement but is still marked ✗.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global ARGS_CRASH_SAVES
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument(
        "--only", help="fnmatch pattern of case names (then nothing is written by default)"
    )
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crash-saves", type=int, default=30)
    ap.add_argument(
        "--json", type=Path, help=f"results JSON (default {DEFAULT_JSON.relative_to(ROOT)})"
    )
    ap.add_argument(
        "--md", type=Path, help=f"markdown table (default {DEFAULT_MD.relative_to(ROOT)})"
    )
    ap.add_argument("--crash-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    ARGS_CRASH_SAVES = args.crash_saves
    if args.crash_worker is not None:
        print(json.dumps(crash_worker(args.crash_worker, args.crash_saves, args.seed)))
        return 0
    names = [c.name for c in CASES]
    if len(set(names)) != len(names):
        raise SystemExit("duplicate case names")
    if args.list:
        for c in CASES:
            print(f"{c.category:7s} {c.name:36s} {c.tried}")
        return 0
    chosen = [c for c in CASES if not args.only or fnmatch.fnmatch(c.name, args.only)]
    if not chosen:
        raise SystemExit(f"no case matches {args.only!r}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # product warnings are not outcomes; keep the log readable
    sys.stdin = open(os.devnull)  # no case may wait for input
    src = Path(netfold.__file__).resolve().parents[1]
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="netfold-reliability-") as tmp:
        for i, c in enumerate(chosen):
            r = run_case(c, Path(tmp), args.seed, src)
            results.append(r)
            flag = "" if r["as_expected"] else "  <-- not as expected"
            print(
                f"[{i + 1:2d}/{len(chosen)}] {c.name:36s} {r['outcome']:20s} {r['seconds']:6.1f}s  {r['detail'][:110]}{flag}",
                flush=True,
            )
    doc = {
        "command": " ".join(
            ["python", "benchmarks/reliability.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "netfold_source": str(src),
        "git": git_revision(),
        "machine": machine(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 1),
        "seed": args.seed,
        "totals": totals(results),
        "kill9": copy.deepcopy(KILL9_RESULT),
        "cases": results,
    }
    t = doc["totals"]
    print(
        "totals: "
        + ", ".join(f"{o} {t[o]}" for o in OUTCOMES)
        + f"; as expected {t['as_expected']}/{t['cases']}; {doc['seconds']} s"
    )
    json_path = args.json or (None if args.only else DEFAULT_JSON)
    md_path = args.md or (None if args.only else DEFAULT_MD)
    if json_path:
        atomic_write(json_path, json.dumps(doc, indent=1) + "\n")
    if md_path:
        atomic_write(md_path, render_md(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
