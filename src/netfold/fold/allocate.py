"""Per-group budgets from folding-cost curves: the one allocation module of every fold.

Two allocations over measured curves: :func:`threshold_allocation` (one global threshold on
relative weight-space costs, traced CNNs / MLPs and encoders: ``allocation="cost"``) and
:func:`greedy_allocation` (least error per parameter removed, step by step; decoder LLMs, on
output errors measured from token ids by :func:`netfold.fold.decoder.mlp_error_curves`).

Threshold allocation (data-free): each group's width from its own folding-cost curve.

Uniform folding removes the same fraction of channels everywhere, although some layers hold
many near-duplicate channels and others hold none. From the weights alone, the relative cost

    e_g(k) = J_g(k) / ||X_g||_F^2,

the share of the group's coupled-weight energy that merging it to ``k`` channels discards (J
is the k-means folding cost of the method in use, X_g the group's feature matrix), says how
much a group can give. One global threshold ``t`` picks, in every group, the smallest width
with ``e_g(k) <= t``; ``t`` is bisected until the model meets the parameter budget. Groups thus
end with equal relative merge error instead of equal ratios.

The curve is measured on a grid of widths (ratios 0.1 ... 0.9, k-means with few restarts) and
interpolated linearly in k; widths below the 0.9-ratio point are never chosen, so no group
collapses to a handful of channels however cheap its curve looks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch.nn as nn

from ..config import MERGE_BASELINES, PRUNE_METHODS, FoldConfig
from ..graph.groups import ChannelGroup
from .merge import group_features
from .methods import plan_group

GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CURVE_N_INIT = 2
ALLOCATION_SPREAD = 0.15  # allocation="cost" keeps each group within +-0.15 of the uniform ratio


@dataclass
class CostCurve:
    """Relative folding cost of one group on candidate widths.

    Attributes:
        widths: (m,) candidate widths in increasing order (multiples of the head size).
        cost: (m,) relative cost e(k) in [0, 1], non-increasing in k, 0 at full width.
    """

    widths: np.ndarray
    cost: np.ndarray

    lo: int | None = None
    hi: int | None = None

    def width_at(self, t: float) -> int:
        """The smallest candidate width whose relative cost is at most ``t``, within [lo, hi]."""
        ok = np.nonzero(self.cost <= t)[0]
        k = int(self.widths[ok[0]]) if ok.size else int(self.widths[-1])
        if self.lo is not None:
            k = max(k, self.lo)
        if self.hi is not None:
            k = min(k, self.hi)
        return k


def cost_curve(
    model: nn.Module,
    group: ChannelGroup,
    config: FoldConfig,
    mode: str,
    width_fn: Callable[[int, float], int],
) -> CostCurve:
    """Measure e(k) = J(k) / ||X||^2 on :data:`GRID` and interpolate it to every candidate width.

    ``width_fn(n, ratio)`` maps a ratio to a width (the caller's rounding and minimum width).
    """
    n, h = group.size, group.head_size
    cfg = replace(config, n_init=min(config.n_init, CURVE_N_INIT))
    # the features plan_group measures its cost on: baselines always use the plain weights
    baseline = config.method in PRUNE_METHODS + MERGE_BASELINES
    X = group_features(model, group, "naive" if baseline else mode)
    energy = float((X.double() ** 2).sum())
    grid_k = sorted({width_fn(n, r) for r in GRID} | {n})
    grid_e = []
    for k in grid_k:
        if k >= n:
            grid_e.append(0.0)
            continue
        grid_e.append(plan_group(model, group, k, cfg, mode).cost / max(energy, 1e-30))
    step = h if h > 1 else config.round_to  # whole heads, or multiples of round_to
    cand = np.unique(np.append(np.arange(grid_k[0], n + 1, step), n))
    e = np.interp(cand, np.asarray(grid_k, dtype=np.float64), np.asarray(grid_e))
    # a non-increasing curve: the cost of width k is the worst cost of any width >= k
    e = np.maximum.accumulate(e[::-1])[::-1]
    return CostCurve(cand, np.clip(e, 0.0, None))


def threshold_allocation(
    curves: dict[str, CostCurve],
    params_fn: Callable[[dict[str, int]], int],
    target_params: int,
    *,
    iters: int = 60,
) -> dict[str, int]:
    """Widths from one global cost threshold, bisected to meet ``target_params``.

    Args:
        curves: group name -> its cost curve.
        params_fn: parameter count of the model for a {group name: width} assignment (groups
            not in the dict keep their width).
        target_params: the budget; the returned widths give at most this many parameters when
            any threshold reaches it, otherwise the closest reachable count.

    Returns:
        {group name: width}.
    """

    def widths(t: float) -> dict[str, int]:
        return {name: c.width_at(t) for name, c in curves.items()}

    hi_t = max((float(c.cost.max()) for c in curves.values()), default=0.0)
    if params_fn(widths(hi_t)) > target_params:
        return widths(hi_t)  # the most the curves allow; the caller reports the shortfall
    lo, hi = 0.0, hi_t
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if params_fn(widths(mid)) > target_params:
            lo = mid
        else:
            hi = mid
    return widths(hi)


def greedy_allocation(
    curves: dict[str, list[tuple[int, float]]],
    removed: Callable[[str, int], int],
    params: int,
    target_params: float,
) -> dict[str, int] | None:
    """Widths from measured (width, error) points, greedily, until ``target_params`` is met.

    Repeatedly takes the step (one group to its next width) that adds the least error per
    parameter removed. Errors add up across groups (log-perplexity does, roughly).

    Args:
        curves: {group name: [(width, error), ...]} in decreasing width, starting at
            (full width, 0.0).
        removed: ``(group name, width) -> parameters the group loses at that width``.
        params: the model's parameter count with every group at full width.
        target_params: the budget.

    Returns:
        {group name: width} for every group of ``curves``, or None when the budget cannot be
        met with the widths the curves offer.
    """
    step = {name: 0 for name in curves}
    widths = {name: pts[0][0] for name, pts in curves.items()}
    current = params
    while current > target_params:
        best, best_score, best_saved = None, math.inf, 0
        for name, pts in curves.items():
            i = step[name]
            if i + 1 >= len(pts):
                continue
            saved = removed(name, pts[i + 1][0]) - removed(name, pts[i][0])
            score = (pts[i + 1][1] - pts[i][1]) / max(saved, 1)
            if score < best_score:
                best, best_score, best_saved = name, score, saved
        if best is None:
            return None
        current -= best_saved
        step[best] += 1
        widths[best] = curves[best][step[best]][0]
    return widths
