"""k-means clustering in torch, tuned for model folding (few points, very many features).

Folding clusters the ``n`` channels of a layer group (one row of features per channel) into ``k``
clusters. The feature matrices are short and very wide: a LLaMA-7B MLP group is 11008 points x
12288 features (k ~ 5500), a SmolLM2-135M group 1536 x 1728. This module implements

* greedy k-means++ seeding (scikit-learn's variant: ``2 + int(log k)`` local trials per new
  center, keep the trial that lowers the potential most), then Lloyd iterations, ``n_init``
  seeded restarts keeping the best objective;
* empty-cluster repair (the points farthest from their centers move into empty clusters), so
  every result has exactly ``k`` non-empty clusters;
* two exact working spaces, chosen by a cost model:

  - *direct*: the centered points themselves, distances by batched matmul
    ``||x||^2 - 2 x c^T + ||c||^2`` in row chunks (many points, few features);
  - *Gram* (kernel form; used when ``n <= 16384`` and it is cheaper, i.e. for folding shapes):
    every centroid is a mean of rows of ``X``, so it lies in the row space of ``X`` and every
    distance the algorithm needs is a function of the ``n x n`` Gram matrix ``G = X_c X_c^T``
    of the centered rows (this is the exact reduction to the row space, without forming its
    basis). With ``S`` a cluster of size ``m``, ``H = U^T G`` (``U`` the one-hot cluster
    matrix) and ``q_S = sum_{j,l in S} G_jl``::

        ||x_i - mean(S)||^2 = G_ii - 2 H_{S,i} / m + q_S / m^2 .

    ``G`` costs one ``n x n x d`` matmul (half of it: only the upper block triangle is
    multiplied); after that a k-means++ step costs ``O((2 + log k) n)`` and a Lloyd iteration
    ``O(n^2)``, independent of ``d``;

* an optional seeded Gaussian random projection (``projection_dim``) for seeding and Lloyd
  assignment when even the Gram matrix is too large, followed by exact refinement in the
  original space.

Centers and inertia are always computed exactly in the original feature space at the end.
Everything random comes from one CPU ``torch.Generator`` seeded with ``seed``, so labels are
reproducible for a given seed (bit-for-bit on CPU with the same thread settings; on CUDA the
Gram form runs in float64 and cluster sums use a one-hot matmul instead of atomic
``index_add_``, so they do not depend on thread timing).

Threads: on CPU the sequential parts (k-means++ steps, Gram-form Lloyd iterations, whole small
problems) run with ``torch.set_num_threads(1)`` temporarily (see ``_SerialCPU``); large matmuls
(the Gram matrix, big direct problems) use the caller's setting.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch

__all__ = ["KMeansResult", "kmeans"]

# Largest number of elements of one temporary block (rows x centers, or rows x candidates x
# features in the exact refinement). 2**24 float32 = 64 MiB.
_BLOCK_ELEMS = 1 << 24
# Gram path: at most this many points (the n x n matrix is then at most 1 GiB in float32).
_GRAM_MAX_POINTS = 16384
# Row-block size of the blocked symmetric Gram product on CPU.
_GRAM_BLOCK = 2048
# Relative cost of one element-wise / scatter operation versus one matmul flop (cost model).
_ELEMWISE_COST = 8.0
# projection_dim="auto": project to this many dims, only when the Gram path does not apply and
# the points have more than _AUTO_MIN_DIM features.
_AUTO_PROJECTION_DIM = 256
_AUTO_MIN_DIM = 1024
# Exact refinement after a projected run: candidates per point and the maximum number of rounds.
_REFINE_CANDIDATES = 8
_REFINE_ROUNDS = 10
_INITS = ("k-means++", "random")
# Direct form on CPU: seeding and Lloyd run on one thread when n * k * p is at most this.
_SERIAL_MAX_WORK = 1 << 28
# CPU problems with at most this many input elements (n * d) run entirely on one thread.
_SERIAL_MAX_ELEMS = 1 << 22


@dataclass
class KMeansResult:
    """Result of :func:`kmeans`.

    Attributes:
        labels: ``(n,)`` int64 cluster index of every point, in ``[0, k)``; every cluster is
            non-empty.
        centers: ``(k, d)`` exact mean of each cluster's points in the original feature space,
            same dtype and device as ``X``.
        inertia: sum over points of the squared Euclidean distance to their cluster's center,
            computed in the original space (float64 accumulation).
        n_iter: Lloyd iterations (assignment steps) of the best run; 0 for the closed-form
            cases ``k == 1`` and ``k == n``; projected runs count projected iterations plus
            exact refinement rounds.
    """

    labels: torch.Tensor
    centers: torch.Tensor
    inertia: float
    n_iter: int


def kmeans(
    X: torch.Tensor,
    k: int,
    *,
    n_init: int = 10,
    max_iter: int = 20,
    tol: float = 1e-4,
    seed: int = 0,
    projection_dim: int | str | None = None,
    init: str = "k-means++",
) -> KMeansResult:
    """Cluster the rows of ``X`` into ``k`` clusters with k-means (Lloyd + k-means++ seeding).

    Each of the ``n_init`` runs seeds ``k`` centers (greedy k-means++ with ``2 + int(log k)``
    local trials per center, as scikit-learn, or ``k`` distinct random points for
    ``init="random"``) and then alternates assignment and mean update until the objective (sum of
    squared distances) improves by less than ``tol`` relative to its previous value, or
    ``max_iter`` assignment steps have run. Clusters that become empty receive the points
    farthest from their centers. The run with the lowest objective is returned; its centers are
    the exact cluster means of ``X``.

    Working space. With ``projection_dim=None`` (default) the clustering is exact: it runs on
    the centered points (direct form) or, when ``n <= 16384`` and a cost model says it is
    cheaper (always for wide folding matrices, e.g. ``d > n``), on the ``n x n`` Gram matrix of
    the centered points (kernel form, an exact reduction to the row space of ``X``). Both give
    the same distances up to floating-point rounding.

    With ``projection_dim=p`` (an int ``< d``), seeding and Lloyd assignment run on a seeded
    Gaussian random projection ``X @ R / sqrt(p)`` (``R`` is ``(d, p)``). That search is
    approximate, so each run is then refined exactly in the original space: centers are
    recomputed as exact means, every point is compared exactly (full-dimensional distances) with
    its current center and its 8 nearest centers in the projection, and the refinement repeats
    (up to 10 rounds, same ``tol`` rule) while the exact objective decreases. Labels, centers and
    inertia returned are exact for the clustering found. ``p >= d`` means the exact path.
    ``projection_dim="auto"`` is exact whenever the Gram path applies or ``d <= 1024``, and
    otherwise projects to 256 dims.

    On CPU, seeding and Gram-form iterations (and whole problems with ``n * d <= 2**22``)
    temporarily run with ``torch.set_num_threads(1)``: they are sequences of small ops for which
    thread barriers cost more than they gain, badly so on a busy machine.

    Args:
        X: ``(n, d)`` floating tensor (float32 or float64; float16/bfloat16 are computed in
            float32), on CPU or CUDA. Must be finite.
        k: number of clusters, an int with ``1 <= k <= n``.
        n_init: number of seeded restarts; the lowest objective wins.
        max_iter: maximum Lloyd iterations (assignment steps) per run.
        tol: relative objective improvement below which a run stops.
        seed: seed of the ``torch.Generator`` driving every random choice.
        projection_dim: ``None`` (exact), an int ``p >= 1`` or ``"auto"``; see above.
        init: ``"k-means++"`` (default) or ``"random"``.

    Returns:
        KMeansResult with ``labels`` ``(n,)`` int64, ``centers`` ``(k, d)`` (dtype of ``X``),
        ``inertia`` and ``n_iter``. ``k == n`` gives the identity clustering
        ``labels = arange(n)``; ``k == 1`` puts every point in cluster 0.

    Raises:
        ValueError: if ``X`` is not a finite 2-D floating tensor with at least one row, ``k`` is
            not an int in ``[1, n]``, or another argument is out of range.
    """
    return _kmeans(
        X,
        k,
        n_init=n_init,
        max_iter=max_iter,
        tol=tol,
        seed=seed,
        projection_dim=projection_dim,
        init=init,
        space="auto",
    )


def _kmeans(
    X: torch.Tensor,
    k: int,
    *,
    n_init: int,
    max_iter: int,
    tol: float,
    seed: int,
    projection_dim: int | str | None,
    init: str,
    space: str,
) -> KMeansResult:
    """:func:`kmeans` with the exact working space forced: ``space`` in auto, gram, direct."""
    _validate(X, k, n_init, max_iter, tol, projection_dim, init)
    k = int(k)
    n, d = X.shape
    device = X.device
    Xw = X if X.dtype in (torch.float32, torch.float64) else X.float()

    if k == n:
        labels = torch.arange(n, device=device)
        return KMeansResult(labels=labels, centers=X.clone(), inertia=0.0, n_iter=0)
    if k == 1:
        labels = torch.zeros(n, dtype=torch.long, device=device)
        centers = Xw.mean(dim=0, keepdim=True)
        inertia = _inertia(Xw, labels, centers)
        return KMeansResult(labels=labels, centers=centers.to(X.dtype), inertia=inertia, n_iter=0)

    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    use_gram = _use_gram(n, d, k, n_init, max_iter) if space == "auto" else space == "gram"
    p = _resolve_projection(projection_dim, d, use_gram)
    # Small problems run entirely on one CPU thread (see _SerialCPU).
    with _serial_cpu(device.type == "cpu" and n * d <= _SERIAL_MAX_ELEMS):
        labels, centers_c, inertia, n_iter, mean = _search(
            Xw, k, gen, use_gram, p, n_init, max_iter, tol, init
        )
    centers = (centers_c + mean).to(X.dtype)
    return KMeansResult(labels=labels, centers=centers, inertia=inertia, n_iter=n_iter)


def _search(
    Xw: torch.Tensor,
    k: int,
    gen: torch.Generator,
    use_gram: bool,
    p: int | None,
    n_init: int,
    max_iter: int,
    tol: float,
    init: str,
) -> tuple[torch.Tensor, torch.Tensor, float, int, torch.Tensor]:
    """The ``n_init`` runs on ``Xw`` ``(n, d)`` (float32/64) with ``1 < k < n``.

    Returns:
        labels ``(n,)``, centered exact centers ``(k, d)``, exact inertia, iterations of the best
        run and the mean ``(1, d)`` that was subtracted.
    """
    n, d = Xw.shape
    device = Xw.device
    mean = Xw.mean(dim=0, keepdim=True)
    Xc = Xw - mean  # (n, d); every distance is translation invariant

    if p is None:
        work: _GramSpace | _DirectSpace = _GramSpace(Xc) if use_gram else _DirectSpace(Xc)
        best: tuple[float, torch.Tensor, int] | None = None
        seeds = None
        if init == "k-means++" and isinstance(work, _GramSpace) and device.type == "cpu":
            # Lloyd draws nothing from gen, so seeding every run first gives the same seeds.
            seeds = _kmeanspp_gram_cpu_batch(work, k, gen, n_init)
        with _serial_cpu(_run_serial(device, use_gram, n, k, d)):
            for r in range(n_init):
                s = None if seeds is None else seeds[r]
                labels, n_iter = _single_run(work, k, gen, init, max_iter, tol, s)
                obj = work.objective(labels, k) if n_init > 1 else 0.0
                if best is None or obj < best[0]:
                    best = (obj, labels, n_iter)
        assert best is not None
        _, labels, n_iter = best
        del work
        centers_c = _cluster_means(Xc, labels, k)
        inertia = _inertia(Xc, labels, centers_c)
    else:
        # Random projection for seeding and assignment; exact refinement on Xc.
        proj = torch.randn(d, p, generator=gen, dtype=Xw.dtype).to(device) / math.sqrt(p)
        pspace = _DirectSpace(Xc @ proj)
        # The search runs in the Gram form of the projected points when that is cheaper (many
        # clusters: a 7B MLP at k ~ 0.8 n), with the lockstep seeding of the exact path.
        pgram = (
            device.type == "cpu" and init == "k-means++" and _use_gram(n, p, k, n_init, max_iter)
        )
        search: _GramSpace | _DirectSpace = _GramSpace(pspace.Z) if pgram else pspace
        seeds = _kmeanspp_gram_cpu_batch(search, k, gen, n_init) if pgram else None
        best_p: tuple[float, torch.Tensor, torch.Tensor, int] | None = None
        for r in range(n_init):
            with _serial_cpu(_run_serial(device, pgram, n, k, p)):
                s = None if seeds is None else seeds[r]
                labels, n_iter = _single_run(search, k, gen, init, max_iter, tol, s)
            labels, centers_c, inertia, n_ref = _refine_exact(Xc, pspace, labels, k, tol)
            if best_p is None or inertia < best_p[0]:
                best_p = (inertia, labels, centers_c, n_iter + n_ref)
        del search
        assert best_p is not None
        inertia, labels, centers_c, n_iter = best_p
    return labels, centers_c, inertia, n_iter, mean


# --------------------------------------------------------------------------------------------
# validation and set-up


def _validate(
    X: torch.Tensor,
    k: int,
    n_init: int,
    max_iter: int,
    tol: float,
    projection_dim: int | str | None,
    init: str,
) -> None:
    if not isinstance(X, torch.Tensor):
        raise ValueError(f"X must be a torch.Tensor, got {type(X).__name__}")
    if X.dim() != 2:
        raise ValueError(f"X must be 2-D (n_points, n_features), got shape {tuple(X.shape)}")
    if not X.is_floating_point():
        raise ValueError(f"X must be a floating-point tensor, got dtype {X.dtype}")
    n, d = X.shape
    if n == 0 or d == 0:
        raise ValueError(f"X must have at least one point and one feature, got {tuple(X.shape)}")
    if not bool(torch.isfinite(X).all()):
        raise ValueError("X contains NaN or infinite values")
    if isinstance(k, bool) or not isinstance(k, Integral):
        raise ValueError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= int(k) <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n_points = {n}, got k = {int(k)}")
    for name, value in (("n_init", n_init), ("max_iter", max_iter)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if projection_dim is not None and projection_dim != "auto":
        if (
            isinstance(projection_dim, bool)
            or not isinstance(projection_dim, Integral)
            or projection_dim < 1
        ):
            raise ValueError(
                f'projection_dim must be None, "auto" or an int >= 1, got {projection_dim!r}'
            )
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")


def _use_gram(n: int, d: int, k: int, n_init: int, max_iter: int) -> bool:
    """Cost model: is the Gram (kernel) form cheaper than the direct form for this problem?"""
    if n > _GRAM_MAX_POINTS:
        return False
    trials = 2 + int(math.log(k))
    direct = n_init * (trials + max_iter) * n * k * d  # matmul flops (x2 dropped on both sides)
    gram = n * n * d / 2 + _ELEMWISE_COST * n_init * (trials * k * n + max_iter * n * (n + 2 * k))
    return gram < direct


def _run_serial(device: torch.device, use_gram: bool, n: int, k: int, p: int) -> bool:
    """Run seeding and Lloyd on one CPU thread? (See :class:`_SerialCPU`.)

    Yes on CPU for the Gram form (its per-iteration work is memory-bound scatter and
    element-wise ops) and for direct problems whose per-iteration matmul is small; large direct
    matmuls keep the caller's thread count.
    """
    return device.type == "cpu" and (use_gram or n * k * p <= _SERIAL_MAX_WORK)


def _resolve_projection(projection_dim: int | str | None, d: int, use_gram: bool) -> int | None:
    """Projection size to use, or None for the exact path."""
    if projection_dim is None:
        return None
    if projection_dim == "auto":
        return None if use_gram or d <= _AUTO_MIN_DIM else _AUTO_PROJECTION_DIM
    p = int(projection_dim)
    return p if p < d else None


# --------------------------------------------------------------------------------------------
# building blocks


def _row_sqnorms(Z: torch.Tensor) -> torch.Tensor:
    """``(n,)`` squared Euclidean norms of the rows of ``Z`` ``(n, p)``."""
    return (Z * Z).sum(dim=1)


def _cluster_sums(Z: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``(k, p)`` per-cluster sums of the rows of ``Z`` ``(n, p)`` (``U^T Z``).

    CPU uses ``index_add_`` (deterministic there); CUDA uses :func:`_onehot_sums` instead of
    atomic adds, whose summation order depends on thread timing.
    """
    if Z.device.type == "cuda":
        return _onehot_sums(Z, labels, k)
    return torch.zeros(k, Z.shape[1], dtype=Z.dtype, device=Z.device).index_add_(0, labels, Z)


def _onehot_sums(Z: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``(k, p)`` per-cluster sums as a float64 one-hot matmul, in blocks of clusters.

    Deterministic (no atomics) and exact in its 0/1 weights; the result has ``Z``'s dtype.
    """
    n, p = Z.shape
    Z64 = Z.double()
    out = torch.empty(k, p, dtype=Z.dtype, device=Z.device)
    step = max(1, _BLOCK_ELEMS // n)
    for s in range(0, k, step):
        e = min(k, s + step)
        ids = torch.arange(s, e, device=Z.device).unsqueeze(1)
        onehot = (labels.unsqueeze(0) == ids).double()  # (e - s, n)
        out[s:e] = (onehot @ Z64).to(Z.dtype)
    return out


def _cluster_means(Z: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``(k, p)`` per-cluster means of the rows of ``Z`` ``(n, p)``; every cluster non-empty."""
    counts = torch.bincount(labels, minlength=k).to(Z.dtype)
    return _cluster_sums(Z, labels, k) / counts.unsqueeze(1)


def _inertia(X: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor) -> float:
    """``sum_i ||X_i - centers[labels_i]||^2``, row sums in X's dtype, total in float64.

    Args:
        X: ``(n, d)`` points; labels: ``(n,)``; centers: ``(k, d)``.
    """
    n, d = X.shape
    step = max(1, (_BLOCK_ELEMS // 4) // d)
    total = torch.zeros((), dtype=torch.float64, device=X.device)
    for s in range(0, n, step):
        diff = torch.index_select(centers, 0, labels[s : s + step]).sub_(X[s : s + step])
        total += torch.linalg.vecdot(diff, diff).sum(dtype=torch.float64)
    return float(total)


def _assign(
    Z: torch.Tensor, zsq: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest center of every point by chunked matmul distances.

    Args:
        Z: ``(n, p)`` points; zsq: ``(n,)`` their squared norms; C: ``(k, p)`` centers.

    Returns:
        labels ``(n,)`` int64 and squared distances to the chosen center ``(n,)`` (clamped >= 0).
    """
    n, k = Z.shape[0], C.shape[0]
    csq = _row_sqnorms(C).unsqueeze(0)
    ct = C.T
    labels = torch.empty(n, dtype=torch.long, device=Z.device)
    mind = torch.empty(n, dtype=Z.dtype, device=Z.device)
    step = max(1, _BLOCK_ELEMS // k)
    for s in range(0, n, step):
        e = min(n, s + step)
        dist = torch.addmm(csq, Z[s:e], ct, alpha=-2.0)  # (b, k) = ||c||^2 - 2 x c^T
        best = torch.min(dist, dim=1)
        mind[s:e] = best.values
        labels[s:e] = best.indices
    mind += zsq
    mind.clamp_(min=0)
    return labels, mind


class _DirectSpace:
    """Working space holding the (centered or projected) points themselves.

    Args:
        Z: ``(n, p)`` points.
    """

    def __init__(self, Z: torch.Tensor) -> None:
        self.Z = Z
        self.zsq = _row_sqnorms(Z)
        self.n = Z.shape[0]

    def seed_dists(self, idx: torch.Tensor) -> torch.Tensor:
        """``(m, n)`` squared distances from the points ``idx`` ``(m,)`` to every point."""
        rows = torch.index_select(self.Z, 0, idx)
        dist = torch.addmm(self.zsq.unsqueeze(0), rows, self.Z.T, alpha=-2.0)
        dist += torch.index_select(self.zsq, 0, idx).unsqueeze(1)
        return dist.clamp_(min=0)

    def assign_to_points(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest of the centers ``Z[idx]``: labels ``(n,)`` and squared distances ``(n,)``."""
        return _assign(self.Z, self.zsq, self.Z[idx])

    def assign_to_means(self, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest of the cluster means of ``labels``: labels ``(n,)``, distances ``(n,)``."""
        return _assign(self.Z, self.zsq, _cluster_means(self.Z, labels, k))

    def means(self, labels: torch.Tensor, k: int) -> torch.Tensor:
        """``(k, p)`` cluster means in this space."""
        return _cluster_means(self.Z, labels, k)

    def objective(self, labels: torch.Tensor, k: int) -> float:
        """Inertia of the clustering ``labels`` ``(n,)`` with its cluster means."""
        return _inertia(self.Z, labels, _cluster_means(self.Z, labels, k))


class _GramSpace:
    """Kernel-form working space: the ``(n, n)`` Gram matrix of the centered points.

    Args:
        Xc: ``(n, d)`` centered points (only used to build the Gram matrix).
    """

    def __init__(self, Xc: torch.Tensor) -> None:
        if Xc.device.type == "cuda":
            # On GPUs keep the kernel form in float64: exact one-hot cluster sums need it anyway
            # (see _cluster_sums) and the n x n work is cheap there.
            Xc = Xc.double()
        self.G = _gram(Xc)
        self.g = torch.diagonal(self.G).clone()  # (n,) squared norms
        self.n = Xc.shape[0]

    def seed_dists(self, idx: torch.Tensor) -> torch.Tensor:
        """``(m, n)`` squared distances from the points ``idx`` ``(m,)`` to every point."""
        dist = torch.add(self.g.unsqueeze(0), torch.index_select(self.G, 0, idx), alpha=-2.0)
        dist += torch.index_select(self.g, 0, idx).unsqueeze(1)
        return dist.clamp_(min=0)

    def assign_to_points(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest of the points ``idx`` ``(k,)``: labels ``(n,)`` and squared distances."""
        mind = torch.empty(self.n, dtype=self.G.dtype, device=self.G.device)
        labels = torch.empty(self.n, dtype=torch.long, device=self.G.device)
        step = max(1, _BLOCK_ELEMS // self.n)
        for s in range(0, idx.shape[0], step):
            part = self.seed_dists(idx[s : s + step]).min(dim=0)  # over these centers
            if s == 0:
                mind.copy_(part.values)
                labels.copy_(part.indices)
            else:
                better = part.values < mind
                mind = torch.where(better, part.values, mind)
                labels = torch.where(better, part.indices + s, labels)
        return labels, mind

    def _sums(self, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``H = U^T G`` ``(k, n)`` and ``q`` ``(k,)``, ``q_c = sum_{j,l in c} G_jl``."""
        H = _cluster_sums(self.G, labels, k)
        own = H[labels, torch.arange(self.n, device=labels.device)]  # H[c(j), j]
        q = _cluster_sums(own.unsqueeze(1), labels, k).squeeze(1)
        return H, q

    def assign_to_means(self, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest of the cluster means of ``labels``: labels ``(n,)``, distances ``(n,)``.

        ``||x_i - mu_c||^2 = G_ii - 2 H_ci / m_c + q_c / m_c^2``, computed as a ``(k, n)``
        matrix in place of ``H``.
        """
        H, q = self._sums(labels, k)
        m = torch.bincount(labels, minlength=k).to(H.dtype)
        H.mul_((-2.0 / m).unsqueeze(1)).add_((q / (m * m)).unsqueeze(1))
        best = H.min(dim=0)
        mind = (best.values + self.g).clamp_(min=0)
        return best.indices, mind

    def objective(self, labels: torch.Tensor, k: int) -> float:
        """Inertia with cluster means: ``sum_i G_ii - sum_c q_c / m_c``."""
        _, q = self._sums(labels, k)
        m = torch.bincount(labels, minlength=k).to(torch.float64)
        return float(self.g.sum(dtype=torch.float64) - (q.double() / m).sum())


def _gram(Xc: torch.Tensor) -> torch.Tensor:
    """``(n, n)`` Gram matrix ``Xc Xc^T`` of ``Xc`` ``(n, d)``.

    On CPU only the upper block triangle is multiplied (row blocks of ``_GRAM_BLOCK``) and the
    lower one is mirrored, which halves the flops.
    """
    n = Xc.shape[0]
    if Xc.device.type == "cuda" or n <= _GRAM_BLOCK:
        return Xc @ Xc.T
    G = torch.empty(n, n, dtype=Xc.dtype, device=Xc.device)
    for s in range(0, n, _GRAM_BLOCK):
        e = min(n, s + _GRAM_BLOCK)
        G[s:e, s:] = Xc[s:e] @ Xc[s:].T
        if s > 0:
            G[s:e, :s] = G[:s, s:e].T
    return G


def _fill_empty(labels: torch.Tensor, dist: torch.Tensor, k: int) -> None:
    """Give every empty cluster one point, in place.

    Points are taken in order of decreasing distance to their center, skipping points whose
    cluster would become empty; moved points get distance 0 (they are their new cluster's mean).

    Args:
        labels: ``(n,)`` int64 cluster indices, modified in place.
        dist: ``(n,)`` squared distance of each point to its center, modified in place.
        k: number of clusters (``k <= n``).
    """
    counts = torch.bincount(labels, minlength=k)
    if bool((counts > 0).all()):
        return
    empty = (counts == 0).nonzero().flatten().tolist()
    counts_l = counts.tolist()
    labels_l = labels.tolist()
    moved: list[int] = []
    for i in torch.argsort(dist, descending=True, stable=True).tolist():
        if len(moved) == len(empty):
            break
        c = labels_l[i]
        if counts_l[c] > 1:
            counts_l[c] -= 1
            moved.append(i)
    idx = torch.tensor(moved, dtype=torch.long, device=labels.device)
    labels[idx] = torch.tensor(empty, dtype=torch.long, device=labels.device)
    dist[idx] = 0


class _SerialCPU:
    """Run a block with one intra-op CPU thread (re-entrant and thread-safe).

    The k-means++ loop is ``k`` sequential steps of small tensor ops (a few ``(trials, n)``
    blocks) and a Lloyd iteration of the Gram form is a handful of memory-bound ops. Splitting
    such ops across OpenMP threads gains little and, on a machine whose cores are busy with
    other work, costs a thread barrier per op that can stall for a scheduler time slice
    (measured: a k-means++ step ~20x slower on a loaded 2-core machine). The first entrant saves
    ``torch.get_num_threads()`` and sets 1; the last one out restores it. Other threads of the
    process run with one intra-op thread meanwhile.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = 1

    @contextlib.contextmanager
    def __call__(self, active: bool) -> Iterator[None]:
        if not active:
            yield
            return
        with self._lock:
            if self._users == 0:
                self._saved = torch.get_num_threads()
                torch.set_num_threads(1)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    torch.set_num_threads(self._saved)


_serial_cpu = _SerialCPU()


def _kmeanspp(space: _GramSpace | _DirectSpace, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (scikit-learn's variant); returns ``(k,)`` point indices.

    The first center is a uniform random point; each next center is the best of
    ``2 + int(log k)`` candidates sampled with probability proportional to the squared distance
    to the nearest chosen center, "best" meaning the lowest resulting potential.
    """
    n = space.n
    device = space.g.device if isinstance(space, _GramSpace) else space.Z.device
    trials = 2 + int(math.log(k))
    first = torch.randint(n, (1,), generator=gen)
    u = torch.rand(k - 1, trials, generator=gen, dtype=torch.float64).to(device)
    idx = torch.empty(k, dtype=torch.long, device=device)
    idx[0] = first.to(device)
    closest = space.seed_dists(first.to(device))[0]  # (n,)
    for c in range(1, k):
        cum = torch.cumsum(closest, dim=0, dtype=torch.float64)
        cand = torch.searchsorted(cum, u[c - 1] * cum[-1]).clamp_(max=n - 1)  # (trials,)
        dist = space.seed_dists(cand)  # (trials, n)
        torch.minimum(dist, closest, out=dist)
        best = torch.argmin(dist.sum(dim=1))
        closest = dist[best]
        idx[c] = cand[best]
    return idx


def _kmeanspp_gram_cpu_batch(
    space: _GramSpace, k: int, gen: torch.Generator, runs: int
) -> torch.Tensor:
    """``runs`` k-means++ seedings on a CPU Gram matrix, in lockstep, in NumPy.

    Each run draws from ``gen`` exactly what :func:`_kmeanspp` draws, in the same order, and
    makes the same choices, so the seeds equal ``runs`` sequential calls. The seeding is ``k``
    sequential steps on ``(trials, n)`` rows; for wide layers (an LLM MLP: k ~ 1,000, n ~ 1,500)
    the per-call overhead of operators on such small arrays dominates, so the runs advance
    together and every operator works on ``(runs, trials, n)``.

    Returns:
        ``(runs, k)`` int64 point indices.
    """
    n = space.n
    trials = 2 + int(math.log(k))
    firsts, us = [], []
    for _ in range(runs):
        firsts.append(int(torch.randint(n, (1,), generator=gen)))
        us.append(torch.rand(k - 1, trials, generator=gen, dtype=torch.float64).numpy())
    g = space.g.numpy()
    # every squared distance once, (n, n), with the operations of _GramSpace.seed_dists
    D = g - 2.0 * space.G.numpy()
    D += g[:, None]
    np.maximum(D, 0, out=D)
    first = np.array(firsts)
    u = np.stack(us)  # (runs, k - 1, trials)
    idx = np.empty((runs, k), dtype=np.int64)
    idx[:, 0] = first
    closest = D[first]  # (runs, n)
    rows = np.arange(runs)
    for c in range(1, k):
        cum = np.cumsum(closest, axis=1, dtype=np.float64)  # (runs, n)
        cand = np.empty((runs, trials), dtype=np.int64)
        for r in range(runs):
            cand[r] = np.searchsorted(cum[r], u[r, c - 1] * cum[r, -1])
        np.minimum(cand, n - 1, out=cand)
        dist = np.take(D, cand, axis=0)  # (runs, trials, n)
        np.minimum(dist, closest[:, None, :], out=dist)
        best = np.argmin(dist.sum(axis=2), axis=1)  # (runs,)
        closest = dist[rows, best]
        idx[:, c] = cand[rows, best]
    return torch.from_numpy(idx)


def _single_run(
    space: _GramSpace | _DirectSpace,
    k: int,
    gen: torch.Generator,
    init: str,
    max_iter: int,
    tol: float,
    seeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """One seeded run (seeding + Lloyd); returns labels ``(n,)`` and the assignment steps.

    ``seeds``: ``(k,)`` initial center indices drawn beforehand (then ``gen`` is not used).
    """
    device = space.g.device if isinstance(space, _GramSpace) else space.Z.device
    if seeds is not None:
        idx = seeds.to(device)
    elif init == "k-means++":
        with _serial_cpu(device.type == "cpu"):
            idx = _kmeanspp(space, k, gen)
    else:
        idx = torch.randperm(space.n, generator=gen)[:k].to(device)
    labels, mind = space.assign_to_points(idx)
    _fill_empty(labels, mind, k)
    prev = float(mind.sum(dtype=torch.float64))
    n_iter = 1
    while n_iter < max_iter:
        new_labels, mind = space.assign_to_means(labels, k)
        _fill_empty(new_labels, mind, k)
        obj = float(mind.sum(dtype=torch.float64))
        n_iter += 1
        labels = new_labels
        if prev - obj <= tol * prev:
            break
        prev = obj
    return labels, n_iter


# --------------------------------------------------------------------------------------------
# exact refinement of a projected clustering


def _nearest_candidates(
    Z: torch.Tensor, zsq: torch.Tensor, C: torch.Tensor, m: int
) -> torch.Tensor:
    """``(n, m)`` indices of the ``m`` nearest centers ``C`` ``(k, p)`` of each row of ``Z``."""
    n, k = Z.shape[0], C.shape[0]
    csq = _row_sqnorms(C).unsqueeze(0)
    ct = C.T
    out = torch.empty(n, m, dtype=torch.long, device=Z.device)
    step = max(1, _BLOCK_ELEMS // k)
    for s in range(0, n, step):
        e = min(n, s + step)
        dist = torch.addmm(csq, Z[s:e], ct, alpha=-2.0)
        out[s:e] = torch.topk(dist, m, dim=1, largest=False, sorted=False).indices
    return out


def _best_of_candidates(
    X: torch.Tensor, C: torch.Tensor, cand: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest center among candidates.

    Args:
        X: ``(n, d)`` points; C: ``(k, d)`` centers; cand: ``(n, m)`` candidate center indices.

    Returns:
        labels ``(n,)`` (one of each row's candidates) and exact squared distances ``(n,)``.
    """
    n, d = X.shape
    m = cand.shape[1]
    labels = torch.empty(n, dtype=torch.long, device=X.device)
    mind = torch.empty(n, dtype=X.dtype, device=X.device)
    step = max(1, _BLOCK_ELEMS // (m * d))
    csq = _row_sqnorms(C)
    xsq = _row_sqnorms(X)
    for s in range(0, n, step):
        e = min(n, s + step)
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one batched matmul over the gathered
        # candidates instead of three passes over a (b, m, d) difference
        xc = torch.bmm(C[cand[s:e]], X[s:e].unsqueeze(2)).squeeze(2)  # (b, m)
        dist = (csq[cand[s:e]] - 2.0 * xc + xsq[s:e, None]).clamp_min_(0)
        best = torch.min(dist, dim=1)
        mind[s:e] = best.values
        labels[s:e] = cand[s:e].gather(1, best.indices.unsqueeze(1)).squeeze(1)
    return labels, mind


def _refine_exact(
    X: torch.Tensor,
    pspace: _DirectSpace,
    labels: torch.Tensor,
    k: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Exact Lloyd refinement of a projected clustering, with candidate pruning.

    Each round compares every point exactly (in the original space) with its current center and
    its ``_REFINE_CANDIDATES`` nearest centers in the projection, then recomputes exact means.
    The objective never increases (the current center is always a candidate).

    Args:
        X: ``(n, d)`` original points; pspace: the projected space of the run.
        labels: ``(n,)`` clustering to refine; k: number of clusters; tol: relative stop rule.

    Returns:
        labels ``(n,)``, exact centers ``(k, d)``, exact inertia and the number of rounds run.
    """
    m = min(_REFINE_CANDIDATES, k)
    centers = _cluster_means(X, labels, k)
    obj = _inertia(X, labels, centers)
    rounds = 0
    while rounds < _REFINE_ROUNDS:
        rounds += 1
        near = _nearest_candidates(pspace.Z, pspace.zsq, pspace.means(labels, k), m)
        cand = torch.cat([labels.unsqueeze(1), near], dim=1)
        new_labels, mind = _best_of_candidates(X, centers, cand)
        _fill_empty(new_labels, mind, k)
        new_centers = _cluster_means(X, new_labels, k)
        new_obj = _inertia(X, new_labels, new_centers)
        if new_obj >= obj:
            break
        prev = obj
        labels, centers, obj = new_labels, new_centers, new_obj
        if prev - obj <= tol * prev:
            break
    return labels, centers, obj, rounds
