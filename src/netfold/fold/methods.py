"""One entry point from a group and a target width to a merge plan, for every method.

Clusterers (k-means and the paper's alternatives), structured magnitude pruning and IFM all
produce labels (n,) plus a merge rule for :func:`netfold.fold.merge.merge_group`, so surgery,
repairs and the Report are the same code for folding and for its baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..baselines import ifm_labels, magnitude_scores, top_k_labels
from ..config import CLUSTER_METHODS, MERGE_BASELINES, PRUNE_METHODS, FoldConfig
from ..graph.groups import ChannelGroup
from .cluster import cluster, folding_cost
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
    """
    method = config.method
    if method in PRUNE_METHODS:
        p = 1 if method == "magnitude-l1" else 2
        labels = top_k_labels(magnitude_scores(model, group, p), k, group.head_size)
        X = group_features(model, group, "naive").to(torch.float64)
        cost = float((X[labels < 0] ** 2).sum())
        return GroupPlan(labels, k, "prune", cost)
    if method in MERGE_BASELINES:
        X = group_features(model, group, "naive")
        labels = ifm_labels(X, k)
        return GroupPlan(labels, k, "ifm", folding_cost(X, labels, k))
    if method not in CLUSTER_METHODS:
        raise ValueError(f"unknown method {method!r}")
    X = group_features(model, group, mode)
    c = cluster(
        X,
        k,
        method,
        seed=config.seed,
        n_init=config.n_init,
        max_iter=config.max_iter,
        tol=config.tol,
    )
    return GroupPlan(c.labels, k, "fold", c.cost)
