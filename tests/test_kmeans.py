"""Tests for netfold.fold.kmeans (k-means++ seeding, Lloyd, exact Gram reduction, projection)."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from netfold.fold.kmeans import KMeansResult, _kmeans, _onehot_sums, kmeans


def _blobs(n_per: int, k: int, d: int, spread: float, noise: float, seed: int):
    """``k`` Gaussian blobs of ``n_per`` points each; returns X (k*n_per, d) and true labels."""
    g = torch.Generator().manual_seed(seed)
    centers = spread * torch.randn(k, d, generator=g)
    labels = torch.arange(k).repeat_interleave(n_per)
    X = centers[labels] + noise * torch.randn(k * n_per, d, generator=g)
    perm = torch.randperm(k * n_per, generator=g)
    return X[perm], labels[perm]


def _check_result(res: KMeansResult, X: torch.Tensor, k: int) -> None:
    """Invariants every result must satisfy: shapes, k non-empty clusters, exact means/inertia."""
    n, d = X.shape
    assert res.labels.shape == (n,) and res.labels.dtype == torch.int64
    assert res.centers.shape == (k, d) and res.centers.dtype == X.dtype
    assert int(res.labels.min()) >= 0 and int(res.labels.max()) < k
    assert bool((torch.bincount(res.labels, minlength=k) > 0).all())
    X64 = X.double()
    lab = res.labels
    means = torch.zeros(k, d, dtype=torch.float64).index_add_(0, lab, X64)
    means /= torch.bincount(lab, minlength=k).double().unsqueeze(1)
    scale = float(X64.abs().max()) + 1.0
    torch.testing.assert_close(res.centers.double(), means, rtol=1e-5, atol=1e-5 * scale)
    inertia = float(((X64 - means[lab]) ** 2).sum())
    assert res.inertia == pytest.approx(inertia, rel=1e-5, abs=1e-6 * scale**2)


def test_deterministic_for_a_seed():
    X = torch.randn(400, 30, generator=torch.Generator().manual_seed(1))
    a = kmeans(X, 25, n_init=3, seed=7)
    b = kmeans(X, 25, n_init=3, seed=7)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.centers, b.centers)
    assert a.inertia == b.inertia and a.n_iter == b.n_iter
    # A different seed runs a different search (it may or may not find the same partition).
    c = kmeans(X, 25, n_init=1, seed=8)
    _check_result(c, X, 25)
    seeds = [kmeans(X, 25, n_init=1, seed=s).labels for s in range(4)]
    assert any(not torch.equal(seeds[0], other) for other in seeds[1:])


def test_recovers_planted_clusters_exactly():
    X, truth = _blobs(n_per=30, k=8, d=16, spread=10.0, noise=0.5, seed=0)
    res = kmeans(X, 8, seed=0)
    _check_result(res, X, 8)
    assert adjusted_rand_score(truth.numpy(), res.labels.numpy()) == 1.0


def test_recovers_planted_clusters_wide_gram_path():
    # d > n: the exact Gram (row-space) path.
    X, truth = _blobs(n_per=10, k=12, d=600, spread=1.0, noise=0.3, seed=3)
    res = kmeans(X, 12, seed=0)
    _check_result(res, X, 12)
    assert adjusted_rand_score(truth.numpy(), res.labels.numpy()) == 1.0


def test_objective_close_to_sklearn():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1000, 20, generator=g, dtype=torch.float64)
    ours = kmeans(X, 40, n_init=10, max_iter=100, seed=0)
    _check_result(ours, X, 40)
    with threadpool_limits(1):  # one thread: robust on a busy machine
        sk = KMeans(n_clusters=40, n_init=10, random_state=0).fit(X.numpy())
    assert ours.inertia <= 1.01 * sk.inertia_


def test_objective_close_to_sklearn_wide():
    # Folding-like shape: fewer points than features, k ~ n / 2 (Gram path).
    g = torch.Generator().manual_seed(5)
    X = torch.randn(200, 500, generator=g)
    ours = kmeans(X, 100, n_init=10, seed=0)
    _check_result(ours, X, 100)
    with threadpool_limits(1):
        sk = KMeans(n_clusters=100, n_init=10, random_state=0).fit(X.numpy())
    assert ours.inertia <= 1.01 * sk.inertia_


def test_k_equals_n_is_identity():
    X = torch.randn(17, 5, generator=torch.Generator().manual_seed(2))
    res = kmeans(X, 17)
    assert torch.equal(res.labels, torch.arange(17))
    assert torch.equal(res.centers, X)
    assert res.inertia == 0.0


def test_k_equals_one():
    X = torch.randn(50, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    res = kmeans(X, 1)
    assert torch.equal(res.labels, torch.zeros(50, dtype=torch.long))
    torch.testing.assert_close(res.centers, X.mean(dim=0, keepdim=True))
    assert res.inertia == pytest.approx(float(((X - X.mean(0)) ** 2).sum()), rel=1e-12)


@pytest.mark.parametrize("d", [3, 40])  # direct path and Gram path
def test_empty_clusters_are_filled_with_duplicates(d: int):
    # 4 distinct points repeated 10 times each, k = 7 > 4 distinct points.
    base = torch.randn(4, d, generator=torch.Generator().manual_seed(4))
    X = base.repeat(10, 1)
    for init in ("k-means++", "random"):
        res = kmeans(X, 7, n_init=2, seed=0, init=init)
        _check_result(res, X, 7)
        # Every cluster holds copies of one distinct point: zero inertia.
        assert res.inertia == pytest.approx(0.0, abs=1e-6)


def test_all_points_identical():
    X = torch.ones(20, 8)
    res = kmeans(X, 5, seed=0)
    _check_result(res, X, 5)
    assert res.inertia == 0.0


def test_exact_reduction_matches_unreduced_clustering():
    # Same problem solved on the centered points (direct) and through the n x n Gram matrix.
    g = torch.Generator().manual_seed(6)
    X = torch.randn(150, 400, generator=g, dtype=torch.float64)
    common = dict(n_init=3, max_iter=30, tol=1e-4, seed=0, projection_dim=None, init="k-means++")
    direct = _kmeans(X, 30, space="direct", **common)
    gram = _kmeans(X, 30, space="gram", **common)
    assert torch.equal(direct.labels, gram.labels)
    assert gram.inertia == pytest.approx(direct.inertia, rel=1e-9)
    torch.testing.assert_close(gram.centers, direct.centers)
    # The public entry point takes the Gram path here (d > n) and agrees as well.
    auto = kmeans(X, 30, n_init=3, max_iter=30, seed=0)
    assert torch.equal(auto.labels, gram.labels)


def test_isometric_embedding_gives_same_clustering():
    # Rotating 60-d points into 300 dims (d > n: Gram path) preserves all distances.
    g = torch.Generator().manual_seed(7)
    X = torch.randn(120, 60, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(300, 60, generator=g, dtype=torch.float64))
    low = kmeans(X, 20, n_init=2, seed=0)
    high = kmeans(X @ Q.T, 20, n_init=2, seed=0)
    assert torch.equal(low.labels, high.labels)
    assert high.inertia == pytest.approx(low.inertia, rel=1e-9)


def test_random_projection_gives_exact_centers_and_good_objective():
    X, truth = _blobs(n_per=8, k=25, d=2000, spread=1.0, noise=0.5, seed=8)
    exact = kmeans(X, 25, n_init=2, seed=0)
    proj = kmeans(X, 25, n_init=2, seed=0, projection_dim=64)
    _check_result(proj, X, 25)
    assert adjusted_rand_score(truth.numpy(), proj.labels.numpy()) == 1.0
    assert proj.inertia <= 1.001 * exact.inertia
    again = kmeans(X, 25, n_init=2, seed=0, projection_dim=64)
    assert torch.equal(proj.labels, again.labels)
    auto = kmeans(X, 25, n_init=2, seed=0, projection_dim="auto")  # Gram applies -> exact
    assert torch.equal(auto.labels, exact.labels)


def test_float64_and_half_inputs():
    X = torch.randn(120, 10, generator=torch.Generator().manual_seed(9))
    r64 = kmeans(X.double(), 6, n_init=2)
    _check_result(r64, X.double(), 6)
    r16 = kmeans(X.to(torch.bfloat16), 6, n_init=2)
    assert r16.centers.dtype == torch.bfloat16
    assert bool((torch.bincount(r16.labels, minlength=6) > 0).all())


def test_iteration_budget_and_tolerance():
    X = torch.randn(500, 8, generator=torch.Generator().manual_seed(10))
    one = kmeans(X, 10, n_init=1, max_iter=1)
    assert one.n_iter == 1
    full = kmeans(X, 10, n_init=1, max_iter=200, tol=0.0)
    assert full.n_iter <= 200 and full.inertia <= one.inertia
    assert math.isfinite(full.inertia)


@pytest.mark.parametrize(
    ("X", "k", "kwargs"),
    [
        (torch.randn(10, 3), 0, {}),
        (torch.randn(10, 3), 11, {}),
        (torch.randn(10, 3), -1, {}),
        (torch.randn(10, 3), 2.0, {}),
        (torch.randn(10, 3), True, {}),
        (torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [1.0, 1.0]]), 2, {}),
        (torch.tensor([[0.0, 1.0], [float("inf"), 0.0], [1.0, 1.0]]), 2, {}),
        (torch.randn(10), 2, {}),
        (torch.randn(2, 3, 4), 2, {}),
        (torch.randint(0, 5, (10, 3)), 2, {}),
        (torch.randn(0, 3), 1, {}),
        (torch.randn(10, 3), 2, {"n_init": 0}),
        (torch.randn(10, 3), 2, {"max_iter": 0}),
        (torch.randn(10, 3), 2, {"tol": -1.0}),
        (torch.randn(10, 3), 2, {"projection_dim": 0}),
        (torch.randn(10, 3), 2, {"projection_dim": "fast"}),
        (torch.randn(10, 3), 2, {"init": "kmeans||"}),
    ],
)
def test_bad_inputs_raise_value_error(X, k, kwargs):
    with pytest.raises(ValueError):
        kmeans(X, k, **kwargs)


def test_onehot_cluster_sums_match_index_add():
    # The CUDA code path's deterministic cluster sums, checked on CPU.
    g = torch.Generator().manual_seed(12)
    Z = torch.randn(300, 7, generator=g)
    labels = torch.randint(0, 40, (300,), generator=g)
    ref = torch.zeros(40, 7, dtype=torch.float64).index_add_(0, labels, Z.double())
    out = _onehot_sums(Z, labels, 40)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    X, truth = _blobs(n_per=10, k=30, d=500, spread=1.0, noise=0.4, seed=11)
    cpu = kmeans(X, 30, n_init=2, seed=0)
    gpu = kmeans(X.cuda(), 30, n_init=2, seed=0)
    assert gpu.labels.device.type == "cuda"
    assert adjusted_rand_score(cpu.labels.numpy(), gpu.labels.cpu().numpy()) == 1.0
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-4)
    again = kmeans(X.cuda(), 30, n_init=2, seed=0)
    assert torch.equal(gpu.labels, again.labels)


def _kmeanspp_violations(
    X: torch.Tensor, seeds: torch.Tensor, firsts: list[int], us: list[torch.Tensor], rtol: float
) -> list[str]:
    """Where ``seeds`` (runs, k) is not a greedy k-means++ path for the draws ``firsts``/``us``.

    An independent float64 replay: each step's candidates come from the step's uniform draws
    (inverse CDF of the squared distance to the nearest chosen seed) and the chosen one must
    have the lowest potential among them. Both comparisons carry a relative tolerance
    ``rtol``: at an exact tie (equal potentials, or a draw on a CDF boundary) any of the tied
    candidates is a correct choice, and which one a float sum picks depends on the CPU's
    SIMD kernels, so the replay follows the path under test instead of comparing indices.
    """
    X64 = X.to(torch.float64)
    sq = (X64 * X64).sum(1)
    D = (sq[:, None] + sq[None, :] - 2.0 * X64 @ X64.t()).clamp_min(0.0)  # (n, n)
    bad: list[str] = []
    for r, path in enumerate(seeds.tolist()):
        if path[0] != firsts[r]:
            bad.append(f"run {r}: first seed {path[0]} != drawn {firsts[r]}")
            continue
        closest = D[path[0]].clone()
        for c in range(1, len(path)):
            cum = torch.cumsum(closest, 0)
            tol = rtol * float(cum[-1])
            target = us[r][c - 1] * cum[-1]  # (trials,)
            lo = torch.cat([torch.zeros(1, dtype=cum.dtype), cum[:-1]])
            # candidate j covers (lo_j, cum_j]; widen by tol so boundary draws allow both sides
            ok = (lo[None, :] - tol <= target[:, None]) & (target[:, None] <= cum[None, :] + tol)
            ok[:, -1] |= target > cum[-1]  # searchsorted past the end clamps to n - 1
            pick = path[c]
            if not bool(ok[:, pick].any()):
                bad.append(f"run {r} step {c}: seed {pick} is not a drawn candidate")
                break
            pots = torch.minimum(D, closest).sum(1)  # (n,) potential after choosing j
            # each trial drew one of its allowed candidates; at worst the highest-potential one
            per_trial = torch.where(ok, pots[None, :], torch.full_like(pots, -1.0)).amax(1)
            best = float(per_trial.min())
            pot = float(pots[pick])
            if pot > best * (1.0 + rtol):
                bad.append(f"run {r} step {c}: potential {pot} > best candidate's {best}")
                break
            closest = torch.minimum(D[pick], closest)
    return bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_seeding_is_greedy_kmeanspp_on_the_same_draws(dtype):
    """The lockstep NumPy seeding of n_init runs uses the draws one run at a time would use
    and makes greedy k-means++ choices, checked against a float64 replay with a tolerance.

    Indices are not compared between NumPy and torch: at a near-tie of two candidates' potentials
    the two libraries' float sums round differently on different CPUs (AMD vs Intel SIMD) and
    either choice is correct.
    """
    from netfold.fold import kmeans as K

    X = torch.randn(300, 400, generator=torch.Generator().manual_seed(7), dtype=dtype)
    Xc = X - X.mean(0, keepdim=True)
    space = K._GramSpace(Xc)
    k, runs = 120, 4
    trials = 2 + int(math.log(k))
    gen = torch.Generator().manual_seed(5)
    firsts, us = [], []
    for _ in range(runs):  # the draw order both implementations document
        firsts.append(int(torch.randint(300, (1,), generator=gen)))
        us.append(torch.rand(k - 1, trials, generator=gen, dtype=torch.float64))
    rtol = 1e-4 if dtype == torch.float32 else 1e-9
    batch = K._kmeanspp_gram_cpu_batch(space, k, torch.Generator().manual_seed(5), runs)
    assert batch.shape == (runs, k)
    assert all(len(set(row.tolist())) == k for row in batch)  # k distinct points per run
    assert _kmeanspp_violations(Xc, batch, firsts, us, rtol) == []
    gen = torch.Generator().manual_seed(5)
    seq = torch.stack([K._kmeanspp(space, k, gen) for _ in range(runs)])
    assert _kmeanspp_violations(Xc, seq, firsts, us, rtol) == []
    # the seedings are good ones, and the two implementations' potentials agree closely
    X64 = Xc.double()

    def potential(idx: torch.Tensor) -> float:
        C = X64[idx]
        return float(torch.cdist(X64, C).pow(2).min(1).values.sum())

    for r in range(runs):
        assert potential(batch[r]) == pytest.approx(potential(seq[r]), rel=0.02)
    # negative controls: a worse candidate at one step, and another seed's seedings
    broken = batch.clone()
    D = torch.cdist(X64, X64).pow(2)
    closest = D[broken[0, :10]].min(0).values
    worst = int(torch.argmax(torch.minimum(D, closest).sum(1)))  # a far-from-greedy choice
    broken[0, 10] = worst
    assert _kmeanspp_violations(Xc, broken, firsts, us, rtol)
    other = K._kmeanspp_gram_cpu_batch(space, k, torch.Generator().manual_seed(6), runs)
    assert not torch.equal(other, batch)
    assert _kmeanspp_violations(Xc, other, firsts, us, rtol)


# ------------------------------------------------------- every clustering method, planted blobs
@pytest.mark.parametrize(
    "method",
    [
        "kmeans",
        "agglomerative-ward",
        "agglomerative-complete",
        "agglomerative-average",
        "agglomerative-single",
        "spectral",
        "greedy",
    ],
)
@pytest.mark.parametrize("d", [6, 120])  # direct features and d > n (exact Gram reduction)
def test_every_cluster_method_recovers_planted_clusters(method, d):
    """Well-separated blobs of unequal sizes: exact partition up to relabelling, canonical
    labels (first appearance order) and the folding cost equal to the blobs' scatter."""
    from netfold.config import CLUSTER_METHODS
    from netfold.fold.cluster import cluster

    assert method in CLUSTER_METHODS
    g = torch.Generator().manual_seed(21)
    # unequal sizes, each above spectral's 10 nearest neighbours (a smaller blob is linked to
    # other blobs in its k-NN graph and cannot be separated: a property of that affinity)
    sizes = [12, 17, 11, 14, 20, 13]
    truth = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    truth = truth[torch.randperm(len(truth), generator=g)]
    centers = 20.0 * torch.randn(len(sizes), d, generator=g, dtype=torch.float64)
    X = centers[truth] + 0.1 * torch.randn(len(truth), d, generator=g, dtype=torch.float64)
    res = cluster(X, len(sizes), method, seed=0)
    assert adjusted_rand_score(truth.numpy(), res.labels.numpy()) == 1.0
    first = [int(res.labels[(truth == t).nonzero()[0, 0]]) for t in truth.unique(sorted=False)]
    assert res.labels[0] == 0 and int(res.labels.max()) == len(sizes) - 1
    assert len(set(first)) == len(sizes)
    seen: list[int] = []
    for v in res.labels.tolist():  # canonical: ids appear in increasing order
        if v not in seen:
            assert v == len(seen)
            seen.append(v)
    scatter = sum(float(((X[truth == t] - X[truth == t].mean(0)) ** 2).sum()) for t in range(6))
    assert res.cost == pytest.approx(scatter, rel=1e-9)
    # negative control: the cost of a wrong partition (two blobs swapped a member) is far higher
    wrong = res.labels.clone()
    i, j = int((res.labels == 0).nonzero()[0, 0]), int((res.labels == 1).nonzero()[0, 0])
    wrong[i], wrong[j] = 1, 0
    from netfold.fold.cluster import folding_cost

    assert folding_cost(X, wrong, 6) > 100 * scatter


def test_greedy_merges_the_closest_pair_first():
    from netfold.fold.cluster import greedy_pairing

    X = torch.tensor([[0.0], [10.0], [10.5], [30.0], [31.5]], dtype=torch.float64)
    assert greedy_pairing(X, 4).tolist() == [0, 1, 1, 2, 3]
    assert greedy_pairing(X, 3).tolist() == [0, 1, 1, 2, 2]
    assert greedy_pairing(X, 2).tolist() == [0, 0, 0, 1, 1]
    # merged clusters are represented by their (size-weighted) centroid: after {10, 11} merge
    # at 10.5, 5.3 is 5.2 from it and 5.3 from 0 (with 11 as the "centroid" it would join 0)
    X = torch.tensor([[0.0], [5.3], [10.0], [11.0]], dtype=torch.float64)
    assert greedy_pairing(X, 2).tolist() == [0, 1, 1, 1]


# gaps 1, 1.1, 1.2, 1.3, 1.4, 1.6 between seven points on a line; partitions worked out by hand
_LINE = [0.0, 1.0, 2.1, 3.3, 4.6, 6.0, 7.6]
_LINKAGE = {
    # single: cut the largest gaps
    "agglomerative-single": ([0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1, 2]),
    # complete: ab(1), cd(1.2), ef(1.4), ef+g (max 3.0 < ab-cd 3.3), then ab+cd (3.3)
    "agglomerative-complete": ([0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2, 2]),
    # average: ab, cd, ef, then ab+cd (mean 2.2 < ef-g 2.3 < cd-ef 2.6), then ef+g
    "agglomerative-average": ([0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 2]),
    # centroids: ab, cd, ef, then 0.5-2.7 (2.2) before 5.3-7.6 (2.3), then efg
    "greedy": ([0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 2]),
}


@pytest.mark.parametrize("method", sorted(_LINKAGE))
def test_linkages_differ_as_worked_out_by_hand(method):
    """Each method name reaches its own linkage: on a chain of points they disagree."""
    from netfold.fold.cluster import cluster

    X = torch.tensor(_LINE, dtype=torch.float64)[:, None]
    two, three = _LINKAGE[method]
    assert cluster(X, 2, method).labels.tolist() == two
    assert cluster(X, 3, method).labels.tolist() == three
