"""Fold Hugging Face decoders larger than memory: layer by layer from safetensors shards.

``netfold.fold_folder(src, out, FoldConfig(target_sparsity=0.2))`` reads ``src`` (a Hugging
Face folder: ``config.json`` and ``model.safetensors`` or shards with an index), plans the
widths on a model skeleton built on the meta device (no weights; the same planner as the
in-RAM fold, so uniform ratios and ``target_sparsity`` on non-embedding parameters give the same
widths), folds each decoder layer as an independent job (:mod:`netfold.fold.stream`: one layer
resident, the same per-group code as :func:`netfold.fold`), and writes ``out``: shards named and
split like the input's, in the input's dtype (bf16 stays bf16), embeddings / head / final norm
byte-copied, ``config.json`` with the new widths (stock fields when uniform, so
``from_pretrained`` reloads it; otherwise the netfold config extension that ``netfold.load``
reads), the input's tokenizer files, and sha256 checksums.

Jobs run here, in ``workers`` local processes, or on a Ray cluster (``ray_address``; "local"
starts one on this machine). Per-layer results go to the hidden work folder
``.OUT.netfold-stream`` beside ``out``; a killed run restarted with the same arguments reuses
the layers it finished and writes byte-identical shards. ``out`` appears only when complete
(:func:`netfold.atomic.atomic_directory`).

The streaming path is data-free (weight features; ``repair`` "ar" or "none"): calibration that
carries activations layer to layer is not implemented here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .atomic import atomic_directory
from .config import FoldConfig
from .eval.cost import count_params
from .fold import decoder as D
from .fold import stream as S
from .graph.groups import HeadGroup
from .report import GroupReport, Report

__all__ = ["estimate_float32_bytes", "fold_folder", "needs_streaming"]

# The one-layer model's vocabulary: the embedding is never folded, so a stub of a few rows
# keeps the skeleton small (the real embedding is byte-copied from the input).
_STUB_VOCAB = 8
_METHODS_OK = ("kmeans", "greedy", "spectral", "magnitude-l1", "magnitude-l2")
_SKIP_FILES = (S.INDEX, "config.json", "netfold_checksums.json", "netfold_metadata.json")


def estimate_float32_bytes(src: str | os.PathLike) -> int:
    """Bytes the model of folder ``src`` takes in float32 (from the safetensors headers)."""
    ck = S.Checkpoint(src)
    return sum(4 * math.prod(t.shape) for t in ck.tensors.values())


def available_memory() -> int:
    """Bytes of memory available to a new process (psutil, else /proc/meminfo)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return 0


def needs_streaming(src: str | os.PathLike, headroom: float = 2.0) -> bool:
    """True when folding ``src`` in RAM would not fit: ``headroom`` x its float32 size exceeds
    the available memory (the in-RAM fold holds the float32 model plus per-group temporaries)."""
    return headroom * estimate_float32_bytes(src) > available_memory()


def _read_config(src: Path) -> dict[str, Any]:
    p = src / "config.json"
    if not p.is_file():
        raise ValueError(f"{src} has no config.json: not a Hugging Face model folder")
    try:
        cfg = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{p}: not a config object")
    if "auto_map" in cfg:
        raise ValueError(f"{p} names remote code (auto_map); netfold runs no code from a folder")
    return cfg


def _family(cfg: dict[str, Any]):
    from .families.table import decoder_family, supported_model_types

    fam = decoder_family(cfg.get("model_type"))
    if fam is None:
        raise ValueError(
            f"unsupported model_type {cfg.get('model_type')!r} in config.json: streaming folds "
            f"decoder model types {sorted(supported_model_types())}"
        )
    return fam


def _hf_config(cfg: dict[str, Any], **override: Any):
    from transformers import AutoConfig

    d = {k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")}
    d.update(override)
    return AutoConfig.for_model(cfg["model_type"], **d)


def _meta_model(cfg: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    """The whole model on the meta device (shapes only), resized to recorded per-layer widths."""
    from transformers import AutoModelForCausalLM

    from .families.decoders import LAYER_WIDTHS_KEY, resize_layers, sync_decoder

    per_layer = cfg.get(LAYER_WIDTHS_KEY)
    c = _hf_config({k: v for k, v in cfg.items() if k != LAYER_WIDTHS_KEY})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(c, dtype=dtype)
        if per_layer:
            resize_layers(model, per_layer)
            sync_decoder(model)
    return model


def _materialise_rest(model: nn.Module, dtype: torch.dtype) -> None:
    """Zeros for every tensor still on meta (stub embedding / head / norm, rotary buffers):
    the data-free fold reads only the layer's weights and never runs the model."""
    new: dict[int, torch.Tensor] = {}
    for m in model.modules():
        for n, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in new:
                    new[id(p)] = nn.Parameter(torch.zeros(p.shape, dtype=p.dtype), False)
                m._parameters[n] = new[id(p)]
        for n, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[n] = torch.zeros(b.shape, dtype=b.dtype)


def layer_model(
    cfg: dict[str, Any], layer: int, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> nn.Module:
    """A one-layer model of ``cfg``'s family holding layer ``layer``'s ``tensors`` (local names,
    ``<layers>.0.*``), in ``dtype``; the :data:`netfold.fold.stream.LayerBuilder` of HF decoders."""
    from transformers import AutoModelForCausalLM

    from .families.decoders import LAYER_WIDTHS_KEY, resize_layers, sync_decoder

    over: dict[str, Any] = {"num_hidden_layers": 1, "vocab_size": _STUB_VOCAB}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = cfg.get(key)
        if isinstance(v, int) and v >= _STUB_VOCAB or isinstance(v, list):
            over[key] = None
    if isinstance(cfg.get("layer_types"), list):
        over["layer_types"] = [cfg["layer_types"][layer]]
    per_layer = cfg.get(LAYER_WIDTHS_KEY)
    c = _hf_config({k: v for k, v in cfg.items() if k != LAYER_WIDTHS_KEY}, **over)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(c, dtype=dtype)
        if per_layer:
            resize_layers(model, [per_layer[layer]])
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"layer {layer}: tensors {unexpected[:3]} do not fit the model")
    _materialise_rest(model, dtype)
    if per_layer:
        sync_decoder(model)
    return model.eval()


def run_layer(job: S.LayerJob) -> dict[str, Any]:
    """One layer job (module level, so local processes and Ray can run it by name)."""
    from .families.llama import HOOKS

    return S.run_layer_job(job, layer_model, HOOKS)


#: What "auto" means for the streaming fold: the data-free weight-feature recipe, the only one
#: that needs no text (the in-RAM default samples the model's own text through the whole model).
STREAM_AUTO = {"repair": "ar", "allocation": "uniform"}

STREAM_AUTO_WARNING = (
    "streaming fold: repair/allocation 'auto' resolved to the data-free weight-feature recipe "
    "(uniform widths, repair='ar'); it cannot sample text or run the self-check, and on small "
    "decoders it is far worse than the in-RAM default (SmolLM2-135M at 20%: uniform collapses, "
    "the in-RAM cost allocation keeps 1.94x perplexity, docs/llm.md): fold in RAM when the "
    "model fits"
)


def _resolve_auto(config: FoldConfig) -> tuple[FoldConfig, str | None]:
    """``config`` with "auto" repair / allocation replaced by :data:`STREAM_AUTO`."""
    changes = {k: v for k, v in STREAM_AUTO.items() if getattr(config, k) == "auto"}
    if not changes:
        return config, None
    return dataclasses.replace(config, **changes), STREAM_AUTO_WARNING


def _check_config(config: FoldConfig) -> None:
    from .fold.repairs import get_repair

    if get_repair(config.repair).needs != "nothing":
        raise ValueError(
            f"repair={config.repair!r} needs text; the streaming fold is data-free: use repair "
            "'ar' or 'none'"
        )
    if config.allocation != "uniform":
        raise ValueError("allocation='cost' measures errors on text; streaming needs 'uniform'")
    if config.llm.features == "activations":
        raise ValueError("features='activations' needs text; streaming uses weight features")
    if not (config.method in _METHODS_OK or config.method.startswith("agglomerative")):
        raise ValueError(f"method {config.method!r} is not supported for LLMs")


def check_device(device: str | torch.device) -> str:
    """The device as a string, or ValueError when it cannot be used here."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices")
    elif d.type != "cpu":
        raise ValueError(f"device {device!r}: use 'cpu' or 'cuda[:i]'")
    return str(d)


def _check_out(out: Path, src: Path) -> None:
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the input folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {out} exists and is not an empty folder; choose a new path")


def fold_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    config: FoldConfig | None = None,
    *,
    workers: int = 1,
    ray_address: str | None = None,
    threads: int | None = None,
    device: str = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    progress: bool = False,
    _stop_after: int | None = None,
) -> Report:
    """Fold the decoder in folder ``src`` layer by layer and write it to ``out`` (module doc).

    Args:
        src: a Hugging Face decoder folder (``config.json``, safetensors weights).
        out: the output folder; must not exist (or be empty). Written atomically.
        config: the FoldConfig (default ``FoldConfig(ratio=0.2)``); data-free options only.
        workers: local worker processes (1: fold in this process).
        ray_address: a Ray cluster address ("auto", "ray://host:10001") or "local" (start one
            here); jobs then run as Ray tasks. The input and the work folder beside ``out``
            must be reachable under the same paths from every node.
        threads: torch threads per layer job (default: this machine's cores / workers).
            Results are bit-identical for equal ``threads`` whatever the number of workers.
        device: where each layer's k-means runs ("cpu", "cuda", "cuda:i"); weight features
            and merges run on the CPU.
        compute_dtype: float32 (default, as the in-RAM fold of a loaded model) or float64.
        progress: print one line per finished layer.
        _stop_after: tests only: raise after this many layers were folded (a simulated kill).

    Returns:
        A Report: parameters before / after, per-group widths, ``extra`` with per-layer
        seconds, bytes read and written, layers reused from an interrupted run.

    Raises:
        ValueError: a missing shard or config, an unsupported model_type, an output that
            exists and is not empty, a config that needs text, an unusable device, tensors
            that do not match the config. Raised before anything is written.
    """
    t0 = time.perf_counter()
    config = FoldConfig(ratio=0.2) if config is None else config
    if not isinstance(config, FoldConfig):
        raise TypeError(f"config must be a netfold.FoldConfig, got {type(config).__name__}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ValueError(f"{src} is not a folder")
    cfg = _read_config(src)
    fam = _family(cfg)
    _check_out(out, src)
    config, auto_note = _resolve_auto(config)
    _check_config(config)
    device = check_device(device)
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be float32 or float64, got {compute_dtype}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    ckpt = S.Checkpoint(src)
    dtype = ckpt.dtype()

    from .families.decoders import find_llm_groups, resize_layers, sync_decoder
    from .families.llama import HOOKS, _saved_config
    from .fold.checks import check_patterns

    meta = _meta_model(cfg, dtype)
    params_before = count_params(meta)
    want = meta.state_dict()
    tied = (
        {k for k in want if k.startswith("lm_head.")} if cfg.get("tie_word_embeddings") else set()
    )
    lost = [k for k in want if k not in ckpt.tensors and k not in tied]
    extra = [k for k in ckpt.tensors if k not in want]
    if lost or extra:
        what = f"missing {lost[:3]}" if lost else f"unexpected {extra[:3]}"
        raise ValueError(f"{src}: the weights do not match config.json: {what}")
    for k, t in want.items():
        if k in ckpt.tensors and tuple(ckpt.tensors[k].shape) != tuple(t.shape):
            raise ValueError(
                f"{src}: {k} has shape {ckpt.tensors[k].shape}, config.json says {tuple(t.shape)}"
            )
    groups = find_llm_groups(meta, config.llm.heads)
    check_patterns(groups, config, modules_of=lambda g: g.modules)
    plan = D.plan_llm_widths(meta, groups, config, None, None, hooks=HOOKS)

    prefix = f"{fam.layers}."

    def layer_of(name: str) -> int | None:
        if not name.startswith(prefix):
            return None
        head = name[len(prefix) :].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    n_layers = int(cfg["num_hidden_layers"])
    per_layer_cfg = dataclasses.replace(
        config, ratio=0.0, ratios=None, skip=(), target_sparsity=None
    ).to_dict()
    jobs = []
    new_widths = []
    for i in range(n_layers):
        local = f"{prefix}0."
        names = {n: local + n[len(f"{prefix}{i}.") :] for n in ckpt.tensors if layer_of(n) == i}
        widths: dict[str, int] = {}
        w_layer = {}
        for g in groups:
            if not g.name.startswith(f"{prefix}{i}."):
                continue
            k = plan.get(g.name, g.size)
            lname = local + g.name[len(f"{prefix}{i}.") :]
            if isinstance(g, HeadGroup):
                nq, nkv = g.heads_for(k)
                w_layer.update(num_attention_heads=nq, num_key_value_heads=nkv)
                if k < g.size:
                    widths[lname] = nq
            else:
                w_layer["intermediate_size"] = k
                if k < g.size:
                    widths[lname] = k
        new_widths.append(w_layer)
        jobs.append(
            S.LayerJob(
                src=str(src.resolve()),
                work="",
                layer=i,
                tensors=names,
                widths=widths,
                model_config=cfg,
                fold_config=per_layer_cfg,
                threads=threads,
                compute_dtype=str(compute_dtype).removeprefix("torch."),
                device=device,
            )
        )

    # the output config: the skeleton resized to the new widths, saved as a fold would save it
    with torch.device("meta"):
        resize_layers(meta, new_widths)
    sync_decoder(meta)
    out_cfg, note = _saved_config(meta)
    out_cfg.dtype = dtype
    params_after = count_params(meta)
    emb = D.embedding_params(meta)

    work = S.WorkDir.beside(out)
    table = {n: [t.file, t.dtype, list(t.shape), t.start, t.end] for n, t in ckpt.tensors.items()}
    fp = S.fingerprint(
        table, per_layer_cfg, [j.widths for j in jobs], threads, str(compute_dtype), device
    )
    done = set(work.start(fp))
    jobs = [dataclasses.replace(j, work=str(work.path)) for j in jobs]
    todo = [j for j in jobs if j.layer not in done]
    if _stop_after is not None:
        todo = todo[:_stop_after]

    def show(info: dict[str, Any]) -> None:
        if progress:
            print(f"  layer {info['layer']}: {info['seconds']:.1f} s", flush=True)

    t_jobs = time.perf_counter()
    S.run_jobs(run_layer, todo, workers=workers, ray_address=ray_address, progress=show)
    jobs_seconds = time.perf_counter() - t_jobs
    if _stop_after is not None:
        raise RuntimeError(f"stopped after {_stop_after} layers (simulated kill)")
    infos = [work.info(j.layer) for j in jobs]

    text = {"config.json": out_cfg.to_json_string(use_diff=True)}
    meta_json = {
        "stream": {
            "source_dtype": str(dtype).removeprefix("torch."),
            "fold_config": config.to_dict(),
            "layer_widths": new_widths,
        }
    }
    text["netfold_metadata.json"] = json.dumps(meta_json, indent=1, sort_keys=True) + "\n"
    from .io import write_checksums

    t_asm = time.perf_counter()
    with atomic_directory(out) as tmp:
        written = S.assemble(ckpt, work, tmp, layer_of, text)
        for p in sorted(src.iterdir()):
            if p.is_file() and p.suffix != ".safetensors" and p.name not in _SKIP_FILES:
                shutil.copyfile(p, tmp / p.name)
        write_checksums(tmp)
    assemble_seconds = time.perf_counter() - t_asm
    work.remove()

    report = Report(
        operation="fold" if not config.method.startswith("magnitude") else "prune",
        params_before=params_before,
        params_after=params_after,
        config=config.to_dict(),
    )
    costs = {g["name"]: g.get("cost") for info in infos for g in info.get("groups", [])}
    for g in groups:
        k = plan.get(g.name, g.size)
        before, after = (
            (g.num_heads, g.heads_for(k)[0]) if isinstance(g, HeadGroup) else (g.size, k)
        )
        i = int(g.name[len(prefix) :].split(".", 1)[0])
        local = f"{prefix}0." + g.name[len(f"{prefix}{i}.") :]
        report.groups.append(GroupReport(g.name, before, after, g.modules, costs.get(local), None))
    if note:
        report.warnings.append(note)
    if auto_note:
        warnings.warn(auto_note, stacklevel=2)
        report.warnings.append(auto_note)
    report.extra.update(
        mode="ray" if ray_address else ("processes" if workers > 1 else "sequential"),
        workers=workers,
        threads=threads,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        layers=n_layers,
        layers_reused=sorted(done),
        layer_seconds=[info.get("seconds") for info in infos],
        jobs_seconds=jobs_seconds,
        assemble_seconds=assemble_seconds,
        bytes_read=sum(info.get("bytes_read", 0) for info in infos),
        bytes_written=written["bytes_written"],
        non_embedding_params_before=params_before - emb,
        non_embedding_params_after=params_after - emb,
        non_embedding_sparsity=1.0 - (params_after - emb) / (params_before - emb),
        save_format="stock config" if note is None else "netfold extension",
    )
    report.seconds = time.perf_counter() - t0
    return report
