"""Hugging Face Llama-family decoders (Llama, SmolLM2, Qwen2, Mistral): groups, fold, save, load.

Which tensors are coupled, per decoder layer ``model.layers.i``:

- MLP (SwiGLU) channels: ``mlp.gate_proj`` / ``mlp.up_proj`` rows and ``mlp.down_proj`` columns
  (a :class:`~netfold.graph.groups.ChannelGroup`, input norm ``post_attention_layernorm``);
- attention heads: ``self_attn.{q,k,v}_proj`` rows per head and ``o_proj`` columns per head
  (a :class:`~netfold.graph.groups.HeadGroup`, GQA-aware, input norm ``input_layernorm``).

The residual stream (hidden size) is never folded. After surgery the attention modules'
``num_key_value_groups`` (and ``num_heads`` / ``num_key_value_heads`` where a family has them),
``mlp.intermediate_size`` and the config agree with the tensors. Uniform widths go into the
stock config fields, so ``AutoModelForCausalLM.from_pretrained`` reloads the saved folder;
per-layer widths are recorded as ``config.netfold_layer_widths`` (a list, one
``{"intermediate_size", "num_attention_heads", "num_key_value_heads"}`` per layer), which
:func:`load_pretrained` (and ``netfold.load``) reads.

Config extension: when the installed transformers refuses the folded head counts as stock
fields (Llama and Gemma configs require ``hidden_size % num_attention_heads == 0`` even with an
explicit ``head_dim``; decided by validating the config, not by model type), the stock fields
keep the unfolded head counts, ``netfold_layer_widths`` records the actual widths of every layer
and ``netfold_config_extension`` says why. Such a folder reloads with ``netfold.load``
(stock ``from_pretrained`` would see the unfolded shapes and refuse the weights).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import LLM_SYNTH_STARTS, FoldConfig
from ..eval.cost import count_params
from ..fold import llm as L
from ..fold.cluster import canonical, cluster
from ..fold.merge import TensorState
from ..graph.groups import ChannelGroup, Consumer, HeadGroup
from ..graph.surgery import Snapshot, apply_tensors, get_module
from ..report import GroupReport, Report

SUPPORTED = ("llama", "qwen2", "mistral")
LAYER_WIDTHS_KEY = "netfold_layer_widths"
CONFIG_EXTENSION_KEY = "netfold_config_extension"
STOCK_ATTR = "_netfold_stock_widths"
_STOCK_FIELDS = ("intermediate_size", "num_attention_heads", "num_key_value_heads")


# ------------------------------------------------------------------------------- detection
def is_hf_decoder(model: nn.Module) -> bool:
    """True for a Hugging Face model of a supported Llama-family ``model_type`` (:data:`SUPPORTED`).

    Encoders (BERT, ViT, ...) and other Hugging Face models are not decoders here; they go to
    :mod:`netfold.families.encoders` or are refused by :func:`netfold.api.model_family`.
    """
    return getattr(getattr(model, "config", None), "model_type", None) in SUPPORTED


def _layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers: not a Llama-family decoder")
    return layers


def check_supported(model: nn.Module) -> None:
    """Raise ValueError naming the architecture when it is not a supported Llama-family decoder."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in SUPPORTED:
        raise ValueError(
            f"unsupported architecture {type(model).__name__} (model_type={mt!r}): netfold folds "
            f"Hugging Face decoders of type {SUPPORTED}"
        )
    for i, layer in enumerate(_layers(model)):
        for path in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ):
            if not isinstance(layer.get_submodule(path), nn.Linear):
                raise ValueError(f"layer {i}: {path} is not an nn.Linear")


def layer_widths(model: nn.Module) -> list[dict[str, int]]:
    """Per decoder layer: intermediate_size, num_attention_heads, num_key_value_heads."""
    out = []
    for layer in _layers(model):
        hd = layer.self_attn.head_dim
        out.append(
            {
                "intermediate_size": layer.mlp.gate_proj.out_features,
                "num_attention_heads": layer.self_attn.q_proj.out_features // hd,
                "num_key_value_heads": layer.self_attn.k_proj.out_features // hd,
            }
        )
    return out


def find_llm_groups(model: nn.Module, heads: str = "query") -> list[ChannelGroup | HeadGroup]:
    """The foldable groups of every decoder layer: attention heads, then MLP channels."""
    check_supported(model)
    groups: list[ChannelGroup | HeadGroup] = []
    for i, (layer, w) in enumerate(zip(_layers(model), layer_widths(model))):
        p = f"model.layers.{i}"
        groups.append(
            HeadGroup(
                name=f"{p}.self_attn",
                q=f"{p}.self_attn.q_proj",
                k=f"{p}.self_attn.k_proj",
                v=f"{p}.self_attn.v_proj",
                o=f"{p}.self_attn.o_proj",
                num_heads=w["num_attention_heads"],
                num_kv_heads=w["num_key_value_heads"],
                head_dim=layer.self_attn.head_dim,
                unit=heads,
                input_norm=f"{p}.input_layernorm" if hasattr(layer, "input_layernorm") else None,
            )
        )
        groups.append(
            ChannelGroup(
                name=f"{p}.mlp",
                size=w["intermediate_size"],
                producers=[f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"],
                consumers=[Consumer(f"{p}.mlp.down_proj")],
                input_norm=f"{p}.post_attention_layernorm"
                if hasattr(layer, "post_attention_layernorm")
                else None,
            )
        )
    return groups


# ----------------------------------------------------------------------------- parameters
def embedding_params(model: nn.Module) -> int:
    """Parameters of the input embedding and an untied output head."""
    ids = set()
    n = 0
    for m in (model.get_input_embeddings(), model.get_output_embeddings()):
        if m is not None and id(m.weight) not in ids:
            ids.add(id(m.weight))
            n += m.weight.numel()
    return n


def _lin_params(m: nn.Linear) -> tuple[int, int]:
    """(parameters per output row, parameters per input column) of a Linear."""
    return m.in_features + (1 if m.bias is not None else 0), m.out_features


def group_params(model: nn.Module, g: ChannelGroup | HeadGroup, width: int) -> int:
    """Parameters of a group's modules when it keeps ``width`` units (channels or head units)."""
    if isinstance(g, ChannelGroup):
        per = sum(_lin_params(get_module(model, p))[0] for p in g.producers)
        per += sum(_lin_params(get_module(model, c.module))[1] for c in g.consumers)
        return per * width
    nq, nkv = g.heads_for(width)
    q_row, _ = _lin_params(get_module(model, g.q))
    k_row, _ = _lin_params(get_module(model, g.k))
    v_row, _ = _lin_params(get_module(model, g.v))
    _, o_col = _lin_params(get_module(model, g.o))
    o_bias = get_module(model, g.o).bias is not None
    return g.head_dim * (nq * (q_row + o_col) + nkv * (k_row + v_row)) + (
        get_module(model, g.o).out_features if o_bias else 0
    )


def full_width(g: ChannelGroup | HeadGroup) -> int:
    return g.size


def _kind_enabled(g: ChannelGroup | HeadGroup, config: FoldConfig) -> bool:
    return config.llm.fold_attention if isinstance(g, HeadGroup) else config.llm.fold_mlp


def group_ratio(
    g: ChannelGroup | HeadGroup, config: FoldConfig, default: float | None = None
) -> float | None:
    """The ratio for group ``g``: None when skipped (``skip`` pattern or its kind switched off)."""
    if not _kind_enabled(g, config):
        return None
    return config.ratio_for(g.name, g.modules, default)


def width_at(g: ChannelGroup | HeadGroup, ratio: float, config: FoldConfig) -> int:
    """Units kept at ``ratio``: round(n (1 - ratio)), at least one head unit; MLP channels
    as for any channel group (``min_channels``, ``round_to``)."""
    from ..api import width_for

    if isinstance(g, HeadGroup):
        return max(1, min(g.size, int(round(g.size * (1.0 - ratio)))))
    return width_for(g.size, ratio, config)


def params_with(model: nn.Module, groups: list, widths: dict[str, int]) -> int:
    """Total parameters once each group ``name`` keeps ``widths[name]`` units."""
    total = count_params(model)
    for g in groups:
        if g.name in widths:
            total += group_params(model, g, widths[g.name]) - group_params(model, g, g.size)
    return total


def plan_llm_widths(
    model: nn.Module,
    groups: list,
    config: FoldConfig,
    widths: dict[str, int] | None = None,
    ids: torch.Tensor | None = None,
) -> dict[str, int]:
    """Units kept per group, from ``widths`` / ``ratio`` / ``ratios`` / ``target_sparsity``.

    ``target_sparsity`` counts non-embedding parameters (embedding and untied LM head are never
    folded). ``widths`` maps group names to explicit widths: channels for MLP groups, query
    heads for attention groups. ``allocation="cost"`` measures folding errors on ``ids``
    (token ids (n, seqlen)) with :func:`mlp_error_curves`.

    Raises:
        ValueError: an explicit width that cannot be met, an unknown group name, or an
            unreachable target.
    """
    foldable = [g for g in groups if g.foldable]
    by_name = {g.name: g for g in groups}
    out: dict[str, int] = {}
    if widths:
        for name, w in widths.items():
            g = by_name.get(name)
            if g is None:
                raise ValueError(f"no foldable group named {name!r}")
            if isinstance(g, HeadGroup):
                out[name] = g.units_for_heads(int(w))
            else:
                if not 1 <= int(w) <= g.size:
                    raise ValueError(f"{name}: width {w} outside [1, {g.size}]")
                out[name] = int(w)
        return out
    if config.target_sparsity is None:
        for g in foldable:
            r = group_ratio(g, config)
            if r is not None:
                out[g.name] = width_at(g, r, config)
        if config.allocation == "cost":
            budget = params_with(model, groups, out)
            out = allocate_by_cost(model, foldable, config, budget, _need(ids))
        return out
    dense = count_params(model)
    non_emb = dense - embedding_params(model)
    target_params = dense - config.target_sparsity * non_emb
    if config.allocation == "cost":
        return allocate_by_cost(model, foldable, config, target_params, _need(ids))

    def at(r: float) -> dict[str, int]:
        res = {}
        for g in foldable:
            rr = group_ratio(g, config, default=r)
            if rr is not None:
                res[g.name] = width_at(g, rr, config)
        return res

    if params_with(model, groups, at(1.0 - 1e-9)) > target_params:
        raise ValueError(
            f"target_sparsity {config.target_sparsity:.3f} (of non-embedding parameters) is "
            "unreachable with the groups allowed to fold"
        )
    lo, hi = 0.0, 1.0 - 1e-9
    best, best_err = at(0.0), math.inf
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        w = at(mid)
        p = params_with(model, groups, w)
        err = abs(p - target_params)
        if err < best_err:
            best, best_err = w, err
        if p > target_params:
            lo = mid
        else:
            hi = mid
    return best


ALLOC_GRID = (0.875, 0.75, 0.625, 0.5, 0.375, 0.25)


def mlp_error_curves(
    model: nn.Module,
    groups: list,
    config: FoldConfig,
    ids: torch.Tensor,
    grid: tuple[float, ...] = ALLOC_GRID,
) -> dict[str, list[tuple[int, float]]]:
    """Folding error of each MLP group at the widths of :data:`ALLOC_GRID`, from token ids.

    ``grid``: kept fractions, decreasing. The error of a width is the median over tokens of ||MLP_folded(x) - MLP(x)||^2 / ||r||^2,
    with x the normalised MLP input and r the residual stream entering the MLP: what the fold
    changes in the stream, relative to the stream (the median ignores the few tokens carrying
    massive activations). With self-generated ids this is data-free
    (benchmarks/llm_sensitivity_check.py compares its ranking with measured perplexity).

    Returns:
        {group name: [(width, error), ...]} in decreasing width, starting at (size, 0.0).
    """
    io = collect_mlp_inputs(model, ids, max_rows=2048, seed=config.seed, residual=True)
    curves: dict[str, list[tuple[int, float]]] = {}
    for g in groups:
        if not isinstance(g, ChannelGroup) or g.name not in io:
            continue
        x, r = io[g.name]
        prot = L.protected_channels(L.channel_gain(model, g), config.llm.protect)
        gate, up = (get_module(model, p).weight.detach().to(torch.float64) for p in g.producers)
        down = get_module(model, g.consumers[0].module).weight.detach().to(torch.float64)
        X = _mlp_cluster_features(model, g, feature_kind(config, have_ids=True), x)
        y = L.swiglu(x, gate, up) @ down.t()
        rn = (r * r).sum(1).clamp_min(1e-30)
        pts = [(g.size, 0.0)]
        for frac in grid:
            k = max(1, int(round(g.size * frac)))
            if k >= pts[-1][0]:
                continue
            c = _cluster_protected(X, k, prot, dataclasses.replace(config, n_init=1))
            U, A = L.cluster_matrices(c.labels, k, torch.float64)
            y2 = L.swiglu(x, A @ gate, A @ up) @ (down @ U).t()
            pts.append((k, float((((y2 - y) ** 2).sum(1) / rn).median())))
        curves[g.name] = pts
    return curves


def _mlp_cluster_features(
    model: nn.Module, g: ChannelGroup, kind: str, x: torch.Tensor | None
) -> torch.Tensor:
    """k-means features of a SwiGLU group: weights (I, 3h) or activations on ``x`` (I, S)."""
    if kind == "activations":
        gate, up = (get_module(model, p).weight.detach() for p in g.producers)
        return L.mlp_activation_features(x, gate, up)
    return L.mlp_features(model, g)


def feature_kind(config: FoldConfig, have_ids: bool) -> str:
    """The MLP clustering features a fold uses: "weights" or "activations" (LLMConfig.features)."""
    f = config.llm.features
    if f == "auto":
        return "activations" if have_ids else "weights"
    return f


def _need(ids: torch.Tensor | None) -> torch.Tensor:
    if ids is None:
        raise ValueError("allocation='cost' needs token ids (self-generated or calibration)")
    return ids


def allocate_by_cost(
    model: nn.Module,
    groups: list,
    config: FoldConfig,
    target_params: float,
    ids: torch.Tensor | None,
    curves: dict[str, list[tuple[int, float]]] | None = None,
) -> dict[str, int]:
    """Per-layer MLP widths from measured folding errors (:func:`mlp_error_curves`).

    Greedy over the width grid: repeatedly take the step (one group to its next grid width)
    that adds the least error per parameter removed, until the model has at most
    ``target_params`` parameters. Errors add up across layers (log-perplexity does, roughly).
    Attention heads are not folded by this allocation (on small models they cost far more
    perplexity per parameter than MLP channels, docs/llm.md). ``curves`` (from
    :func:`mlp_error_curves`, which do not depend on the target) skip the measurement.
    """
    allowed = [
        g
        for g in groups
        if isinstance(g, ChannelGroup) and group_ratio(g, config, default=0.0) is not None
    ]
    if curves is None:
        curves = mlp_error_curves(model, allowed, config, _need(ids))
    curves = {k: v for k, v in curves.items() if k in {g.name for g in allowed}}
    by_name = {g.name: g for g in allowed}
    step = {name: 0 for name in curves}
    widths = {name: by_name[name].size for name in curves}
    current = params_with(model, groups, widths)
    while current > target_params:
        best, best_score = None, math.inf
        for name, pts in curves.items():
            i = step[name]
            if i + 1 >= len(pts):
                continue
            g = by_name[name]
            saved = group_params(model, g, pts[i][0]) - group_params(model, g, pts[i + 1][0])
            score = (pts[i + 1][1] - pts[i][1]) / max(saved, 1)
            if score < best_score:
                best, best_score = name, score
        if best is None:
            raise ValueError(
                "target is unreachable with allocation='cost': every allowed MLP group is at "
                f"the smallest grid width ({min(ALLOC_GRID):.0%})"
            )
        g = by_name[best]
        i = step[best]
        current -= group_params(model, g, curves[best][i][0]) - group_params(
            model, g, curves[best][i + 1][0]
        )
        step[best] = i + 1
        widths[best] = curves[best][i + 1][0]
    return {k: v for k, v in widths.items() if v < by_name[k].size}


# ---------------------------------------------------------------------------------- sync
def sync_decoder(model: nn.Module) -> None:
    """Make attention/MLP attributes and the config agree with the (rewritten) tensors."""
    widths = layer_widths(model)
    for layer, w in zip(_layers(model), widths):
        attn = layer.self_attn
        nh, nkv = w["num_attention_heads"], w["num_key_value_heads"]
        attn.num_key_value_groups = nh // nkv
        for attr, v in (("num_heads", nh), ("num_key_value_heads", nkv)):
            if hasattr(attn, attr):
                setattr(attn, attr, v)
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = w["intermediate_size"]
    cfg = model.config
    cfg.head_dim = _layers(model)[0].self_attn.head_dim
    first = widths[0]
    if not hasattr(model, STOCK_ATTR):
        # the head counts the config had before the first fold: a save falls back to them
        # when transformers refuses the folded ones (see _saved_config)
        setattr(model, STOCK_ATTR, {k: getattr(cfg, k) for k in _STOCK_FIELDS[1:]})
    if all(w == first for w in widths):
        for k, v in first.items():
            setattr(cfg, k, v)
        if hasattr(cfg, LAYER_WIDTHS_KEY):
            delattr(cfg, LAYER_WIDTHS_KEY)
    else:
        setattr(cfg, LAYER_WIDTHS_KEY, widths)


class _AttrSnapshot:
    """Attention/MLP attributes and the config, for rollback beside the tensor Snapshot."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.cfg = copy.deepcopy(model.config.__dict__)
        self.attrs = []
        for layer in _layers(model):
            for m in (layer.self_attn, layer.mlp):
                keep = (
                    "num_heads",
                    "num_key_value_heads",
                    "num_key_value_groups",
                    "intermediate_size",
                )
                self.attrs.append((m, {a: getattr(m, a) for a in keep if hasattr(m, a)}))

    def restore(self) -> None:
        self.model.config.__dict__.clear()
        self.model.config.__dict__.update(self.cfg)
        for m, attrs in self.attrs:
            for a, v in attrs.items():
                setattr(m, a, v)


# ---------------------------------------------------------------------------------- data
@torch.no_grad()
def collect_mlp_inputs(
    model: nn.Module, data: Any, max_rows: int = 4096, seed: int = 0, residual: bool = False
) -> dict[str, Any]:
    """Normalised MLP inputs (post_attention_layernorm outputs) per layer: {group: (S, hidden)}.

    ``data``: token ids (n, seqlen) or a list of such tensors; at most ``max_rows`` token
    positions are kept per layer (a fixed random subset). With ``residual`` each value is a
    pair (inputs, residual stream entering the norm), both (S, hidden) float64.
    """
    batches = [data] if isinstance(data, torch.Tensor) else list(data)
    if not batches or any(not isinstance(b, torch.Tensor) or b.dim() != 2 for b in batches):
        raise ValueError("LLM calibration data must be token ids: a (n, seqlen) LongTensor")
    rows: dict[str, list[torch.Tensor]] = {}
    res: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(_layers(model)):
        name = f"model.layers.{i}.mlp"

        def hook(_m, inp, out, name=name):
            rows.setdefault(name, []).append(out.detach().reshape(-1, out.shape[-1]).float())
            if residual:
                res.setdefault(name, []).append(inp[0].detach().reshape(-1, out.shape[-1]).float())

        hooks.append(layer.post_attention_layernorm.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        for b in batches:
            for j in range(b.shape[0]):
                model(input_ids=b[j : j + 1].long(), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for name, parts in rows.items():
        X = torch.cat(parts)
        pick = torch.randperm(X.shape[0], generator=g)[:max_rows] if X.shape[0] > max_rows else None
        X = (X if pick is None else X[pick]).to(torch.float64)
        if residual:
            R = torch.cat(res[name])
            out[name] = (X, (R if pick is None else R[pick]).to(torch.float64))
        else:
            out[name] = X
    return out


@torch.no_grad()
def self_generated_ids(
    model: nn.Module,
    n: int = 8,
    length: int = 128,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    start: str = "bos",
) -> torch.Tensor:
    """Data-free calibration text: ``n`` sequences sampled from the model itself, (n, length).

    ``start``: "bos" samples every sequence from the BOS token alone; "random" puts one token
    drawn uniformly from the vocabulary after BOS (special tokens excluded), as LLM-QAT's
    data-free generation does, so the sequences spread over many topics and languages instead
    of the few openings the model prefers. Sampling runs at ``temperature`` (default 1) with
    nucleus ``top_p`` (default 1: none), no top-k, seeded. The sequences carry the model's own
    activation statistics (massive activations included), which Gaussian inputs do not.
    """
    if start not in LLM_SYNTH_STARTS:
        raise ValueError(f"unknown start {start!r}; choose from {LLM_SYNTH_STARTS}")
    cfg = model.config
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else 0
    head = torch.full((n, 1), int(bos), dtype=torch.long)
    if start == "random":
        special = {
            int(t)
            for t in (cfg.bos_token_id, cfg.eos_token_id, getattr(cfg, "pad_token_id", None))
            if isinstance(t, int)
        }
        vocab = torch.tensor([t for t in range(int(cfg.vocab_size)) if t not in special])
        gen = torch.Generator().manual_seed(seed)
        first = vocab[torch.randint(0, vocab.numel(), (n, 1), generator=gen)]
        head = torch.cat([head, first], 1)
    new_tokens = max(length - head.shape[1], 0)
    was = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = model.generate(
                head,
                attention_mask=torch.ones_like(head),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=top_p,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=cfg.eos_token_id if cfg.eos_token_id is not None else 0,
            )
    finally:
        model.train(was)
    return out[:, :length]


# ---------------------------------------------------------------------------------- fold
def _uses_ids(config: FoldConfig, widths: dict[str, int] | None, prune: bool) -> bool:
    """Whether a fold with this config reads calibration token ids when they are given."""
    if config.repair in ("data", "dir"):
        return True
    if config.allocation == "cost" and not widths:
        return True
    return not prune and config.llm.fold_mlp and config.llm.features != "weights"


def _check_ids(model: nn.Module, data: Any) -> None:
    """Raise ValueError unless ``data`` is token ids (n, seqlen) inside the model's vocabulary."""
    batches = [data] if isinstance(data, torch.Tensor) else data
    if not isinstance(batches, (list, tuple)) or not batches:
        raise ValueError(
            "data must be token ids: a (n, seqlen) integer Tensor or a non-empty list of them, "
            f"got {type(data).__name__}"
        )
    emb = model.get_input_embeddings()
    vocab = emb.num_embeddings if isinstance(emb, nn.Embedding) else int(model.config.vocab_size)
    for i, b in enumerate(batches):
        where = "data" if isinstance(data, torch.Tensor) else f"data[{i}]"
        if not isinstance(b, torch.Tensor) or b.dim() != 2:
            shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"{where} must be token ids of shape (n, seqlen), got {shape}")
        if b.dtype == torch.bool or b.is_floating_point() or b.is_complex():
            raise ValueError(f"{where} must hold integer token ids, got dtype {b.dtype}")
        if b.numel() == 0:
            raise ValueError(f"{where} is empty (shape {tuple(b.shape)}): no calibration tokens")
        lo, hi = int(b.min()), int(b.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"{where} holds token ids in [{lo}, {hi}], outside the vocabulary [0, {vocab})"
            )


def fold_decoder(
    model: nn.Module,
    config: FoldConfig,
    *,
    data: Any = None,
    widths: dict[str, int] | None = None,
    groups: list | None = None,
    progress: bool = False,
) -> Report:
    """Fold a Llama-family decoder in place (see :func:`netfold.fold`).

    Args:
        model: LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM (any Llama-layout model).
        config: the FoldConfig; ``config.llm`` picks the head unit and the data-free correction;
            ``method`` "kmeans" folds, "magnitude-l1" / "magnitude-l2" prune the same groups.
        data: token ids (n, seqlen) (an integer Tensor or a list of them, every id in
            ``[0, vocab_size)``) for ``repair="data"``; ``repair="dir"``, ``allocation="cost"``
            and activation features sample their own from the model when it is None (data-free)
            and use it when given. Refused when this config would not read it.
        widths: explicit widths ``{group: channels or query heads}`` instead of ratios.
        groups: precomputed :func:`find_llm_groups` output.
        progress: progress bars.

    Returns:
        The Report; ``extra`` holds non-embedding parameter counts and sparsity.

    Raises:
        ValueError: unsupported architecture, weights on meta or NaN/inf, a width that cannot
            be met, an unreachable target, missing calibration data for repair="data", ``data``
            that is not token ids inside the vocabulary or that this config would ignore, a
            ``ratios`` / ``skip`` pattern that matches no group.
    """
    from ..api import check_finite, check_patterns

    t0 = time.perf_counter()
    check_supported(model)
    check_finite(model)
    if config.repair == "data" and data is None:
        raise ValueError("repair='data' needs calibration token ids: pass data=(n, seqlen) ids")
    prune = config.method.startswith("magnitude")
    if not prune and config.method != "kmeans" and config.method not in ("greedy",):
        if not config.method.startswith("agglomerative") and config.method != "spectral":
            raise ValueError(f"method {config.method!r} is not supported for LLMs")
    if data is not None:
        _check_ids(model, data)
        if not _uses_ids(config, widths, prune):
            raise ValueError(
                f"data= would be ignored: with repair={config.repair!r}, "
                f"allocation={config.allocation!r} and features={config.llm.features!r} this "
                "LLM fold is data-free (token ids are used by repair 'data'/'dir', "
                "allocation='cost' or features 'auto'/'activations'); drop data="
            )
    if groups is None:
        groups = find_llm_groups(model, config.llm.heads)
    check_patterns(groups, config, modules_of=lambda g: g.modules)
    synth_seconds = None
    needs_ids = (
        config.repair == "dir"
        or (config.allocation == "cost" and not widths)
        or (config.llm.features == "activations" and not prune)
    )
    if needs_ids and data is None:
        t1 = time.perf_counter()
        data = self_generated_ids(
            model,
            config.llm.synth_sequences,
            config.llm.synth_length,
            config.seed,
            start=config.llm.synth_start,
        )
        synth_seconds = time.perf_counter() - t1
    plan = plan_llm_widths(model, groups, config, widths, data)
    params_before = count_params(model)
    emb = embedding_params(model)
    todo = [g for g in groups if g.name in plan and plan[g.name] < g.size]

    feats = "weights" if prune else feature_kind(config, have_ids=data is not None)
    inputs = None
    mlp_todo = any(isinstance(g, ChannelGroup) for g in todo)
    if (config.repair in ("data", "dir") and todo) or (feats == "activations" and mlp_todo):
        inputs = collect_mlp_inputs(model, data, seed=config.seed)
    correction, refits = "none", {}
    if config.repair in ("data", "dir"):
        correction = "data"
    if config.repair == "ar":
        correction = config.llm.correction

    state: TensorState = {}
    costs: dict[str, float] = {}
    labels_of: dict[str, list[int]] = {}
    for g in tqdm(todo, desc="folding", disable=not progress, leave=False):
        k = plan[g.name]
        if isinstance(g, HeadGroup):
            blocks = L.head_features(model, g)
            if prune:
                p = 1 if config.method == "magnitude-l1" else 2
                keep = [L.magnitude_keep(b, k, p) for b in blocks]
                L.prune_heads(state, model, g, keep)
                labels_of[g.name] = torch.cat(keep).tolist()
                continue
            labs, cost = [], 0.0
            for b in blocks:
                c = _cluster(b, k, config)
                labs.append(c.labels)
                cost += c.cost
            L.merge_heads(state, model, g, labs, k, correction if correction != "data" else "lsq")
            labels_of[g.name] = torch.cat(labs).tolist()
            costs[g.name] = cost
        else:
            prot = L.protected_channels(L.channel_gain(model, g), config.llm.protect)
            if prune:
                X = L.mlp_features(model, g)
                score = X.abs().sum(1) if config.method == "magnitude-l1" else (X * X).sum(1)
                score[prot] = math.inf
                keep = torch.sort(torch.topk(score, k).indices).values
                L.prune_mlp(state, model, g, keep)
                labels_of[g.name] = keep.tolist()
                continue
            x = inputs[g.name] if inputs is not None else None
            c = _cluster_protected(_mlp_cluster_features(model, g, feats, x), k, prot, config)
            z, how = None, correction
            if inputs is not None and config.repair in ("data", "dir"):
                z = inputs[g.name]
                how = _refit_kind(config.llm.refit, z.shape[0], k)
                refits[g.name] = "full" if how == "data" else "diag"
            elif correction == "lsq":
                hidden = get_module(model, g.producers[0]).in_features
                s = L.input_scale(model, g.input_norm, hidden)
                z = L.gaussian_inputs(hidden, config.llm.gauss_samples, config.seed) * s
            L.merge_mlp(state, model, g, c.labels, k, how, z, config.llm.ridge)
            labels_of[g.name] = c.labels.tolist()
            costs[g.name] = c.cost

    snap = Snapshot(model, sorted(state))
    attrs = _AttrSnapshot(model)
    try:
        apply_tensors(model, state)
        sync_decoder(model)
        check_finite(model)
    except BaseException:
        snap.restore()
        attrs.restore()
        raise

    params_after = count_params(model)
    report = Report(
        operation="fold" if not prune else "prune",
        params_before=params_before,
        params_after=params_after,
        config=config.to_dict(),
    )
    for g in groups:
        k = plan.get(g.name, g.size)
        if isinstance(g, HeadGroup):
            before, after = g.num_heads, g.heads_for(k)[0]
        else:
            before, after = g.size, k
        if g.name in plan or g.foldable:
            report.groups.append(
                GroupReport(
                    g.name, before, after, g.modules, costs.get(g.name), labels_of.get(g.name)
                )
            )
        if not g.foldable:
            report.skipped.append((g.name, "; ".join(g.frozen_reasons) or "a single unit"))
    report.extra.update(
        non_embedding_params_before=params_before - emb,
        non_embedding_params_after=params_after - emb,
        non_embedding_sparsity=1.0 - (params_after - emb) / (params_before - emb),
        correction=correction,
        refit=sorted(set(refits.values())) if refits else None,
        heads_unit=config.llm.heads,
        features=feats,
    )
    if synth_seconds is not None:
        report.extra["self_generation_seconds"] = synth_seconds
    report.seconds = time.perf_counter() - t0
    return report


REFIT_ROWS_PER_CHANNEL = 4


def _refit_kind(refit: str, rows: int, k: int) -> str:
    """merge_mlp's correction for a down_proj refit of ``k`` columns on ``rows`` token rows.

    "auto": the full k x k ridge refit once there are at least REFIT_ROWS_PER_CHANNEL rows per
    merged channel, else the per-member ("lsq") weights, which need far fewer: with 1,024
    self-generated tokens a full refit of 384 columns overfits (SmolLM2 10%: 67 vs 24.7 ppl),
    with 4,096 it helps (20%: 52 vs 69; benchmarks/results/llm_variants.json).
    """
    if refit == "auto":
        refit = "full" if rows >= REFIT_ROWS_PER_CHANNEL * k else "diag"
    return "data" if refit == "full" else "lsq"


def _cluster_protected(X: torch.Tensor, k: int, prot: torch.Tensor, config: FoldConfig):
    """Cluster rows of X into k clusters, each protected row alone in its own cluster."""
    n = X.shape[0]
    if prot.numel() == 0 or k <= prot.numel():
        return _cluster(X, k, config)
    rest = torch.ones(n, dtype=torch.bool)
    rest[prot] = False
    idx = rest.nonzero().flatten()
    c = _cluster(X[idx], k - prot.numel(), config)
    labels = torch.empty(n, dtype=torch.long)
    labels[idx] = c.labels
    labels[prot] = torch.arange(k - prot.numel(), k)
    return type(c)(canonical(labels), c.cost)


def _cluster(X: torch.Tensor, k: int, config: FoldConfig):
    return cluster(
        X.float() if X.shape[0] > 64 else X,
        k,
        config.method,
        seed=config.seed,
        n_init=config.n_init,
        max_iter=config.max_iter,
        tol=config.tol,
    )


# ------------------------------------------------------------------------------ save/load


class ConfigExtensionWarning(UserWarning):
    """The folded widths were saved through netfold's config extension, not stock fields."""


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def config_error(cfg: Any) -> str | None:
    """Why the installed transformers would refuse to save or load ``cfg`` (None: it accepts it).

    Runs the config class's own validation and rebuilds it from its dict, the two steps
    ``save_pretrained`` / ``from_pretrained`` take, on a copy.
    """
    try:
        c = copy.deepcopy(cfg)
        if hasattr(c, "validate"):
            c.validate()
        type(cfg).from_dict(c.to_dict())
    except Exception as e:  # noqa: BLE001 - any refusal means "not accepted"
        return _one_line(e)
    return None


def _saved_config(model: nn.Module) -> tuple[Any, str | None]:
    """The config to write, and the reason when the netfold extension had to be used.

    Stock fields carry the folded widths when the installed transformers accepts them. When it
    does not (Llama / Gemma configs require ``hidden_size % num_attention_heads == 0`` even with
    an explicit ``head_dim``), the stock fields keep the unfolded head counts (which it accepts)
    and the actual widths go to ``netfold_layer_widths``, read by :func:`load_pretrained`.
    """
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, CONFIG_EXTENSION_KEY):
        delattr(cfg, CONFIG_EXTENSION_KEY)
    qc = getattr(cfg, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)) == "gguf":
        del cfg.quantization_config  # weights are dequantized floats: a plain model now
    why = config_error(cfg)
    if why is None:
        return cfg, None
    try:
        widths = layer_widths(model)
    except ValueError:
        raise ValueError(f"the installed transformers refuses this config: {why}") from None
    hd = int(getattr(cfg, "head_dim", None) or _layers(model)[0].self_attn.head_dim)
    candidates = []
    stock = getattr(model, STOCK_ATTR, None)
    if isinstance(stock, dict):
        candidates.append(stock)
    nh = cfg.hidden_size // hd
    nkv = widths[0]["num_key_value_heads"]
    candidates.append(
        {"num_attention_heads": nh, "num_key_value_heads": nkv if nh % nkv == 0 else nh}
    )
    for stock_fields in candidates:
        ext = copy.deepcopy(cfg)
        for k, v in stock_fields.items():
            setattr(ext, k, v)
        ext.head_dim = hd
        setattr(ext, LAYER_WIDTHS_KEY, widths)
        note = (
            f"folded widths saved as the netfold config extension ({LAYER_WIDTHS_KEY}); stock "
            f"fields rejected by transformers: {why}; reload with netfold.load"
        )
        setattr(ext, CONFIG_EXTENSION_KEY, note)
        if config_error(ext) is None:
            return ext, note
    raise ValueError(f"the installed transformers refuses this config: {why}")


def config_extension(directory: str | os.PathLike) -> str | None:
    """The note a save left when it used the netfold config extension (None: stock config)."""
    import json

    p = Path(directory) / "config.json"
    try:
        note = json.loads(p.read_text()).get(CONFIG_EXTENSION_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return note if isinstance(note, str) else None


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer: Any = None,
    *,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """``model.save_pretrained`` (safetensors, the model's dtype), atomically, plus extras.

    The folder is written as a temporary sibling and swapped in (see :mod:`netfold.atomic`):
    the path always holds the previous complete save or this one, never a mix. Also written:
    the tokenizer when given, ``metadata`` as ``netfold_metadata.json``, and the sha256 of every
    weight file (``netfold_checksums.json``, verified by :func:`load_pretrained`).

    Folded widths that the installed transformers refuses as stock config fields are saved
    through the netfold config extension (a :class:`ConfigExtensionWarning` says so and
    ``config.json`` gets a ``netfold_config_extension`` note, see :func:`config_extension`).
    A model loaded from a GGUF file (dequantized by transformers) saves as a plain model.

    Raises:
        ValueError: a non-finite tensor (named), or an existing folder that is not a save.
            Raised before anything is written.
        TypeError: metadata is not JSON-serialisable.
    """
    import json
    import warnings

    from ..atomic import atomic_directory
    from ..io import check_finite, replaceable, write_checksums

    if metadata is not None:
        json.dumps(metadata)  # TypeError before anything is written
    check_finite(model.state_dict(), "save_pretrained")
    cfg, note = _saved_config(model)
    quantizer = getattr(model, "hf_quantizer", None)
    gguf = quantizer is not None and not hasattr(cfg, "quantization_config")
    with atomic_directory(directory, replaceable=replaceable) as tmp:
        old_cfg = model.config
        model.config = cfg
        if gguf:
            model.hf_quantizer = None
        try:
            model.save_pretrained(tmp)
        finally:
            model.config = old_cfg
            if gguf:
                model.hf_quantizer = quantizer
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if metadata:
            (tmp / "netfold_metadata.json").write_text(
                json.dumps(metadata, indent=1, sort_keys=True)
            )
        write_checksums(tmp)
    if note:
        warnings.warn(f"{directory}: {note}", ConfigExtensionWarning, stacklevel=2)
    return Path(directory)


# Moved to netfold.hub (the one loader). Resolved lazily: hub imports this module.
_MOVED_TO_HUB = (
    "SMOLLM2_CACHE",
    "SMOLLM2_GGUF",
    "_check_hf_config",
    "_check_per_layer",
    "_has_tokenizer",
    "_saved_dtype",
    "load_causal_lm",
    "load_pretrained",
    "load_smollm2",
    "smollm2_gguf",
)


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_HUB:
        from .. import hub

        return getattr(hub, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
