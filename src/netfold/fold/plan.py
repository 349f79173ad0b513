"""Width planning: how many channels each group keeps (ratio, ratios, target, allocation).

One ratio -> width rule (:func:`width_for`), one parameter count after a plan
(:func:`params_after`), one bisection for ``target_sparsity`` (:func:`bisect_ratio`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fnmatch import fnmatch

import torch.nn as nn
from tqdm.auto import tqdm

from ..config import FoldConfig
from ..eval.cost import count_params
from ..graph.groups import ChannelGroup
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


def _matches(g: ChannelGroup, pattern: str) -> bool:
    return fnmatch(g.name, pattern) or any(fnmatch(m, pattern) for m in _owner_modules(g))


def group_ratio(g: ChannelGroup, config: FoldConfig, default: float | None = None) -> float | None:
    """The ratio that applies to group ``g`` (None when it is skipped)."""
    return config.ratio_for(g.name, _owner_modules(g), default)


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

    def sparsity(r: float) -> float:
        return 1.0 - params_after(model, groups, _widths_at(groups, config, r)) / total

    max_sp = sparsity(MAX_RATIO)
    if target > max_sp + 1e-9:
        raise ValueError(
            f"target_sparsity {target:.3f} is unreachable: folding every foldable group to "
            f"min_channels={config.min_channels} removes only {max_sp:.3f} of the parameters"
        )
    return bisect_ratio(
        lambda r: params_after(model, groups, _widths_at(groups, config, r)),
        total * (1.0 - target),
    )


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
