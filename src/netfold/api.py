"""netfold.fold: cluster similar channels, merge them, repair the statistics, in place.

The whole plan (groups, widths, clusterings, new tensors) is computed and validated before the
model is touched; the write itself is rolled back if anything fails after it started.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from fnmatch import fnmatch

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .config import PRUNE_METHODS, FoldConfig
from .eval.cost import count_flops, count_params
from .fold.allocate import ALLOCATION_SPREAD, GRID, cost_curve, threshold_allocation
from .fold.deep_inversion import synthesize
from .fold.merge import ColumnShifts, TensorState, merge_group, merge_matrices
from .fold.methods import GroupPlan, plan_group
from .fold.repair import collect_inputs, producer_stats, repair_with_batch
from .fold.stats_repair import repair_maps, stats_repair_state
from .graph.groups import ChannelGroup
from .graph.surgery import Snapshot, apply_tensors, get_module
from .graph.trace import find_groups, infer_example_inputs
from .report import Report


def check_materialised(model: nn.Module) -> None:
    """Raise ValueError naming the first parameter or buffer on the meta device (no values)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise ValueError(
                f"model weights are not materialised: {name!r} is on the meta device; load "
                "real weights first (e.g. model.to_empty(device='cpu') then load_state_dict)"
            )


def check_finite(model: nn.Module) -> None:
    """Raise ValueError naming the first parameter or buffer holding NaN or inf (or on meta)."""
    check_materialised(model)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {name!r} contains NaN or inf; refusing to fold")


def check_patterns(
    groups: Sequence[ChannelGroup], config: FoldConfig, modules_of=None, foldable_only=True
) -> None:
    """Raise ValueError when a ``ratios`` / ``skip`` pattern of ``config`` matches no group.

    A pattern that matches nothing is almost always a typo or a name from another model; left
    alone it would fold (or keep) everything silently. ``ratios`` patterns must match a group
    that can fold; ``skip`` patterns any group.

    Args:
        groups: the model's channel groups (after tracing).
        config: the FoldConfig.
        modules_of: ``g -> module names`` the patterns are matched against besides ``g.name``
            (default: the group's producers and channel ops, as :func:`group_ratio` does).
        foldable_only: match ``ratios`` against foldable groups only.
    """
    if not config.ratios and not config.skip:
        return
    modules_of = modules_of or _owner_modules
    every = [[g.name, *modules_of(g)] for g in groups]
    can_fold = [[g.name, *modules_of(g)] for g in groups if g.foldable or not foldable_only]
    bad = [fp for fp in config.patterns_without_match(can_fold) if fp[0] == "ratios"]
    bad += [fp for fp in config.patterns_without_match(every) if fp[0] == "skip"]
    if bad:
        field, pattern = bad[0]
        shown = [g.name for g in groups if g.foldable] or [g.name for g in groups]
        more = f", ... ({len(shown)} in all)" if len(shown) > 6 else ""
        raise ValueError(
            f"{field} pattern {pattern!r} matches no "
            f"{'foldable ' if field == 'ratios' and foldable_only else ''}group of this model; "
            f"groups: {', '.join(shown[:6])}{more}"
        )


def _fold_decoder(model: nn.Module, config: FoldConfig, **kw) -> Report:
    from .families.llama import fold_decoder

    return fold_decoder(model, config, **kw)


def _fold_encoder(
    model: nn.Module,
    config: FoldConfig,
    *,
    data=None,
    widths: dict[str, int] | None = None,
    groups: list[ChannelGroup] | None = None,
    progress: bool = False,
) -> Report:
    from .families.encoders import fold_encoder

    if data is not None:
        raise ValueError(
            f"data= is not used when folding encoders ({type(model).__name__}): their repair "
            "is data-free ('ar' or 'none'); drop data="
        )
    if widths is not None:
        raise ValueError("widths= is supported for decoder LLMs only; use ratios= patterns")
    return fold_encoder(model, config, groups=groups, progress=progress)


def hf_families() -> dict[str, object]:
    """Hugging Face ``model_type`` -> fold function, from the families' own tables."""
    from .families.encoders import SUPPORTED_MODEL_TYPES
    from .families.llama import SUPPORTED

    return {
        **{t: _fold_decoder for t in SUPPORTED},
        **{t: _fold_encoder for t in SUPPORTED_MODEL_TYPES},
    }


def model_family(model: nn.Module):
    """The fold function for a Hugging Face ``model`` (None for models the tracer handles).

    Raises:
        ValueError: a Hugging Face model whose ``config.model_type`` no family supports.
    """
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(mt, str):
        return None
    families = hf_families()
    if mt not in families:
        raise ValueError(
            f"unsupported architecture {type(model).__name__} (Hugging Face model_type={mt!r}); "
            f"netfold folds model types {sorted(families)}"
        )
    return families[mt]


def _first_layer_shape(model: nn.Module) -> str:
    """What the first Linear / Conv expects, for error messages: "(N, 3, H, W)", "(N, ..., 64)"."""
    first = next(
        (m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))),
        None,
    )
    if isinstance(first, nn.Linear):
        return f"(N, ..., {first.in_features}) (first layer: Linear({first.in_features}, ...))"
    if isinstance(first, nn.modules.conv._ConvNd):
        spatial = ", ".join("HWD"[: len(first.kernel_size)])
        return f"(N, {first.in_channels}, {spatial}) (first layer: {type(first).__name__})"
    return "the model's input shape"


def check_data(
    model: nn.Module, data, example_inputs: tuple[torch.Tensor, ...] | None
) -> torch.Tensor:
    """Collect ``data`` into one (N, ...) batch and check it fits ``model``, or raise ValueError.

    Empty, NaN / inf, a dtype other than the model's, or a shape other than ``example_inputs``'
    (or, without them, one the model cannot run on: tried once in eval mode, no gradients,
    training mode restored) are refused with a message naming ``data``.

    Returns:
        The calibration batch (N, ...), at most 1024 samples.
    """
    try:
        batch = collect_inputs(data)
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise type(e)(msg if "data" in msg else f"data: {msg}") from None
    if batch.dim() == 0 or batch.shape[0] == 0 or batch.numel() == 0:
        raise ValueError(f"data is empty (shape {tuple(batch.shape)}): no calibration samples")
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    want = example_inputs[0].dtype if example_inputs else (p.dtype if p is not None else None)
    if want is not None and batch.dtype != want:
        raise ValueError(f"data must have dtype {want} (the model's inputs), got {batch.dtype}")
    if batch.is_floating_point() and not bool(torch.isfinite(batch).all()):
        raise ValueError("data contains NaN or inf; calibration inputs must be finite")
    if example_inputs:
        ex = example_inputs[0]
        if tuple(batch.shape[1:]) != tuple(ex.shape[1:]):
            raise ValueError(
                f"data must have shape (N, {', '.join(map(str, ex.shape[1:]))}) like "
                f"example_inputs, got {tuple(batch.shape)}"
            )
        return batch
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(batch[:2])
    except Exception as e:  # noqa: BLE001 - any failure here means the data does not fit
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"data of shape {tuple(batch.shape)} does not fit the model, which expects "
            f"{_first_layer_shape(model)}: {reason}"
        ) from None
    finally:
        model.train(was)
    return batch


def _owner_modules(g: ChannelGroup) -> list[str]:
    return g.producers + g.channel_ops


def _matches(g: ChannelGroup, pattern: str) -> bool:
    return fnmatch(g.name, pattern) or any(fnmatch(m, pattern) for m in _owner_modules(g))


def group_ratio(g: ChannelGroup, config: FoldConfig, default: float | None = None) -> float | None:
    """The ratio that applies to group ``g`` (None when it is skipped)."""
    return config.ratio_for(g.name, _owner_modules(g), default)


def width_for(n: int, ratio: float, config: FoldConfig, head_size: int = 1) -> int:
    """k = round(n * (1 - ratio)), at least ``min_channels`` (and one head), at most n.

    With ``config.round_to`` > 1 a channel group's k is rounded to the nearest multiple of it
    (at least one multiple; a group narrower than ``round_to`` keeps its width); a ratio of 0
    stays the identity.
    """
    if head_size > 1:
        heads = n // head_size
        kh = max(1, int(round(heads * (1.0 - ratio))))
        return min(heads, kh) * head_size
    k = max(min(n, config.min_channels), min(n, int(round(n * (1.0 - ratio)))))
    q = config.round_to
    if q > 1 and k < n:
        k = max(q, int(round(k / q)) * q)
        if k < config.min_channels:
            k = -(-config.min_channels // q) * q
        k = min(n, k)
    return k


def params_after(model: nn.Module, groups: list[ChannelGroup], widths: dict[str, int]) -> int:
    """Parameter count of ``model`` once each group ``name`` has width ``widths[name]``."""
    shapes: dict[tuple[str, str], list[int]] = {}

    def shape(mname: str, tname: str) -> list[int] | None:
        key = (mname, tname)
        if key not in shapes:
            t = getattr(get_module(model, mname), tname, None)
            if not isinstance(t, nn.Parameter):
                return None
            shapes[key] = list(t.shape)
        return shapes[key]

    for g in groups:
        k = widths.get(g.name, g.size)
        if k == g.size:
            continue
        for m in _owner_modules(g):
            for tname in ("weight", "bias"):
                s = shape(m, tname)
                if s is not None:
                    s[0] = k
        for c in g.consumers:
            s = shape(c.module, "weight")
            if s is not None:
                # a consumer may read several groups side by side (torch.cat) or, as a grouped
                # conv, 1/groups of them per output: shrink only this group's columns
                s[1] -= (g.size - k) * c.repeat // c.groups
    total = 0
    seen: set[int] = set()
    by_id: dict[int, tuple[str, str]] = {}
    for mname, mod in model.named_modules():
        for tname, p in mod._parameters.items():
            if p is not None and id(p) not in by_id:
                by_id[id(p)] = (mname, tname)
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        key = by_id.get(id(p))
        s = shapes.get(key) if key else None
        total += math.prod(s) if s is not None else p.numel()
    return total


def plan_widths(
    model: nn.Module,
    groups: list[ChannelGroup],
    config: FoldConfig,
    *,
    mode: str = "naive",
    progress: bool = False,
) -> dict[str, int]:
    """Width k of every foldable group, from ratio / ratios / target_sparsity / allocation.

    ``mode`` is the clustering feature mode, used by ``allocation="cost"`` to measure each
    group's folding-cost curve.
    """
    if config.allocation == "cost":
        by_name = {g.name: g for g in groups}
        widths = _cost_widths(model, groups, config, mode, progress)
        return {n: _aligned(by_name[n], k) for n, k in widths.items()}
    if config.target_sparsity is None:
        return _widths_at(groups, config, config.ratio)
    return _widths_at(groups, config, _uniform_ratio(model, groups, config, config.target_sparsity))


def _widths_at(groups: list[ChannelGroup], config: FoldConfig, r: float) -> dict[str, int]:
    """Widths with ratio ``r`` wherever no per-group override or skip applies."""
    out = {}
    for g in groups:
        if g.foldable:
            rr = group_ratio(g, config, default=r)
            if rr is not None:
                out[g.name] = _aligned(g, width_for(g.size, rr, config, g.head_size))
    return out


def _aligned(g: ChannelGroup, k: int) -> int:
    """``k`` rounded to the nearest multiple of the group's conv groups (at least one each)."""
    if g.align == 1:
        return k
    return min(g.size, max(g.align, int(round(k / g.align)) * g.align))


def _uniform_ratio(
    model: nn.Module, groups: list[ChannelGroup], config: FoldConfig, target: float
) -> float:
    """The one ratio whose widths come closest to parameter sparsity ``target`` (bisection)."""
    total = count_params(model)

    def sparsity(r: float) -> float:
        return 1.0 - params_after(model, groups, _widths_at(groups, config, r)) / total

    hi_r = 1.0 - 1e-9
    max_sp = sparsity(hi_r)
    if target > max_sp + 1e-9:
        raise ValueError(
            f"target_sparsity {target:.3f} is unreachable: folding every foldable group to "
            f"min_channels={config.min_channels} removes only {max_sp:.3f} of the parameters"
        )
    lo, hi = 0.0, hi_r
    best_r, best_err = 0.0, abs(sparsity(0.0) - target)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        s = sparsity(mid)
        if abs(s - target) < best_err:
            best_r, best_err = mid, abs(s - target)
        if s < target:
            lo = mid
        else:
            hi = mid
    return best_r


def _cost_widths(
    model: nn.Module, groups: list[ChannelGroup], config: FoldConfig, mode: str, progress: bool
) -> dict[str, int]:
    """allocation="cost": equal relative folding cost across groups, at the parameter budget."""
    total = count_params(model)
    if config.target_sparsity is None:
        r_u = config.ratio  # the budget is what this uniform ratio gives
        target_params = params_after(model, groups, _widths_at(groups, config, r_u))
    else:
        target_params = int(round(total * (1.0 - config.target_sparsity)))
        r_u = _uniform_ratio(model, groups, config, config.target_sparsity)
    fixed: dict[str, int] = {}
    free: list[ChannelGroup] = []
    for g in groups:
        r = group_ratio(g, config) if g.foldable else None
        if r is None:
            continue
        if config.ratios and any(_matches(g, p) for p in config.ratios):
            fixed[g.name] = width_for(g.size, r, config, g.head_size)
        else:
            free.append(g)
    curves = {
        g.name: cost_curve(
            model, g, config, mode, lambda n, r, g=g: width_for(n, r, config, g.head_size)
        )
        for g in tqdm(free, desc="cost curves", disable=not progress, leave=False)
    }

    def params_fn(w: dict[str, int]) -> int:
        return params_after(model, groups, {**fixed, **w})

    # Each group stays within +-ALLOCATION_SPREAD of the uniform ratio meeting the same budget:
    # unbounded thresholds measured worse than uniform (docs/baselines.md).
    for g in free:
        c = curves[g.name]
        c.lo = width_for(g.size, min(r_u + ALLOCATION_SPREAD, 0.99), config, g.head_size)
        c.hi = width_for(g.size, max(r_u - ALLOCATION_SPREAD, 0.0), config, g.head_size)
    widths = threshold_allocation(curves, params_fn, target_params)
    reached = 1.0 - params_after(model, groups, {**fixed, **widths}) / total
    wanted = 1.0 - target_params / total
    if reached < wanted - 0.01:
        raise ValueError(
            f"target_sparsity {wanted:.3f} is unreachable with allocation='cost': with each "
            f"group at most {ALLOCATION_SPREAD} above the uniform ratio and below {max(GRID)}, "
            f"only {reached:.3f} can be removed"
        )
    return {**fixed, **widths}


def fold(
    model: nn.Module,
    config: FoldConfig | None = None,
    *,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    data=None,
    synthetic: torch.Tensor | None = None,
    groups: list[ChannelGroup] | None = None,
    progress: bool = False,
    widths: dict[str, int] | None = None,
) -> Report:
    """Fold ``model`` in place: cluster each channel group, merge, repair.

    Hugging Face models are dispatched on ``config.model_type`` (:data:`HF_FAMILIES`):
    Llama-family decoders (Llama, SmolLM2, Qwen2, Mistral) to
    :func:`netfold.families.llama.fold_decoder` (MLP channels and whole attention heads),
    encoders (BERT, RoBERTa, DistilBERT, ViT) to :func:`netfold.families.encoders.fold_encoder`.
    Any other model is traced with torch.fx.

    Args:
        model: a CNN / MLP (traced with torch.fx) in eval or train mode; its mode is kept.
        config: what to fold and how (default ``FoldConfig()``: ratio 0.5, k-means, Fold-AR).
        example_inputs: an input batch, e.g. (N, C, H, W), for tracing and FLOP counts;
            inferred from the first layer when None.
        data: calibration inputs for ``repair="data"``: a Tensor (N, ...) of the model's input
            shape and dtype, a list of Tensors or (x, y) pairs, or a DataLoader (at most 1024
            samples are used). Refused with any other repair (it would be ignored). Decoder
            LLMs: token ids (n, seqlen), see :func:`netfold.families.llama.fold_decoder`.
        synthetic: an already synthesised Deep-Inversion batch for ``repair="dir"`` (synthesis
            depends only on the original model, so sweeps can reuse one batch; other repairs
            ignore it, which lets a sweep pass the same arguments to every run).
        groups: precomputed channel groups (from :func:`netfold.graph.find_groups` on this same
            model), to skip tracing.
        progress: show progress bars.
        widths: decoder LLMs only: explicit widths ``{group name: channels or query heads}``.

    Returns:
        A :class:`Report` (parameters, FLOPs, widths per group, skipped groups, time).

    Raises:
        TypeError: config / model / example_inputs of the wrong type, or a model torch.fx
            cannot trace.
        ValueError: weights on the meta device or NaN/inf; missing ``data`` for
            repair="data", or ``data`` a repair would ignore; empty / non-finite ``data`` or
            ``data`` of another shape or dtype than the model's inputs; a ``ratios`` / ``skip``
            pattern that matches no group; an unsupported Hugging Face model type; an
            unreachable target. All raised before the model changes.
    """
    t0 = time.perf_counter()
    if config is None:
        config = FoldConfig()
    if not isinstance(config, FoldConfig):
        raise TypeError(f"config must be a netfold.FoldConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_materialised(model)
    family = model_family(model)
    if family is not None and config.repair == "stats":
        raise ValueError(
            f"repair='stats' supports traced CNNs / MLPs, not {type(model).__name__}; use 'ar'"
        )
    if family is not None:
        return family(model, config, data=data, widths=widths, groups=groups, progress=progress)
    if widths is not None:
        raise ValueError("widths= is supported for decoder LLMs only; use ratios= patterns")
    check_finite(model)
    if config.repair == "data" and data is None:
        raise ValueError(
            "repair='data' needs calibration inputs: pass data=... (a Tensor, batches or a DataLoader)"
        )
    if data is not None and config.repair != "data":
        why = "synthesises its own inputs" if config.repair == "dir" else "is data-free"
        raise ValueError(
            f"data= is only used by repair='data'; repair={config.repair!r} {why} and would "
            "ignore it (pass repair='data' to calibrate on it, or drop data=)"
        )
    if config.repair == "dir" and not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    ):
        raise ValueError(
            "repair='dir' needs BatchNorm layers (Deep Inversion matches their statistics)"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if example_inputs is not None:
        example_inputs = tuple(example_inputs)
        if not example_inputs or not all(isinstance(t, torch.Tensor) for t in example_inputs):
            raise TypeError("example_inputs must be a Tensor or a non-empty sequence of Tensors")
    calib = check_data(model, data, example_inputs) if data is not None else None
    if example_inputs is None:
        # Calibration data already showed which shape the model runs on; no need to guess.
        example_inputs = (calib[:2],) if calib is not None else infer_example_inputs(model)
    if groups is None:
        groups = find_groups(model, example_inputs)
    check_patterns(groups, config)
    mode = "ar" if config.repair == "ar" else "naive"
    widths = plan_widths(model, groups, config, mode=mode, progress=progress)
    params_before = count_params(model)
    one = tuple(t[:1] for t in example_inputs)  # FLOPs are reported per input sample
    flops_before = count_flops(model, one)

    todo = [g for g in groups if g.foldable and widths.get(g.name, g.size) < g.size]
    state: TensorState = {}
    plans: dict[str, GroupPlan] = {}
    for g in tqdm(todo, desc="clustering", disable=not progress, leave=False):
        plans[g.name] = plan_group(model, g, widths[g.name], config, mode)
    shifts: ColumnShifts = {}  # consumers of torch.cat read several groups side by side
    for g in todo:
        pl = plans[g.name]
        merge_group(state, model, g, pl.labels, pl.k, mode, pl.rule, shifts=shifts)

    # Everything that needs the ORIGINAL model happens before the write.
    batch = None
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if todo and config.repair in ("dir", "data"):
        if config.repair == "data":
            batch = calib
        else:
            batch = (
                synthetic
                if synthetic is not None
                else synthesize(
                    model,
                    tuple(example_inputs[0].shape[1:]),
                    config.deep_inversion,
                    progress=progress,
                )
            )
        free = [(g, p) for g in todo for p in g.producers if p not in g.bn_of]
        if free:
            stats = producer_stats(model, [p for _, p in free], batch)
            for g, p in free:
                pl = plans[g.name]
                A = merge_matrices(pl.labels, pl.k, pl.rule, torch.float64)[1]
                mu, sd = stats[p]
                targets[p] = (A @ mu, A @ sd)
    if todo and config.repair == "stats":  # predicted statistics join the merged tensors
        state = stats_repair_state(model, state, repair_maps(todo, plans), example_inputs)[0]

    touched = sorted(
        state.keys()
        | {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    )
    snap = Snapshot(model, touched)
    # Everything from the first write on runs under the snapshot: a failure in the write, the
    # repair, the checks or the report puts every touched tensor and attribute back.
    try:
        apply_tensors(model, state)
        if batch is not None:
            repair_with_batch(model, batch, targets, reset_bn=True)
        check_finite(model)
        report = Report(
            operation="prune" if config.method in PRUNE_METHODS else "fold",
            params_before=params_before,
            params_after=count_params(model),
            flops_before=flops_before,
            flops_after=count_flops(model, one) if todo else flops_before,
            config=config.to_dict(),
        )
        report.add_groups(
            groups,
            widths,
            {n: p.cost for n, p in plans.items()},
            {n: p.labels for n, p in plans.items()},
        )
    except BaseException:
        snap.restore()
        raise
    report.seconds = time.perf_counter() - t0
    return report
