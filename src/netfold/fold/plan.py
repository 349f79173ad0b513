"""Width planning: how many channels each group keeps (ratio, ratios, target, allocation).

The one planner of every fold (traced CNNs / MLPs, encoders and decoder LLMs): one ratio ->
width rule (:func:`width_for`, :func:`group_width` for channel and head groups alike), one
parameter count after a plan (:func:`params_after`, through the
:class:`~netfold.fold.views.Overlay` where projections are fused or transposed), one bisection
for ``target_sparsity`` (:func:`bisect_ratio`); cost allocations in :mod:`netfold.fold.allocate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fnmatch import fnmatch

import torch.nn as nn
from tqdm.auto import tqdm

from ..config import FoldConfig
from ..eval.cost import count_params
from ..graph.groups import ChannelGroup, HeadGroup
from ..graph.surgery import get_module
from .allocate import ALLOCATION_SPREAD, GRID, cost_curve, threshold_allocation
from .checks import _owner_modules


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


def group_width(g: ChannelGroup | HeadGroup, ratio: float, config: FoldConfig) -> int:
    """Units group ``g`` keeps at ``ratio``: channels (:func:`width_for` with the group's head
    size), or for a :class:`~netfold.graph.groups.HeadGroup` clustering units (query heads per
    KV group or KV groups): round(n (1 - ratio)), at least one."""
    if isinstance(g, HeadGroup):
        return max(1, min(g.size, int(round(g.size * (1.0 - ratio)))))
    return width_for(g.size, ratio, config, g.head_size)


def _matches(g: ChannelGroup, pattern: str) -> bool:
    return fnmatch(g.name, pattern) or any(fnmatch(m, pattern) for m in _owner_modules(g))


def group_ratio(g: ChannelGroup, config: FoldConfig, default: float | None = None) -> float | None:
    """The ratio that applies to group ``g`` (None when it is skipped)."""
    return config.ratio_for(g.name, _owner_modules(g), default)


def _shrinks(g: ChannelGroup | HeadGroup, k: int):
    """(module, tensor, dim, new size or None, columns removed) for every tensor that indexes
    the group's channels when it keeps ``k`` units: producer / channel-op rows (dim 0) are set
    to the new width, consumer columns (dim 1) lose the removed ones."""
    if isinstance(g, HeadGroup):
        nq, nkv = g.heads_for(k)
        for m, n in ((g.q, nq), (g.k, nkv), (g.v, nkv)):
            for tname in ("weight", "bias"):
                yield m, tname, 0, n * g.head_dim, 0
        yield g.o, "weight", 1, None, (g.num_heads - nq) * g.head_dim
        return
    for m in _owner_modules(g):
        for tname in ("weight", "bias"):
            yield m, tname, 0, k, 0
    for c in g.consumers:
        # a consumer may read several groups side by side (torch.cat) or, as a grouped conv,
        # 1/groups of them per output: shrink only this group's columns
        yield c.module, "weight", 1, None, (g.size - k) * c.repeat // c.groups


def _new_shapes(
    view: nn.Module, groups: list, widths: dict[str, int]
) -> dict[tuple[str, str], tuple[nn.Parameter, list[int]]]:
    """{(module, tensor): (the parameter as ``view`` resolves it, its shape after the plan)}."""
    shapes: dict[tuple[str, str], tuple[nn.Parameter, list[int]]] = {}
    for g in groups:
        k = widths.get(g.name, g.size)
        if k == g.size:
            continue
        for mname, tname, dim, new, removed in _shrinks(g, k):
            key = (mname, tname)
            if key not in shapes:
                t = getattr(get_module(view, mname), tname, None)
                if not isinstance(t, nn.Parameter):
                    continue
                shapes[key] = (t, list(t.shape))
            s = shapes[key][1]
            s[dim] = new if new is not None else s[dim] - removed
    return shapes


def params_after(
    model: nn.Module,
    groups: list,
    widths: dict[str, int],
    view: nn.Module | None = None,
) -> int:
    """Parameter count of ``model`` once each group ``name`` keeps ``widths[name]`` units.

    The one parameter counter: channel groups (any producers, channel ops and consumers,
    grouped and concatenating consumers) and head groups (q/k/v rows, o columns).

    Args:
        model: the model.
        groups: :class:`~netfold.graph.groups.ChannelGroup` /
            :class:`~netfold.graph.groups.HeadGroup`; groups missing from ``widths`` keep
            their size.
        widths: {group name: units kept} (channels, or head-clustering units).
        view: where the groups' module names resolve (an
            :class:`~netfold.fold.views.Overlay` showing fused / transposed projections as
            Linear parts); default ``model``.
    """
    view = model if view is None else view
    shapes = _new_shapes(view, groups, widths)
    by_id: dict[int, tuple[str, str]] = {}
    for mname, mod in model.named_modules():
        for tname, p in mod._parameters.items():
            if p is not None and id(p) not in by_id:
                by_id[id(p)] = (mname, tname)
    total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        key = by_id.get(id(p))
        s = shapes.get(key) if key else None
        total += math.prod(s[1]) if s is not None and s[0] is p else p.numel()
    # parts of fused / transposed projections (the Overlay's own tensors): their change
    for t, s in shapes.values():
        if id(t) not in seen:
            total += math.prod(s) - t.numel()
    return total


def params_removed(
    model: nn.Module, g: ChannelGroup | HeadGroup, width: int, view: nn.Module | None = None
) -> int:
    """Parameters the group's own tensors lose when it keeps ``width`` units (0 at full width).

    Args:
        model: the model (``view``: as in :func:`params_after`).
        g: the group.
        width: units kept.
    """
    shapes = _new_shapes(model if view is None else view, [g], {g.name: width})
    return sum(t.numel() - math.prod(s) for t, s in shapes.values())


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
        return widths_at(groups, config, config.ratio)
    return widths_at(groups, config, _uniform_ratio(model, groups, config, config.target_sparsity))


RatioOf = Callable[..., "float | None"]


def widths_at(
    groups: list, config: FoldConfig, r: float | None, ratio_of: RatioOf = group_ratio
) -> dict[str, int]:
    """Widths of the foldable groups with ratio ``r`` wherever no per-group override or skip
    applies.

    Args:
        groups: channel and / or head groups.
        config: ``ratios`` / ``skip`` / ``min_channels`` / ``round_to``.
        r: the default ratio (None: ``config.ratio``).
        ratio_of: ``(group, config, default=) -> ratio or None`` (None: the group is skipped);
            decoders pass theirs, which also switches attention / MLP groups off.
    """
    out = {}
    for g in groups:
        if g.foldable:
            rr = ratio_of(g, config, default=r)
            if rr is not None:
                out[g.name] = _aligned(g, group_width(g, rr, config))
    return out


def explicit_widths(groups: list, widths: dict[str, int]) -> dict[str, int]:
    """Validated explicit widths ``{group name: channels, or query heads of a head group}``
    as units kept per group.

    Raises:
        ValueError: an unknown group name, or a width the group cannot meet.
    """
    by_name = {g.name: g for g in groups}
    out: dict[str, int] = {}
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


def _aligned(g: ChannelGroup | HeadGroup, k: int) -> int:
    """``k`` rounded to the nearest multiple of the group's conv groups (at least one each)."""
    align = getattr(g, "align", 1)
    if align == 1:
        return k
    return min(g.size, max(align, int(round(k / align)) * align))


def uniform_ratio(
    model: nn.Module,
    groups: list,
    config: FoldConfig,
    target_params: float,
    *,
    ratio_of: RatioOf = group_ratio,
    view: nn.Module | None = None,
) -> float:
    """The one ratio whose widths (:func:`widths_at`) come closest to ``target_params``
    parameters (:func:`bisect_ratio` over :func:`params_after`). Reachability is the caller's
    check (``params_at(MAX_RATIO)``)."""
    return bisect_ratio(
        lambda r: params_after(model, groups, widths_at(groups, config, r, ratio_of), view),
        target_params,
    )


MAX_RATIO = 1.0 - 1e-9


def bisect_ratio(
    params_at: Callable[[float], float], target_params: float, steps: int = 40
) -> float:
    """The ratio in [0, 1) whose plan comes closest to ``target_params`` parameters.

    The one bisection of every planner (traced groups and decoder groups alike):
    ``params_at(r)`` (parameters after folding every allowed group at ratio ``r``) is
    non-increasing in ``r``; ``steps`` halvings of [0, 1), keeping the closest ratio seen
    (ratio 0 included). Reachability is the caller's check.
    """
    lo, hi = 0.0, MAX_RATIO
    best_r, best_err = 0.0, abs(params_at(0.0) - target_params)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        p = params_at(mid)
        if abs(p - target_params) < best_err:
            best_r, best_err = mid, abs(p - target_params)
        if p > target_params:
            lo = mid
        else:
            hi = mid
    return best_r


def _uniform_ratio(
    model: nn.Module, groups: list[ChannelGroup], config: FoldConfig, target: float
) -> float:
    """The one ratio whose widths come closest to parameter sparsity ``target`` (bisection)."""
    total = count_params(model)
    max_sp = 1.0 - params_after(model, groups, widths_at(groups, config, MAX_RATIO)) / total
    if target > max_sp + 1e-9:
        raise ValueError(
            f"target_sparsity {target:.3f} is unreachable: folding every foldable group to "
            f"min_channels={config.min_channels} removes only {max_sp:.3f} of the parameters"
        )
    return uniform_ratio(model, groups, config, total * (1.0 - target))


def _cost_widths(
    model: nn.Module, groups: list[ChannelGroup], config: FoldConfig, mode: str, progress: bool
) -> dict[str, int]:
    """allocation="cost": equal relative folding cost across groups, at the parameter budget."""
    total = count_params(model)
    if config.target_sparsity is None:
        r_u = config.ratio  # the budget is what this uniform ratio gives
        target_params = params_after(model, groups, widths_at(groups, config, r_u))
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
