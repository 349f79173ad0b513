"""One entry point from a group and a target width to a merge plan, for every method.

Clusterers (k-means and the paper's alternatives), structured magnitude pruning and IFM all
produce labels (n,) plus a merge rule for :func:`netfold.fold.merge.merge_group`, so surgery,
repairs and the Report are the same code for folding and for its baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import CLUSTER_METHODS, MERGE_BASELINES, PRUNE_METHODS, FoldConfig
from ..graph.groups import ChannelGroup
from .cluster import cluster_with, folding_cost
from .ifm import ifm_labels
from .magnitude import magnitude_scores, top_k_labels
from .merge import group_features


@dataclass
class GroupPlan:
    """How one group is reduced to ``k`` channels.

    Attributes:
        labels: (n,) cluster id per channel in [0, k), or for pruning the kept channel's new
            index and -1 for a pruned channel.
        k: the new width.
        rule: merge rule for :func:`netfold.fold.merge.merge_matrices` ("fold", "ifm", "prune").
        cost: squared error ||X - X_hat||_F^2 of the group's features X (n, d) after the merge:
            the folding cost J for clusterings, the pruned rows' energy for pruning.
    """

    labels: torch.Tensor
    k: int
    rule: str
    cost: float


def plan_group(
    model: nn.Module, group: ChannelGroup, k: int, config: FoldConfig, mode: str
) -> GroupPlan:
    """Choose which channels merge (or survive) when ``group`` shrinks to ``k`` channels.

    ``mode`` selects the clustering features ("ar" or "naive", see
    :func:`netfold.fold.merge.group_features`).

    A group whose channels are split by grouped convs (``group.align`` > 1) is planned block by
    block: k-means (or pruning / IFM) inside each conv group with ``k / align`` channels each,
    so the convs keep equal group sizes, as Torch-Pruning does for grouped convs.

    Raises:
        ValueError: ``k`` is not a positive multiple of ``group.align`` (or exceeds the size).
    """
    if not group.valid_width(k):
        raise ValueError(
            f"group {group.name}: width {k} must be a multiple of its {group.align} conv "
            f"groups in [1, {group.size}]"
        )
    if group.align == 1:
        return _plan_block(model, group, k, config, mode, slice(None))
    bs, kb = group.size // group.align, k // group.align
    labels: list[torch.Tensor] = []
    cost = 0.0
    rule = "fold"
    for b in range(group.align):
        pl = _plan_block(model, group, kb, config, mode, slice(b * bs, (b + 1) * bs))
        labels.append(torch.where(pl.labels >= 0, pl.labels + b * kb, pl.labels))
        cost += pl.cost
        rule = pl.rule
    return GroupPlan(torch.cat(labels), k, rule, cost)


def _plan_block(
    model: nn.Module, group: ChannelGroup, k: int, config: FoldConfig, mode: str, rows: slice
) -> GroupPlan:
    """:func:`plan_group` on the channels ``rows`` of the group (all of them: ``slice(None)``)."""
    method = config.method
    if method in PRUNE_METHODS:
        p = 1 if method == "magnitude-l1" else 2
        scores = magnitude_scores(model, group, p)[rows]
        labels = top_k_labels(scores, k, group.head_size)
        X = group_features(model, group, "naive").to(torch.float64)[rows]
        cost = float((X[labels < 0] ** 2).sum())
        return GroupPlan(labels, k, "prune", cost)
    if method in MERGE_BASELINES:
        X = group_features(model, group, "naive")[rows]
        labels = ifm_labels(X, k)
        return GroupPlan(labels, k, "ifm", folding_cost(X, labels, k))
    if method not in CLUSTER_METHODS:
        raise ValueError(f"unknown method {method!r}")
    X = group_features(model, group, mode)[rows]
    hd = group.head_size
    if hd > 1:  # whole heads: one point per head, its channels side by side
        c = cluster_with(X.reshape(X.shape[0] // hd, -1), k // hd, config)
        return GroupPlan(head_labels(c.labels, hd), k, "fold", c.cost)
    c = cluster_with(X, k, config)
    return GroupPlan(c.labels, k, "fold", c.cost)


def head_labels(labels_h: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per-channel labels from per-head labels (heads,): channel d of head h gets
    ``labels_h[h] * head_dim + d``, so merged heads keep their dimensions apart."""
    heads = labels_h.shape[0]
    return (labels_h.repeat_interleave(head_dim) * head_dim) + torch.arange(head_dim).repeat(heads)
