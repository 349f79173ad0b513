"""The decoder-LLM fold: plan widths, features, cluster, merge, write with rollback, sync.

Model-agnostic: every structural fact (which modules form a group, fused projections, the
norm in front of the MLP, how attributes and config follow the tensors) comes from the
family's :class:`DecoderHooks`, built by :mod:`netfold.families` from its table row. The math
runs on an :class:`~netfold.fold.views.Overlay` (fused / transposed projections seen as
Linear parts) and the new tensors are re-fused by :func:`~netfold.fold.views.write_back`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import LLM_SYNTH_STARTS, FoldConfig
from ..eval.cost import count_params
from ..graph.groups import ChannelGroup, HeadGroup
from ..graph.surgery import get_module
from ..report import GroupReport, Report
from . import auto
from . import llm as L
from .allocate import greedy_allocation
from .checks import check_finite, check_patterns
from .cluster import Clustering, canonical, cluster_with
from .kmeans import kmeans
from .llm_stages import Stages, self_check_after, self_check_before
from .magnitude import magnitude_keep
from .merge import TensorState
from .plan import (
    MAX_RATIO,
    explicit_widths,
    group_width,
    params_after,
    params_removed,
    uniform_ratio,
    widths_at,
)
from .repairs import get_repair
from .run import write
from .views import Overlay, Split, write_back


@dataclasses.dataclass(frozen=True)
class DecoderHooks:
    """What the decoder fold needs from a model family (supplied by :mod:`netfold.families`).

    Attributes:
        check: ``model -> None``; raises ValueError for a model the family cannot fold.
        groups: ``(model, heads unit) -> [HeadGroup | ChannelGroup]``, layer by layer.
        splits: ``model -> [Split]``: fused or transposed projections as Linear parts.
        mlp_norms: ``model -> {MLP group name: norm module}`` (calibration hooks).
        sync: ``model -> None``: attributes and config follow the rewritten tensors.
        snapshot: ``model -> object with restore()``: attributes and config for rollback.
    """

    check: Callable[[nn.Module], Any]
    groups: Callable[[nn.Module, str], list]
    splits: Callable[[nn.Module], list[Split]]
    mlp_norms: Callable[[nn.Module], dict[str, nn.Module]]
    sync: Callable[[nn.Module], None]
    snapshot: Callable[[nn.Module], Any]


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


def _kind_enabled(g: ChannelGroup | HeadGroup, config: FoldConfig) -> bool:
    return config.llm.fold_attention if isinstance(g, HeadGroup) else config.llm.fold_mlp


def group_ratio(
    g: ChannelGroup | HeadGroup, config: FoldConfig, default: float | None = None
) -> float | None:
    """The ratio for group ``g``: None when skipped (``skip`` pattern or its kind switched off)."""
    if not _kind_enabled(g, config):
        return None
    return config.ratio_for(g.name, g.modules, default)


#: Units kept at a ratio (the planner's rule, :func:`netfold.fold.plan.group_width`).
width_at = group_width


def plan_llm_widths(
    model: nn.Module,
    groups: list,
    config: FoldConfig,
    widths: dict[str, int] | None = None,
    ids: torch.Tensor | None = None,
    *,
    hooks: DecoderHooks,
    view: nn.Module | None = None,
    io: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Units kept per group, from ``widths`` / ``ratio`` / ``ratios`` / ``target_sparsity``.

    ``target_sparsity`` counts non-embedding parameters (embedding and untied LM head are never
    folded). ``widths`` maps group names to explicit widths: channels for MLP groups, query
    heads for attention groups. ``allocation="cost"`` measures folding errors on ``ids``
    (token ids (n, seqlen)) with :func:`mlp_error_curves` (``io``: its MLP inputs, already
    collected).

    Raises:
        ValueError: an explicit width that cannot be met, an unknown group name, or an
            unreachable target.
    """
    view = view if view is not None else Overlay(model, hooks.splits(model))
    foldable = [g for g in groups if g.foldable]
    if widths:
        return explicit_widths(groups, widths)
    if config.target_sparsity is None:
        out = widths_at(foldable, config, None, group_ratio)
        if config.allocation == "cost":
            budget = params_after(model, groups, out, view)
            out = allocate_by_cost(
                model, foldable, config, budget, _need(ids), hooks=hooks, view=view, io=io
            )
        return out
    dense = count_params(model)
    non_emb = dense - embedding_params(model)
    target_params = dense - config.target_sparsity * non_emb
    if config.allocation == "cost":
        return allocate_by_cost(
            model, foldable, config, target_params, _need(ids), hooks=hooks, view=view, io=io
        )
    most = widths_at(foldable, config, MAX_RATIO, group_ratio)
    if params_after(model, groups, most, view) > target_params:
        raise ValueError(
            f"target_sparsity {config.target_sparsity:.3f} (of non-embedding parameters) is "
            "unreachable with the groups allowed to fold"
        )
    r = uniform_ratio(model, foldable, config, target_params, ratio_of=group_ratio, view=view)
    return widths_at(foldable, config, r, group_ratio)


ALLOC_GRID = (0.875, 0.75, 0.625, 0.5, 0.375, 0.25)
#: Token rows per layer the allocation's error curves measure on.
CURVE_ROWS = 2048
#: Token rows per layer for activation features and refits.
FEATURE_ROWS = 4096
#: dtype of the allocation's error curves.
CURVE_DTYPE = torch.float32


def mlp_error_curves(
    model: nn.Module,
    groups: list,
    config: FoldConfig,
    ids: torch.Tensor,
    grid: tuple[float, ...] = ALLOC_GRID,
    *,
    hooks: DecoderHooks,
    view: nn.Module | None = None,
    io: dict[str, Any] | None = None,
) -> dict[str, list[tuple[int, float]]]:
    """Folding error of each MLP group at the widths of :data:`ALLOC_GRID`, from token ids.

    ``grid``: kept fractions, decreasing. The error of a width is the median over tokens of ||MLP_folded(x) - MLP(x)||^2 / ||r||^2,
    with x the normalised MLP input and r the residual stream entering the MLP: what the fold
    changes in the stream, relative to the stream (the median ignores the few tokens carrying
    massive activations). With self-generated ids this is data-free
    (benchmarks/llm_sensitivity_check.py compares its ranking with measured perplexity).

    ``io``: the (inputs, residual) pairs of :func:`collect_mlp_inputs` with ``residual=True``
    and the same seed, already collected (a fold shares one pass between these curves and its
    features); the first :data:`CURVE_ROWS` rows are used, the very rows a collection with
    ``max_rows=CURVE_ROWS`` keeps (the random pick is one permutation either way).

    Returns:
        {group name: [(width, error), ...]} in decreasing width, starting at (size, 0.0).
    """
    view = view if view is not None else Overlay(model, hooks.splits(model))
    if io is None:
        norms = hooks.mlp_norms(model)
        io = collect_mlp_inputs(
            model, ids, norms, max_rows=CURVE_ROWS, seed=config.seed, residual=True
        )
    curves: dict[str, list[tuple[int, float]]] = {}
    for g in groups:
        if not isinstance(g, ChannelGroup) or g.name not in io:
            continue
        # float32 throughout: an error ranking needs no float64, and the k-means features
        # were float32 already (twice the matmul speed on CPU)
        x, r = (t[:CURVE_ROWS].to(CURVE_DTYPE) for t in io[g.name])
        prot = L.protected_channels(L.channel_gain(view, g), config.llm.protect)
        rows = tuple(w.to(CURVE_DTYPE) for w in L._rows(view, g))
        biases = tuple(None if b is None else b.to(CURVE_DTYPE) for b in L._biases(view, g))
        act = L.activation(view, g)
        down = get_module(view, g.consumers[0].module).weight.detach().to(CURVE_DTYPE)
        h = L.mlp_hidden(x, rows, act, biases)  # (S, I): the activation features, transposed
        if feature_kind(config, have_ids=True) == "activations":
            X = h.t().contiguous()
        else:
            X = L.mlp_features(view, g)
        y = h @ down.t()
        rn = (r * r).sum(1).clamp_min(1e-30)
        pts = [(g.size, 0.0)]
        for frac in grid:
            k = max(1, int(round(g.size * frac)))
            if k >= pts[-1][0]:
                continue
            c = _cluster_protected(X, k, prot, dataclasses.replace(config, n_init=1))
            U, A = L.cluster_matrices(c.labels, k, CURVE_DTYPE)
            merged = tuple(A @ r for r in rows)
            mb = tuple(None if b is None else A @ b for b in biases)
            y2 = L.mlp_hidden(x, merged, act, mb) @ (down @ U).t()
            pts.append((k, float((((y2 - y) ** 2).sum(1) / rn).median())))
        curves[g.name] = pts
    return curves


def _mlp_cluster_features(
    model: nn.Module, g: ChannelGroup, kind: str, x: torch.Tensor | None
) -> torch.Tensor:
    """k-means features of an MLP group: weights (I, d) or activations on ``x`` (I, S)."""
    if kind == "activations":
        return L.mlp_activation_features(
            x, L._rows(model, g), L.activation(model, g), L._biases(model, g)
        )
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
    *,
    hooks: DecoderHooks,
    view: nn.Module | None = None,
    io: dict[str, Any] | None = None,
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
    view = view if view is not None else Overlay(model, hooks.splits(model))
    if curves is None:
        curves = mlp_error_curves(model, allowed, config, _need(ids), hooks=hooks, view=view, io=io)
    curves = {k: v for k, v in curves.items() if k in {g.name for g in allowed}}
    by_name = {g.name: g for g in allowed}
    widths = greedy_allocation(
        curves,
        lambda name, w: params_removed(model, by_name[name], w, view),
        params_after(model, groups, {name: by_name[name].size for name in curves}, view),
        target_params,
    )
    if widths is None:
        raise ValueError(
            "target is unreachable with allocation='cost': every allowed MLP group is at "
            f"the smallest grid width ({min(ALLOC_GRID):.0%})"
        )
    return {k: v for k, v in widths.items() if v < by_name[k].size}


# ---------------------------------------------------------------------------------- data
@torch.no_grad()
def collect_mlp_inputs(
    model: nn.Module,
    data: Any,
    norms: dict[str, nn.Module],
    max_rows: int = 4096,
    seed: int = 0,
    residual: bool = False,
) -> dict[str, Any]:
    """Normalised MLP inputs per layer: {group: (S, hidden)}.

    ``norms``: {MLP group name: the norm module whose output the MLP reads} (the family's
    ``mlp_norm``: ``post_attention_layernorm`` for Llama, ``pre_feedforward_layernorm`` for
    Gemma2/3, ``ln_2`` for GPT-2, ...).

    ``data``: token ids (n, seqlen) or a list of such tensors; at most ``max_rows`` token
    positions are kept per layer (a fixed random subset). With ``residual`` each value is a
    pair (inputs, residual stream entering the norm), both (S, hidden) float64.
    """
    batches = [data] if isinstance(data, torch.Tensor) else list(data)
    if not batches or any(not isinstance(b, torch.Tensor) or b.dim() != 2 for b in batches):
        raise ValueError("LLM calibration data must be token ids: a (n, seqlen) LongTensor")
    # The kept rows are drawn up front and picked out as the forward passes go, so memory
    # holds max_rows rows per layer, not every token of the text.
    total = sum(b.numel() for b in batches)
    g = torch.Generator().manual_seed(seed)
    keep = min(total, max_rows)
    slot: dict[str, torch.Tensor] = {}  # token index -> row of the output, -1: not kept
    for name in norms:
        pick = torch.randperm(total, generator=g)[:max_rows] if total > max_rows else None
        slot[name] = torch.full((total,), -1, dtype=torch.long)
        slot[name][pick if pick is not None else torch.arange(total)] = torch.arange(keep)
    out_rows: dict[str, list[torch.Tensor]] = {n: [None, None] for n in norms}
    seen = dict.fromkeys(norms, 0)
    hooks = []

    def put(name: str, which: int, t: torch.Tensor, idx: torch.Tensor, sel: torch.Tensor) -> None:
        buf = out_rows[name][which]
        if buf is None:
            buf = out_rows[name][which] = torch.zeros(keep, t.shape[-1], dtype=torch.float64)
        buf[idx[sel]] = t[sel].to(torch.float64)

    for name, norm in norms.items():

        def hook(_m, inp, out, name=name):
            x = out.detach().reshape(-1, out.shape[-1]).float()
            o = seen[name]
            if o + x.shape[0] > total:
                raise RuntimeError(f"{name}: the norm ran on more tokens than the data holds")
            idx = slot[name][o : o + x.shape[0]]
            seen[name] = o + x.shape[0]
            sel = idx >= 0
            put(name, 0, x, idx, sel)
            if residual:
                put(name, 1, inp[0].detach().reshape(-1, out.shape[-1]).float(), idx, sel)

        hooks.append(norm.register_forward_hook(hook))
    # the decoder body without the LM head (a fifth of SmolLM2's FLOPs): only norms are read
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    body = body if isinstance(body, nn.Module) else model
    was = model.training
    model.eval()
    try:
        for b in batches:
            for j in range(b.shape[0]):
                body(input_ids=b[j : j + 1].long(), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    out: dict[str, Any] = {}
    for name, (X, R) in out_rows.items():
        if X is None:
            continue
        out[name] = (X, R) if residual else X
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
    """Data-free calibration text: ``n`` sequences sampled from the model itself, (n, length)
    (length capped at the model's position table).

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
    # never past the model's position table (tiny test configs have 32-64 positions)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if isinstance(limit, int) and limit >= 2:
        length = min(length, limit)
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
    if get_repair(config.repair).needs != "nothing":
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
    hooks: DecoderHooks,
    *,
    data: Any = None,
    widths: dict[str, int] | None = None,
    groups: list | None = None,
    progress: bool = False,
) -> Report:
    """Fold a Hugging Face decoder in place (see :func:`netfold.fold`).

    Args:
        model: a decoder of a family in :mod:`netfold.families.table` (Llama, Qwen, Gemma,
            Phi-3, GPT-2, OPT, ...).
        config: the FoldConfig; ``config.llm`` picks the head unit and the data-free correction;
            ``method`` "kmeans" folds, "magnitude-l1" / "magnitude-l2" prune the same groups.
        data: token ids (n, seqlen) (an integer Tensor or a list of them, every id in
            ``[0, vocab_size)``) for ``repair="data"``; ``repair="dir"``, ``allocation="cost"``
            and activation features sample their own from the model when it is None (data-free)
            and use it when given. Refused when this config would not read it.
        widths: explicit widths ``{group: channels or query heads}`` instead of ratios.
        hooks: the family's structure (groups, split views, MLP norms, sync, attribute
            snapshot), from :mod:`netfold.families`.
        groups: precomputed ``hooks.groups`` output.
        progress: progress bars.

    Returns:
        The Report; ``extra`` holds non-embedding parameter counts and sparsity.

    Raises:
        ValueError: unsupported architecture, weights on meta or NaN/inf, a width that cannot
            be met, an unreachable target, missing calibration data for repair="data", ``data``
            that is not token ids inside the vocabulary or that this config would ignore, a
            ``ratios`` / ``skip`` pattern that matches no group.
    """
    t0 = time.perf_counter()
    hooks.check(model)
    check_finite(model)
    config, auto_why = auto.resolve(model, config, "decoder")
    repair = get_repair(config.repair)
    refit = repair.needs != "nothing"  # "data": the given ids; "synthetic": self-generated text
    if repair.needs == "data" and data is None:
        raise ValueError(
            f"repair={config.repair!r} needs calibration token ids: pass data=(n, seqlen) ids"
        )
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
        groups = hooks.groups(model, config.llm.heads)
    check_patterns(groups, config, modules_of=lambda g: g.modules)
    synth_seconds = None
    stage = Stages()
    needs_ids = (
        repair.needs == "synthetic"
        or (config.allocation == "cost" and not widths)
        or (config.llm.features == "activations" and not prune)
    )
    if needs_ids and data is None:
        t1 = time.perf_counter()
        with stage("sampling"):
            data = self_generated_ids(
                model,
                config.llm.synth_sequences,
                config.llm.synth_length,
                config.seed,
                start=config.llm.synth_start,
            )
        synth_seconds = time.perf_counter() - t1
    view = Overlay(model, splits := hooks.splits(model))
    shared = None
    if config.allocation == "cost" and not widths and not prune and data is not None:
        # one pass over the text for the allocation's curves AND the features / refit
        with stage("features"):
            shared = collect_mlp_inputs(
                model, data, hooks.mlp_norms(model), FEATURE_ROWS, config.seed, residual=True
            )
    with stage("allocation"):
        plan = plan_llm_widths(
            model, groups, config, widths, data, hooks=hooks, view=view, io=shared
        )
    params_before = count_params(model)
    emb = embedding_params(model)
    todo = [g for g in groups if g.name in plan and plan[g.name] < g.size]

    feats = "weights" if prune else feature_kind(config, have_ids=data is not None)
    inputs = None
    mlp_todo = any(isinstance(g, ChannelGroup) for g in todo)
    if (refit and todo) or (feats == "activations" and mlp_todo):
        with stage("features"):
            if shared is not None:
                inputs = {name: x for name, (x, _r) in shared.items()}
            else:
                inputs = collect_mlp_inputs(
                    model, data, hooks.mlp_norms(model), FEATURE_ROWS, config.seed
                )
    shared = None  # the residual streams were for the curves only
    correction, refits = "none", {}
    if refit:
        correction = "data"
    elif repair.features == "ar":
        correction = config.llm.correction  # the "ar" repair's option for decoders

    state: TensorState = {}
    costs: dict[str, float] = {}
    labels_of: dict[str, list[int]] = {}
    for g in tqdm(todo, desc="folding", disable=not progress, leave=False):
        k = plan[g.name]
        if isinstance(g, HeadGroup):
            blocks = L.head_features(view, g)
            if prune:
                p = 1 if config.method == "magnitude-l1" else 2
                keep = [magnitude_keep(b, k, p) for b in blocks]
                L.prune_heads(state, view, g, keep)
                labels_of[g.name] = torch.cat(keep).tolist()
                continue
            labs, cost = [], 0.0
            for b in blocks:
                c = _cluster(b, k, config)
                labs.append(c.labels)
                cost += c.cost
            L.merge_heads(state, view, g, labs, k, correction if correction != "data" else "lsq")
            labels_of[g.name] = torch.cat(labs).tolist()
            costs[g.name] = cost
        else:
            prot = L.protected_channels(L.channel_gain(view, g), config.llm.protect)
            if prune:
                p = 1 if config.method == "magnitude-l1" else 2
                keep = magnitude_keep(L.mlp_features(view, g), k, p, protect=prot)
                L.prune_mlp(state, view, g, keep)
                labels_of[g.name] = keep.tolist()
                continue
            x = inputs[g.name] if inputs is not None else None
            if feats == "weights" and config.method == "kmeans" and g.size >= LARGE_GROUP:
                # a 7B-size MLP: k-means on a seeded projection of the weight features (never
                # formed: L.mlp_projected_features), the cost J exact in the full space
                with stage("features"):
                    Z = L.mlp_projected_features(view, g, LARGE_PROJECTION, config.seed)
                with stage("clustering"):
                    c = _cluster_protected(Z, k, prot, config, _cluster_projected)
                    c = type(c)(c.labels, L.mlp_folding_cost(view, g, c.labels, k))
                del Z
            else:
                with stage("features"):
                    X = _mlp_cluster_features(view, g, feats, x)
                with stage("clustering"):
                    c = _cluster_protected(X, k, prot, config)
                del X
            z, how = None, correction
            if inputs is not None and refit:
                z = inputs[g.name]
                how = _refit_kind(config.llm.refit, z.shape[0], k)
                refits[g.name] = "full" if how == "data" else "diag"
            elif correction == "lsq":
                hidden = get_module(view, g.producers[0]).in_features
                s = L.input_scale(view, g.input_norm, hidden, g.norm_offset)
                z = L.gaussian_inputs(hidden, config.llm.gauss_samples, config.seed) * s
            with stage("refit" if how == "data" else "merge"):
                L.merge_mlp(state, view, g, c.labels, k, how, z, config.llm.ridge)
            labels_of[g.name] = c.labels.tolist()
            costs[g.name] = c.cost

    with stage("self_check"):
        check = self_check_before(model, config, _sample)
    state = write_back(state, view, splits)
    with stage("write"):
        write(
            model,
            state,
            sorted(state),
            then=lambda: hooks.sync(model),
            restore=[hooks.snapshot(model)],
        )

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
    auto.record(report, config, auto_why)
    with stage("self_check"):
        self_check_after(report, model, check, config)
    report.extra["stage_seconds"] = stage.seconds
    report.seconds = time.perf_counter() - t0
    return report


def _sample(model: nn.Module, n: int, length: int, seed: int, start: str) -> torch.Tensor:
    return self_generated_ids(model, n, length, seed, start=start)


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


def _cluster_protected(
    X: torch.Tensor, k: int, prot: torch.Tensor, config: FoldConfig, how: Callable | None = None
):
    """Cluster rows of X into k clusters, each protected row alone in its own cluster.

    ``how``: the clustering call ``(X, k, config) -> Clustering`` (default :func:`_cluster`).
    """
    how = how or _cluster
    n = X.shape[0]
    if prot.numel() == 0 or k <= prot.numel():
        return how(X, k, config)
    rest = torch.ones(n, dtype=torch.bool)
    rest[prot] = False
    idx = rest.nonzero().flatten()
    c = how(X[idx], k - prot.numel(), config)
    labels = torch.empty(n, dtype=torch.long)
    labels[idx] = c.labels
    labels[prot] = torch.arange(k - prot.numel(), k)
    return type(c)(canonical(labels), c.cost)


# Groups of at least this many channels (a Llama-2-7B MLP: 11008) run one k-means on a
# seeded random projection to LARGE_PROJECTION dims: the exact Gram search with n_init
# restarts costs n^2 d per restart there (minutes per layer on a CPU) and the float32 feature
# matrix alone is 541 MB. Weight features are projected without being formed and clustered
# exactly in the projection (_cluster_projected); other features (activations) use
# kmeans(projection_dim=...), refined in the full space. Smaller groups (SmolLM2: 1536) stay
# exact. The in-RAM fold and the streaming fold (fold/stream.py) share this rule.
LARGE_GROUP = L.LARGE_GROUP
LARGE_PROJECTION = 256
_device: contextvars.ContextVar[str | None] = contextvars.ContextVar("cluster_device", default=None)


@contextlib.contextmanager
def cluster_device(device: str | torch.device | None) -> Iterator[None]:
    """Run the k-means of folds inside this block on ``device`` (labels come back to CPU)."""
    token = _device.set(None if device is None else str(device))
    try:
        yield
    finally:
        _device.reset(token)


def _cluster_projected(Z: torch.Tensor, k: int, config: FoldConfig) -> Clustering:
    """One seeded k-means run on already projected features Z (n, p); cost in Z's space."""
    dev = _device.get()
    res = kmeans(
        Z if dev is None else Z.to(dev),
        k,
        n_init=1,
        max_iter=config.max_iter,
        tol=config.tol,
        seed=config.seed,
    )
    return Clustering(canonical(res.labels.cpu()), float(res.inertia))


def _cluster(X: torch.Tensor, k: int, config: FoldConfig):
    # float32 distances once there are enough rows for it to matter (a 7B MLP layer)
    X = X.float() if X.shape[0] > 64 else X
    dev = _device.get()
    if dev is not None:
        X = X.to(dev)
    if config.method == "kmeans" and X.shape[0] >= LARGE_GROUP and 1 < k < X.shape[0]:
        res = kmeans(
            X,
            k,
            n_init=1,
            max_iter=config.max_iter,
            tol=config.tol,
            seed=config.seed,
            projection_dim=LARGE_PROJECTION,
        )
        return Clustering(canonical(res.labels.cpu()), float(res.inertia))
    c = cluster_with(X, k, config)
    return Clustering(c.labels.cpu(), c.cost)
