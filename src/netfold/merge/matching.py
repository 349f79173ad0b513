"""The three ways of matching channels across models, each on one group's stacked features.

Every solver sees the channels of all M models of one group stacked into one matrix, model by
model: rows ``m * n ... (m + 1) * n - 1`` are model m's n channels. It returns one label per
stacked channel (the merged channel it joins), canonical (ids in order of first appearance):

- :func:`kmeans_labels`: model folding; k-means over all M * n rows, any cluster may hold
  channels of one model or of several.
- :func:`lap_labels`: weight matching; model m's channels are assigned one to one to model 1's
  by a linear assignment problem (the clustering matrix constrained to [P I]).
- :func:`zipit_labels`: ZipIt!; greedily join the most similar pair of channels anywhere in
  the union (within one model too) until k merged channels are left.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..fold.cluster import canonical
from ..fold.kmeans import kmeans


def kmeans_labels(
    X: torch.Tensor, k: int, *, seed: int, n_init: int, max_iter: int
) -> tuple[torch.Tensor, float]:
    """k-means labels (N,) of the stacked rows ``X`` (N, d) into ``k`` clusters, and the cost.

    The cost is the folding objective ||X - C X||_F^2 (sum of squared distances to the means).
    """
    if k == X.shape[0]:
        return torch.arange(k), 0.0
    res = kmeans(X.to(torch.float64), k, n_init=n_init, max_iter=max_iter, tol=0.0, seed=seed)
    return canonical(res.labels.cpu()), float(res.inertia)


def lap_labels(F: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    """Weight matching of M models on one group: labels (M * n,) and the matched score.

    ``F`` (M * n, d) holds every model's channel features in the reference coordinates (model
    1's channel order for every other group). Model m >= 2 is matched to model 1 by the
    permutation maximising sum_i <F1_i, Fm_pi(i)> (Hungarian algorithm); channel j of model m
    then joins model 1's channel it is matched with.
    """
    M = F.shape[0] // n
    F = F.to(torch.float64)
    ref = F[:n]
    labels = [torch.arange(n)]
    score = 0.0
    for m in range(1, M):
        S = (ref @ F[m * n : (m + 1) * n].t()).cpu().numpy()  # (n ref, n model m)
        rows, cols = linear_sum_assignment(S, maximize=True)
        lab = torch.empty(n, dtype=torch.long)
        lab[torch.as_tensor(cols)] = torch.as_tensor(rows, dtype=torch.long)
        labels.append(lab)
        score += float(S[rows, cols].sum())
    return torch.cat(labels), score


def cosine_similarity(X: torch.Tensor) -> torch.Tensor:
    """(N, N) cosine similarity of the rows of ``X`` (N, d); zero rows are similar to none."""
    X = X.to(torch.float64)
    Xn = X / X.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return Xn @ Xn.t()


def correlation(acts: torch.Tensor) -> torch.Tensor:
    """(N, N) Pearson correlation of N channels from samples ``acts`` (N, samples).

    A constant channel (zero variance) correlates with nothing (0), not NaN.
    """
    a = acts.to(torch.float64)
    a = a - a.mean(1, keepdim=True)
    sd = a.norm(dim=1)
    a = a / sd.clamp_min(1e-300)[:, None]
    C = a @ a.t()
    dead = sd <= 1e-12 * sd.max().clamp_min(1e-300)
    C[dead] = 0.0
    C[:, dead] = 0.0
    return C


def zipit_labels(sim: torch.Tensor, k: int, n_models: int) -> tuple[torch.Tensor, float]:
    """ZipIt!'s greedy matching: labels (N,) joining the most similar channels until ``k``.

    Pairs are taken in order of decreasing similarity ``sim`` (N, N) over the union of all
    models' channels (same-model pairs included); a pair joins two merged channels when their
    sizes add up to at most ``cap`` = max(M, ceil(N / k)) (for two models at width 1 every
    merged channel is one pair, as in ZipIt!). Ties break by index, so the result is
    deterministic. If the cap blocks every remaining pair before ``k`` is reached it grows by
    one.

    Returns:
        labels (N,) canonical, and the mean similarity of the joined pairs.
    """
    N = sim.shape[0]
    if not 1 <= k <= N:
        raise ValueError(f"k must lie in [1, {N}], got {k}")
    cap = max(n_models, math.ceil(N / k))
    s = sim.detach().to(torch.float64).cpu().numpy()
    iu, ju = np.triu_indices(N, 1)
    vals = s[iu, ju]
    order = np.lexsort((ju, iu, -vals))  # decreasing similarity, then by index
    parent = np.arange(N)
    size = np.ones(N, dtype=np.int64)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    clusters, joined = N, []
    while clusters > k:
        before = clusters
        for t in order:
            if clusters == k:
                break
            a, b = find(int(iu[t])), find(int(ju[t]))
            if a == b or size[a] + size[b] > cap:
                continue
            if a > b:
                a, b = b, a
            parent[b] = a
            size[a] += size[b]
            clusters -= 1
            joined.append(vals[t])
        if clusters == before:
            cap += 1
    roots = np.array([find(i) for i in range(N)])
    return canonical(torch.as_tensor(roots)), float(np.mean(joined)) if joined else 1.0
