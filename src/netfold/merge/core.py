"""netfold.merge: several networks of one architecture into one, on the groups folding uses.

Notation (ALGORITHMS.md, paper appendix "Model Folding for Connecting Models"): M models, a
channel group of n channels per model, k merged channels. Each model m gets a one-hot
membership U_m (n, k) (which merged channel each of its channels joins); the counts
N = sum_m U_m^T 1 (k,) count members over ALL models, and P_m = diag(1/N) U_m^T (k, n).
A tensor T_m of model m becomes

    T = sum_m  R_m T_m C_m

with R_m = P_m on an axis indexed by a merged group (producer rows and per-channel
parameters: the mean over every member from every model) or R_m = I / M on an axis no group
merges (classifier outputs, the input image), and C_m = U_m on each consumer's input columns
of a merged group (summed within a model). Every tensor is thus averaged across models exactly
once, so merging a model with itself returns it, and merging it with a channel-permuted copy
(U_m the inverse permutation) returns it exactly. BatchNorm running variances are merged
through the mean of 1/sigma, as folding does.

The alignment U_m of a group is found on features of the group's channels (producer rows with
their input columns already mapped into merged coordinates, per-channel parameters, consumer
columns with their rows mapped) stacked over the models, so groups depend on each other. A
first pass visits the groups in graph order using only features that are already comparable
across models (inputs from merged or unmerged-by-design groups, per-channel parameters); then
coordinate descent re-solves every group, in a seeded random order, with the others' current
alignment until no group changes (at most ``max_passes`` passes), as weight matching does.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import DeepInversionConfig
from ..eval.cost import count_params
from ..fold.auto import has_batchnorm
from ..fold.deep_inversion import synthesize
from ..fold.repair import collect_inputs, producer_stats, repair_with_batch
from ..graph.groups import ChannelGroup, Consumer
from ..graph.surgery import apply_tensors, consumer_columns, get_module
from ..graph.trace import find_groups, infer_example_inputs
from ..report import GroupReport, Report
from .config import MergeConfig
from .matching import correlation, cosine_similarity, kmeans_labels, lap_labels, zipit_labels

F64 = torch.float64


@dataclass
class Alignment:
    """Which merged channel each model's channel joins, for one group.

    Attributes:
        labels: (M, n) int64 in [0, k).
        k: merged width.
        identity: channel i of every model stays channel i (frozen or unsupported groups, and
            every group of ``method="average"``): nothing is re-indexed, tensors are averaged.
        kept_apart: every model's channels are kept side by side (no merged channel holds two
            models' channels), so tensors these channels index cannot be compared across models.
    """

    labels: torch.Tensor
    k: int
    identity: bool = False
    kept_apart: bool = False

    @classmethod
    def same(cls, M: int, n: int) -> Alignment:
        return cls(torch.arange(n).repeat(M, 1), n, identity=True)

    @classmethod
    def apart(cls, M: int, n: int) -> Alignment:
        """Every model's channels kept side by side: model m's channel i is m * n + i."""
        return cls(torch.arange(M * n).reshape(M, n), M * n, kept_apart=True)

    def U(self, m: int) -> torch.Tensor:
        """One-hot membership of model m's channels (n, k), float64."""
        n = self.labels.shape[1]
        u = torch.zeros(n, self.k, dtype=F64)
        u[torch.arange(n), self.labels[m]] = 1.0
        return u

    def P(self, m: int) -> torch.Tensor:
        """Model m's share of each merged channel's mean (k, n): diag(1/N) U_m^T."""
        counts = torch.bincount(self.labels.flatten(), minlength=self.k).to(F64)
        return self.U(m).t() / counts.clamp_min(1.0)[:, None]


# ----------------------------------------------------------------------------- validation
def _check_models(models) -> list[nn.Module]:
    if isinstance(models, nn.Module) or not isinstance(models, Sequence):
        raise TypeError(
            f"models must be a list of at least two torch.nn.Modules, got {type(models).__name__}"
        )
    models = list(models)
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{i}] must be a torch.nn.Module, got {type(m).__name__}")
    if len(models) < 2:
        raise ValueError(f"models must hold at least two models to merge, got {len(models)}")
    ref = models[0]
    ref_sd = ref.state_dict()
    for i, m in enumerate(models[1:], 1):
        if type(m) is not type(ref):
            raise ValueError(
                f"models[{i}] is a {type(m).__name__}, models[0] a {type(ref).__name__}: "
                "merging needs one architecture"
            )
        sd = m.state_dict()
        missing = sorted(set(ref_sd) ^ set(sd))
        if missing:
            raise ValueError(
                f"models[{i}] and models[0] differ in tensors: {missing[0]!r} is only in one"
            )
        for key, t in ref_sd.items():
            if tuple(sd[key].shape) != tuple(t.shape):
                raise ValueError(
                    f"models[{i}] tensor {key!r} has shape {tuple(sd[key].shape)}, "
                    f"models[0] has {tuple(t.shape)}: widths differ"
                )
            if sd[key].dtype != t.dtype:
                raise ValueError(
                    f"models[{i}] tensor {key!r} is {sd[key].dtype}, models[0]'s is {t.dtype}"
                )
    for i, m in enumerate(models):
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if t.is_meta:
                raise ValueError(f"models[{i}] tensor {name!r} is on the meta device")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"models[{i}] tensor {name!r} contains NaN or inf")
    return models


def _signature(groups: list[ChannelGroup]) -> list[tuple]:
    return [
        (g.name, g.size, tuple(g.producers), tuple(g.channel_ops), tuple(g.consumers),
         tuple(g.channel_params), bool(g.frozen_reasons))
        for g in groups
    ]  # fmt: skip


def _supported(g: ChannelGroup) -> str | None:
    """Why a foldable group is merged by plain averaging instead (None: it is aligned)."""
    if g.head_size > 1:
        return "attention heads are not aligned across models yet"
    if g.align > 1:
        return "grouped convolutions are not aligned across models yet"
    return None


# ----------------------------------------------------------------------------- tensor maps
def _rows(P: torch.Tensor, t: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Apply (k, n) to axis ``axis`` of ``t`` (float64)."""
    moved = t.movedim(axis, 0)
    out = (P @ moved.reshape(moved.shape[0], -1)).reshape((P.shape[0],) + moved.shape[1:])
    return out.movedim(0, axis)


def _columns(
    w: torch.Tensor, segs: list[tuple[Alignment, Consumer]], m: int, n_of: dict[int, int]
) -> torch.Tensor:
    """Map the input columns of weight ``w`` (out, in, *kernel) of model m by U_m per segment."""
    out, rest = w.shape[0], tuple(w.shape[2:])
    s = math.prod(rest) if rest else 1
    W = w.reshape(out, -1, s)
    pieces, pos = [], 0
    for al, cons in sorted(segs, key=lambda ac: ac[1].offset):
        n, r = n_of[id(al)], cons.repeat
        lo, hi = cons.offset * r, (cons.offset + n) * r
        pieces.append(W[:, pos:lo])
        seg = W[:, lo:hi].reshape(out, n, r, s)
        pieces.append(torch.einsum("onrs,nk->okrs", seg, al.U(m)).reshape(out, al.k * r, s))
        pos = hi
    pieces.append(W[:, pos:])
    return torch.cat(pieces, 1).reshape((out, -1) + rest)


class _Layout:
    """Which axes of which tensors each group indexes, for the groups that are aligned."""

    def __init__(self, groups: list[ChannelGroup], aligns: dict[str, Alignment]) -> None:
        self.row_of: dict[tuple[str, str], tuple[ChannelGroup, int]] = {}
        self.cols_of: dict[str, list[tuple[ChannelGroup, Consumer]]] = {}
        self.bn_group: dict[str, ChannelGroup] = {}
        self.producer_group: dict[str, ChannelGroup] = {}
        for g in groups:
            for p in g.producers:
                self.producer_group[p] = g
            if aligns[g.name].identity:
                continue
            for p in g.producers:
                self.row_of[(p, "weight")] = (g, 0)
                self.row_of[(p, "bias")] = (g, 0)
            for c in g.channel_ops:
                for t in ("weight", "bias", "running_mean", "running_var"):
                    self.row_of[(c, t)] = (g, 0)
                self.bn_group[c] = g
            for cp in g.channel_params:
                self.row_of[(cp.module, cp.tensor)] = (g, cp.axis)
            for cons in g.consumers:
                self.cols_of.setdefault(cons.module, []).append((g, cons))


def _merged_state(
    models: list[nn.Module], groups: list[ChannelGroup], aligns: dict[str, Alignment]
) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {tensor: merged value}} for every floating parameter and buffer (see module doc)."""
    M = len(models)
    lay = _Layout(groups, aligns)
    n_of = {id(aligns[g.name]): g.size for g in groups}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for mname, mod in models[0].named_modules():
        own = list(mod._parameters.items()) + list(mod._buffers.items())
        for tname, t0 in own:
            if t0 is None or not t0.is_floating_point():
                continue
            row = lay.row_of.get((mname, tname))
            segs = lay.cols_of.get(mname, []) if tname == "weight" else []
            bn = isinstance(mod, nn.modules.batchnorm._BatchNorm) and mname in lay.bn_group
            total = torch.zeros((), dtype=F64)
            for m, model in enumerate(models):
                t = getattr(get_module(model, mname), tname).detach().to(F64)
                if bn and tname == "running_var":
                    t = 1.0 / torch.sqrt(t + mod.eps)  # merged through the mean of 1/sigma
                if segs:
                    t = _columns(t, [(aligns[g.name], c) for g, c in segs], m, n_of)
                if row is not None:
                    g, axis = row
                    t = _rows(aligns[g.name].P(m), t, axis)
                else:
                    t = t / M
                total = total + t
            if bn and tname == "running_var":
                total = total.pow(-2) - mod.eps
            state.setdefault(mname, {})[tname] = total.to(t0.dtype)
    return state


# ----------------------------------------------------------------------------- features
def _features(
    models: list[nn.Module],
    g: ChannelGroup,
    aligns: dict[str, Alignment],
    lay: _Layout,
    decided: set[str] | None,
    consumed: dict[str, list[tuple[ChannelGroup, Consumer]]],
) -> torch.Tensor | None:
    """Stacked features (M * n, d) of group ``g``'s channels in merged coordinates.

    With ``decided`` given (the first pass) only parts comparable across models are used:
    producers whose inputs all come from decided groups, consumers whose rows do; None when
    nothing is comparable yet.
    """
    M, n = len(models), g.size

    def ready(h: ChannelGroup) -> bool:
        return decided is None or h.name in decided

    blocks: list[torch.Tensor] = []
    for m, model in enumerate(models):
        cols: list[torch.Tensor] = []
        for p in g.producers:
            segs = consumed.get(p, [])
            if not all(ready(h) for h, _ in segs):
                continue
            mod = get_module(model, p)
            w = mod.weight.detach().to(F64)
            live = [(aligns[h.name], c) for h, c in segs if not aligns[h.name].identity]
            if live:
                n_of = {id(aligns[h.name]): h.size for h, _ in segs}
                w = _columns(w, live, m, n_of)
            cols.append(w.reshape(n, -1))
            if mod.bias is not None:
                cols.append(mod.bias.detach().to(F64)[:, None])
        for c in g.channel_ops:
            mod = get_module(model, c)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                if mod.weight is not None:
                    cols += [mod.weight.detach()[:, None], mod.bias.detach()[:, None]]
                if mod.running_var is not None:
                    sig = torch.sqrt(mod.running_var.detach().to(F64) + mod.eps)
                    cols += [mod.running_mean.detach()[:, None], (1.0 / sig)[:, None]]
            else:
                cols.append(mod.weight.detach().reshape(n, -1))
                if getattr(mod, "bias", None) is not None:
                    cols.append(mod.bias.detach()[:, None])
        for cp in g.channel_params:
            t = getattr(get_module(model, cp.module), cp.tensor).detach()
            cols.append(t.movedim(cp.axis, 0).reshape(n, -1))
        for cons in g.consumers:
            w = get_module(model, cons.module).weight.detach().to(F64)
            h = lay.producer_group.get(cons.module)
            if h is not None and not ready(h):
                continue  # its rows are still in each model's own order
            if h is not None and aligns[h.name].kept_apart:
                continue  # rows kept apart per model (separate heads): nothing to compare
            if h is not None and not aligns[h.name].identity:
                w = _rows(M * aligns[h.name].P(m), w)
            cols.append(consumer_columns(w, g, cons))
        if not cols:
            return None
        blocks.append(torch.cat([c.to(F64) for c in cols], 1))
    return torch.cat(blocks, 0)


def _activations(
    models: list[nn.Module], groups: list[ChannelGroup], batch: torch.Tensor
) -> dict[str, torch.Tensor]:
    """ZipIt!'s features: each group's channel activations on ``batch``, (M * n, samples).

    A channel's samples are its values at every position of every module writing it (the
    group's BatchNorms when it has some, else its producers), on the original models.
    """
    per_model: list[dict[str, list[torch.Tensor]]] = []
    for model in models:
        got: dict[str, list[torch.Tensor]] = {g.name: [] for g in groups}
        handles = []

        def hook(g: ChannelGroup, got: dict[str, list[torch.Tensor]] = got):
            def f(mod, inp, out):
                axis = 1 if out.dim() > 2 and not isinstance(mod, nn.Linear) else out.dim() - 1
                got[g.name].append(out.detach().to(F64).movedim(axis, 0).reshape(g.size, -1))

            return f

        for g in groups:
            bns = [
                c
                for c in g.channel_ops
                if isinstance(get_module(model, c), nn.modules.batchnorm._BatchNorm)
            ]
            for name in bns or g.producers:
                handles.append(get_module(model, name).register_forward_hook(hook(g)))
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(batch)
        finally:
            for h in handles:
                h.remove()
            model.train(was)
        per_model.append(got)
    return {g.name: torch.cat([torch.cat(pm[g.name], 1) for pm in per_model], 0) for g in groups}


# ----------------------------------------------------------------------------- alignment
def _solve(
    method: str,
    X: torch.Tensor | None,
    sim: torch.Tensor | None,
    M: int,
    n: int,
    k: int,
    config: MergeConfig,
    seed: int,
) -> tuple[torch.Tensor, float]:
    if method == "fold":
        return kmeans_labels(X, k, seed=seed, n_init=config.n_init, max_iter=config.max_iter)
    if method == "weight-matching":
        return lap_labels(X, n)
    return zipit_labels(sim if sim is not None else cosine_similarity(X), k, M)


def _align(
    models: list[nn.Module],
    groups: list[ChannelGroup],
    todo: list[ChannelGroup],
    aligns: dict[str, Alignment],
    widths: dict[str, int],
    config: MergeConfig,
    sims: dict[str, torch.Tensor] | None,
) -> tuple[int, dict[str, float]]:
    """Fill ``aligns`` for the groups in ``todo``; returns (passes run, cost per group)."""
    M = len(models)
    consumed: dict[str, list[tuple[ChannelGroup, Consumer]]] = {}
    for g in groups:
        for c in g.consumers:
            consumed.setdefault(c.module, []).append((g, c))
    costs: dict[str, float] = {}
    index = {g.name: i for i, g in enumerate(groups)}

    def update(g: ChannelGroup, decided: set[str] | None) -> bool:
        """Re-solve g; True when its partition changed. Refuses (None features) in pass 1."""
        lay = _Layout(groups, aligns)
        sim = sims.get(g.name) if sims is not None else None
        X = None if sim is not None else _features(models, g, aligns, lay, decided, consumed)
        if X is None and sim is None:
            return False
        labels, cost = _solve(
            config.method, X, sim, M, g.size, widths[g.name], config, config.seed + index[g.name]
        )
        new = Alignment(labels.reshape(M, g.size), widths[g.name])
        old = aligns[g.name]
        changed = old.identity or not torch.equal(old.labels, new.labels)
        aligns[g.name] = new
        costs[g.name] = cost
        return changed

    # Pass 1: graph order, comparable features only; a group with none waits for the others.
    decided = {g.name for g in groups if g.name not in {t.name for t in todo}}
    waiting = list(todo)
    while waiting:
        progressed = []
        for g in waiting:
            lay = _Layout(groups, aligns)
            if sims is None and _features(models, g, aligns, lay, decided, consumed) is None:
                continue
            update(g, decided)
            decided.add(g.name)
            progressed.append(g)
        if not progressed:  # nothing comparable: use everything, others as they stand
            for g in waiting:
                update(g, None)
                decided.add(g.name)
            break
        waiting = [g for g in waiting if g not in progressed]
    passes = 1
    if sims is not None:
        return passes, costs  # activation similarities do not depend on the other groups
    gen = torch.Generator().manual_seed(config.seed)
    while passes < config.max_passes:
        passes += 1
        order = torch.randperm(len(todo), generator=gen).tolist()
        changed = False
        for i in order:
            changed |= update(todo[i], None)
        if not changed:
            break
    return passes, costs


# ----------------------------------------------------------------------------- repair data
def synthesize_merge_batch(
    models: Sequence[nn.Module],
    input_shape: tuple[int, ...],
    config: DeepInversionConfig | None = None,
    *,
    progress: bool = False,
) -> torch.Tensor:
    """The Deep-Inversion batch of ``repair="dir"``: an equal share synthesised from each model.

    Model m contributes ``batch_size // M`` images (the first ``batch_size % M`` models one
    more), synthesised against its own BatchNorm statistics with seed ``config.seed + m``, so
    models trained on different data (disjoint label sets) are all represented. Merging with
    ``repair="data", data=synthesize_merge_batch(...)`` repairs exactly as ``repair="dir"``
    does, which lets one batch serve several merges of the same models.

    Args:
        models: the M models to be merged (not modified).
        input_shape: one input's shape, e.g. ``(C, H, W)``.
        config: synthesis settings (``batch_size`` is the total over all models).
        progress: show a progress bar per model.

    Returns:
        ``(batch_size, *input_shape)`` synthetic inputs, model 0's share first.

    Raises:
        ValueError: ``batch_size`` below 2 per model, or a model without BatchNorm.
    """
    config = config or DeepInversionConfig()
    M = len(models)
    if config.batch_size < 2 * M:
        raise ValueError(
            f"deep_inversion.batch_size must be at least 2 per model ({2 * M} for {M} models), "
            f"got {config.batch_size}"
        )
    shares = [config.batch_size // M + (1 if m < config.batch_size % M else 0) for m in range(M)]
    parts = [
        synthesize(
            model,
            tuple(input_shape),
            dataclasses.replace(config, batch_size=b, seed=config.seed + m),
            progress=progress,
        )
        for m, (model, b) in enumerate(zip(models, shares))
    ]
    return torch.cat(parts, 0)


def _output_groups(groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """The groups holding the model's outputs, checked to be written by Linear/conv rows only."""
    out = [g for g in groups if "model output" in g.frozen_reasons]
    if not out:
        raise ValueError("outputs='concat': the tracer found no model output channels")
    for g in out:
        if not g.producers or g.channel_ops or g.channel_params or g.consumers:
            raise ValueError(
                f"outputs='concat' needs every model output written directly by Linear/conv "
                f"layers; {g.name!r} is also read or normalised inside the model"
            )
    return out


# ----------------------------------------------------------------------------- entry point
def _check_batch(data, example: tuple[torch.Tensor, ...]) -> torch.Tensor:
    try:
        batch = collect_inputs(data)
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise type(e)(msg if "data" in msg else f"data: {msg}") from None
    if batch.dim() == 0 or batch.shape[0] < 2:
        raise ValueError(f"data must hold at least 2 samples, got shape {tuple(batch.shape)}")
    ex = example[0]
    if tuple(batch.shape[1:]) != tuple(ex.shape[1:]) or batch.dtype != ex.dtype:
        raise ValueError(
            f"data must be ({', '.join(['N', *map(str, ex.shape[1:])])}) {ex.dtype} like the "
            f"model's inputs, got {tuple(batch.shape)} {batch.dtype}"
        )
    if batch.is_floating_point() and not bool(torch.isfinite(batch).all()):
        raise ValueError("data contains NaN or inf")
    return batch


def merge(
    models: Sequence[nn.Module],
    config: MergeConfig | None = None,
    *,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    data=None,
    progress: bool = False,
) -> tuple[nn.Module, Report]:
    """Merge two or more models of one architecture into one new model.

    Args:
        models: M >= 2 models with identical architecture and widths (traced CNNs / MLPs).
            They are not modified; the result is a deep copy of ``models[0]`` with merged
            tensors.
        config: the method, repair, width and seed (default ``MergeConfig()``: fold, no repair,
            one model's width).
        example_inputs: an input batch (N, ...) for tracing; inferred from the first layer
            when None.
        data: input batches (N, ...) for ``repair="data"`` and for ZipIt!'s activation
            correlations (a Tensor, a list of Tensors or (x, y) pairs, or a DataLoader; at most
            1024 samples). ``method="zipit"`` without data matches on weight features.
        progress: show Deep Inversion progress.

    Returns:
        (merged model, Report). ``Report.groups`` holds every aligned group with
        ``labels`` = the merged channel of each stacked channel (model 0's n, then model 1's,
        ...); ``Report.extra`` the method, models, passes, features used and the fraction of
        merged channels holding members of more than one model. With ``outputs="concat"`` the
        merged model maps (N, ...) to (N, M * n_out): model m's outputs in columns
        ``m * n_out ... (m + 1) * n_out - 1``.

    Raises:
        TypeError: models / config / example_inputs of the wrong type.
        ValueError: fewer than two models, different architectures or widths (the first
            mismatch named), NaN / inf weights, a width the groups cannot take, missing or
            unusable ``data``, repair="dir" without BatchNorm, outputs="concat" on outputs not
            written directly by Linear/conv layers. All before anything is built.
    """
    t0 = time.perf_counter()
    if config is None:
        config = MergeConfig()
    if not isinstance(config, MergeConfig):
        raise TypeError(f"config must be a netfold.MergeConfig, got {type(config).__name__}")
    models = _check_models(models)
    M = len(models)
    if config.width > M:
        raise ValueError(f"width must be at most the number of models ({M}), got {config.width}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if example_inputs is None:
        example_inputs = infer_example_inputs(models[0])
    example_inputs = tuple(example_inputs)
    if not example_inputs or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError("example_inputs must be a Tensor or a non-empty sequence of Tensors")
    if config.repair == "data" and data is None:
        raise ValueError("repair='data' needs calibration inputs: pass data=...")
    if data is not None and config.repair != "data" and config.method != "zipit":
        raise ValueError(
            f"data= is used by repair='data' and method='zipit' only; method={config.method!r} "
            f"with repair={config.repair!r} would ignore it"
        )
    if config.repair == "dir" and not has_batchnorm(models[0]):
        raise ValueError("repair='dir' needs BatchNorm layers (Deep Inversion matches them)")
    if config.repair == "dir" and config.deep_inversion.batch_size < 2 * M:
        raise ValueError(
            f"repair='dir' synthesises at least 2 inputs per model: deep_inversion.batch_size "
            f"must be >= {2 * M} for {M} models, got {config.deep_inversion.batch_size}"
        )
    batch = _check_batch(data, example_inputs) if data is not None else None

    groups = find_groups(models[0], example_inputs)
    heads = {g.name for g in _output_groups(groups)} if config.outputs == "concat" else set()
    sig = _signature(groups)
    for i, m in enumerate(models[1:], 1):
        other = _signature(find_groups(m, example_inputs))
        if other != sig:
            bad = next((a, b) for a, b in zip(sig + [None], other + [None]) if a != b)
            raise ValueError(
                f"models[{i}] has other channel groups than models[0] "
                f"(first difference: {bad[1] and bad[1][0]!r} vs {bad[0] and bad[0][0]!r})"
            )

    warnings: list[str] = []
    aligns: dict[str, Alignment] = {}
    todo: list[ChannelGroup] = []
    apart: list[str] = []
    widths: dict[str, int] = {}
    foldable = [g for g in groups if g.foldable]
    zipped = foldable if config.zip_layers is None else foldable[: config.zip_layers]
    for g in groups:
        why = _supported(g) if g.foldable else None
        if g.name in heads:
            aligns[g.name] = Alignment.apart(M, g.size)  # model m's outputs in block m
        elif not g.foldable or config.method == "average" or why:
            aligns[g.name] = Alignment.same(M, g.size)
            if why:
                warnings.append(f"{g.name}: {why}; averaged channel by channel")
        elif g not in zipped:
            aligns[g.name] = Alignment.apart(M, g.size)
            apart.append(g.name)
        else:
            aligns[g.name] = Alignment.same(M, g.size)
            widths[g.name] = max(1, min(M * g.size, int(round(config.width * g.size))))
            todo.append(g)

    sims = None
    features = "none" if config.method == "average" else "weights"
    if config.method == "zipit" and todo:
        if batch is not None:
            acts = _activations(models, todo, batch)
            sims = {name: correlation(a) for name, a in acts.items()}
            features = "activations"
        else:
            warnings.append(
                "zipit without data: channels matched on weight features (cosine similarity) "
                "instead of activation correlations"
            )
    passes, costs = _align(models, groups, todo, aligns, widths, config, sims) if todo else (0, {})

    state = _merged_state(models, groups, aligns)
    result = copy.deepcopy(models[0])
    apply_tensors(result, state)

    if config.repair != "none":
        if config.repair == "dir":
            batch = synthesize_merge_batch(
                models, tuple(example_inputs[0].shape[1:]), config.deep_inversion,
                progress=progress,
            )  # fmt: skip
        targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # The outputs are never corrected (as when they are averaged): only the hidden layers.
        free = [
            (g, p)
            for g in groups
            if not aligns[g.name].identity and g.name not in heads
            for p in g.producers
        ]
        free = [(g, p) for g, p in free if p not in g.bn_of]
        if free:
            stats = [producer_stats(m, [p for _, p in free], batch) for m in models]
            for g, p in free:
                al = aligns[g.name]
                mu = sum(al.P(m) @ stats[m][p][0] for m in range(M))
                sd = sum(al.P(m) @ stats[m][p][1] for m in range(M))
                targets[p] = (mu, sd)
        repair_with_batch(result, batch, targets, reset_bn=True)

    report = Report(
        operation="merge",
        params_before=count_params(models[0]),
        params_after=count_params(result),
        config=config.to_dict(),
        warnings=warnings,
    )
    cross = []
    for g in todo:
        al = aligns[g.name]
        report.groups.append(
            GroupReport(
                g.name, g.size, al.k, g.modules, costs.get(g.name), al.labels.flatten().tolist()
            )
        )
        owners = torch.zeros(al.k, M, dtype=torch.bool)
        for m in range(M):
            owners[al.labels[m], m] = True
        cross.append(float((owners.sum(1) > 1).to(F64).mean()))
    for g in groups:
        if not g.foldable and g.producers:
            report.skipped.append((g.name, "; ".join(g.frozen_reasons)))
    report.extra.update(
        method=config.method,
        outputs=config.outputs,
        models=M,
        passes=passes,
        features=features,
        kept_apart=apart,
        cross_model_fraction=sum(cross) / len(cross) if cross else 0.0,
    )
    report.seconds = time.perf_counter() - t0
    return result, report
