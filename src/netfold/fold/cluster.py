"""Clusterers behind one call: k-means (netfold's own, in torch) and the paper's alternatives.

Every clusterer maps a feature matrix (n, d) to labels (n,) with exactly k non-empty clusters,
relabelled in order of first appearance so results are canonical and deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .kmeans import kmeans


@dataclass
class Clustering:
    labels: torch.Tensor  # (n,) int64 in [0, k)
    cost: float  # sum of squared distances of rows to their cluster means (the folding cost J)


def canonical(labels: torch.Tensor) -> torch.Tensor:
    """Relabel so cluster ids appear in increasing order of their first member."""
    uniq, first, inverse = np.unique(labels.cpu().numpy(), return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(uniq))
    return torch.as_tensor(rank[inverse.reshape(-1)], dtype=torch.long)


def folding_cost(X: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """J = ||X - C X||_F^2 with C the cluster-mean projector; X (n, d), labels (n,)."""
    X = X.to(torch.float64)
    U = torch.zeros(X.shape[0], k, dtype=X.dtype)
    U[torch.arange(X.shape[0]), labels] = 1.0
    sums = U.t() @ X  # one BLAS call; index_add_ is far slower on CPU
    counts = U.sum(0)
    # ||X - C X||^2 = ||X||^2 - sum_c ||sum of cluster c||^2 / |c|
    cost = float((X * X).sum() - ((sums * sums).sum(1) / counts.clamp_min(1.0)).sum())
    return max(cost, 0.0)


def _reduce_exact(X: torch.Tensor) -> torch.Tensor:
    """Coordinates (n, <=n) with the same pairwise distances as X (n, d) when d > n."""
    n, d = X.shape
    if d <= n:
        return X
    G = X @ X.t()
    evals, evecs = torch.linalg.eigh(G)
    keep = evals > evals.max().clamp_min(0) * 1e-12
    return evecs[:, keep] * evals[keep].clamp_min(0).sqrt()


def greedy_pairing(X: torch.Tensor, k: int) -> torch.Tensor:
    """Iterative greedy merging: repeatedly merge the two closest cluster centroids until k.

    X (n, d) -> labels (n,). Centroids are size-weighted means; O(n^2) memory.
    """
    Z = _reduce_exact(X.to(torch.float64))
    n = Z.shape[0]
    cent = Z.clone()
    size = torch.ones(n, dtype=torch.float64)
    alive = torch.ones(n, dtype=torch.bool)
    parent = torch.arange(n)
    sq = (cent * cent).sum(1)
    D = sq[:, None] + sq[None, :] - 2 * cent @ cent.t()
    D.fill_diagonal_(float("inf"))
    for _ in range(n - k):
        idx = int(torch.argmin(D))
        i, j = divmod(idx, n)
        i, j = min(i, j), max(i, j)
        cent[i] = (size[i] * cent[i] + size[j] * cent[j]) / (size[i] + size[j])
        size[i] += size[j]
        alive[j] = False
        parent[parent == j] = i
        D[j, :] = float("inf")
        D[:, j] = float("inf")
        di = ((cent - cent[i]) ** 2).sum(1)
        di[~alive] = float("inf")
        di[i] = float("inf")
        D[i, :] = di
        D[:, i] = di
    return canonical(parent)


def cluster(
    X: torch.Tensor,
    k: int,
    method: str = "kmeans",
    *,
    seed: int = 0,
    n_init: int = 10,
    max_iter: int = 20,
    tol: float = 1e-4,
) -> Clustering:
    """Cluster the rows of ``X`` (n, d) into ``k`` groups with ``method``.

    Methods: "kmeans" (k-means++ + Lloyd, torch), "agglomerative-{ward,complete,average,single}"
    and "spectral" (scikit-learn), "greedy" (iterative closest-pair merging).
    """
    n = X.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}], got {k}")
    if k == n:
        labels = torch.arange(n)
        return Clustering(labels, 0.0)
    if method == "kmeans":
        res = kmeans(X, k, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed)
        labels = res.labels.cpu()
    elif method.startswith("agglomerative-"):
        from sklearn.cluster import AgglomerativeClustering

        linkage = method.split("-", 1)[1]
        Z = _reduce_exact(X.to(torch.float64).cpu()).numpy()
        labels = torch.as_tensor(
            AgglomerativeClustering(n_clusters=k, linkage=linkage).fit_predict(Z)
        )
    elif method == "spectral":
        from sklearn.cluster import SpectralClustering

        Z = _reduce_exact(X.to(torch.float64).cpu()).numpy()
        sc = SpectralClustering(
            n_clusters=k,
            affinity="nearest_neighbors",
            n_neighbors=max(2, min(10, n - 1)),
            assign_labels="cluster_qr",
            random_state=seed,
        )
        labels = torch.as_tensor(sc.fit_predict(Z))
        labels = _fill_empty_labels(labels, k)
    elif method == "greedy":
        labels = greedy_pairing(X.cpu(), k)
    else:
        raise ValueError(f"unknown clustering method {method!r}")
    labels = canonical(labels.long())
    if int(labels.max()) + 1 != k:
        labels = _fill_empty_labels(labels, k)
    return Clustering(labels, folding_cost(X.cpu(), labels, k))


def _fill_empty_labels(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Split the largest clusters until exactly k labels are used (spectral may return fewer)."""
    labels = canonical(labels.long()).clone()
    used = int(labels.max()) + 1
    while used < k:
        counts = torch.bincount(labels, minlength=used)
        big = int(torch.argmax(counts))
        members = (labels == big).nonzero().flatten()
        labels[members[-1]] = used
        used += 1
    return canonical(labels)


def cluster_with(X: torch.Tensor, k: int, config: Any) -> Clustering:
    """:func:`cluster` with a FoldConfig's method, seed, n_init, max_iter and tol: the one
    clustering call every fold makes (traced groups, decoder MLPs and heads, encoder heads)."""
    return cluster(
        X,
        k,
        config.method,
        seed=config.seed,
        n_init=config.n_init,
        max_iter=config.max_iter,
        tol=config.tol,
    )
