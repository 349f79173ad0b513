"""Benchmark netfold.fold.kmeans against scikit-learn KMeans on model-folding shapes.

Run from the repository root (takes ~40-80 min on a busy 2-core machine, mostly scikit-learn):

    nohup .venv/bin/python benchmarks/kmeans_bench.py > /tmp/kmeans_bench.log 2>&1 &

Options: ``--shapes smollm2-135m-mlp llama-7b-mlp`` (default: both), ``--seed 0``,
``--out benchmarks/results/kmeans.json``, ``--sklearn-budget-s 4000`` (wall-time budget of one
scikit-learn run; see below), ``--sklearn-max-init-s 5400`` (do not run scikit-learn at all if
its seeding alone is estimated above this; only the estimate is then reported),
``--no-n-init-10`` (skip the extra netfold run with n_init=10).

Problems (one k-means per channel group of a model, features = concatenated weights):

* ``llama-7b-mlp``: LLaMA-7B MLP group, 11008 channels x 12288 features (gate + up rows and the
  down column, 3 x 4096), k = 5504 (fold ratio 0.5);
* ``smollm2-135m-mlp``: SmolLM2-135M MLP group, 1536 x 1728 (3 x 576), k = 1229 (ratio 0.2).

Data (``make_mixture``, float32, one ``torch.Generator`` seeded with ``--seed``): ``k`` latent
centers ``c_j ~ N(0, I_d)``; every point picks a latent center uniformly at random (so some
latent centers get no point and others several); per-center noise std ``s_j ~ U(0.5, 1.5)``;
``x_i = c_{a_i} + s_{a_i} * N(0, I_d)``.

Compared, on the same data in the same process:

* netfold ``kmeans(X, k, n_init=1, seed=seed)`` (defaults otherwise: k-means++ with
  ``2 + int(log k)`` trials, max_iter=20, tol=1e-4, exact; float32 input), plus (info) the
  default ``n_init=10``;
* scikit-learn ``KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=seed)``
  (default max_iter=300 unless capped, see below).

scikit-learn configuration: before each scikit-learn run the script times a few steps of
``sklearn.cluster.kmeans_plusplus`` (the seeding KMeans runs first; its steps all cost the same)
on the full data for float32 and float64 input and for ``threadpool_limits(1)`` versus the
default thread pools, and runs KMeans in the fastest of the four (float32 input makes
scikit-learn's seeding distances upcast chunks to float64; on a loaded machine a single thread
avoids thread-barrier stalls). It also times one Lloyd iteration on a slice (n/4 points, k/4
centers; cost scales with n*k) to extrapolate the iteration cost. If the estimated seeding time
plus 300 iterations exceeds ``--sklearn-budget-s``, ``max_iter`` is capped to fit the budget
(at least 1); the note in the JSON says so. All times and objectives are measured by this
script; estimates are recorded as estimates.

Objectives are re-evaluated in float64 on the same data: ``objective`` = sum of squared
distances of points to the mean of their cluster (for scikit-learn also with its own returned
centers, which can differ from the means of its final labels).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch
from sklearn.cluster import KMeans, kmeans_plusplus
from threadpoolctl import threadpool_info, threadpool_limits

from netfold.bench import meta
from netfold.fold.kmeans import kmeans

SHAPES: dict[str, dict[str, Any]] = {
    "llama-7b-mlp": {
        "n": 11008,
        "d": 12288,
        "k": 5504,
        "what": "LLaMA-7B MLP group: 11008 channels, gate+up rows and down column (3 x 4096)",
    },
    "smollm2-135m-mlp": {
        "n": 1536,
        "d": 1728,
        "k": 1229,
        "what": "SmolLM2-135M MLP group: 1536 channels, gate+up rows and down column (3 x 576)",
    },
}
TARGET_GAP = 0.01
TARGET_TIME_RATIO = 0.1
SKLEARN_MAX_ITER = 300


def make_mixture(n: int, d: int, k: int, seed: int) -> torch.Tensor:
    """Seeded Gaussian mixture, ``(n, d)`` float32 (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g)
    assign = torch.randint(k, (n,), generator=g)
    scale = 0.5 + torch.rand(k, generator=g)
    X = torch.randn(n, d, generator=g)
    X.mul_(scale[assign].unsqueeze(1)).add_(centers[assign])
    return X


def objective(X: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor | None = None) -> float:
    """Float64 ``sum_i ||x_i - c_{l_i}||^2``; ``centers=None`` uses the means of the labels."""
    n, d = X.shape
    labels = labels.long()
    k = int(labels.max()) + 1
    step = 512
    if centers is None:
        sums = torch.zeros(k, d, dtype=torch.float64)
        for s in range(0, n, step):
            sums.index_add_(0, labels[s : s + step], X[s : s + step].double())
        centers = sums / torch.bincount(labels, minlength=k).double().unsqueeze(1)
    centers = centers.double()
    total = 0.0
    for s in range(0, n, step):
        diff = X[s : s + step].double() - centers[labels[s : s + step]]
        total += float((diff * diff).sum())
    return total


def machine_info() -> dict[str, Any]:
    """:func:`netfold.bench.meta.machine` plus what k-means timings depend on (BLAS pools)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    pools = [
        {key: p.get(key) for key in ("user_api", "internal_api", "num_threads", "version")}
        for p in threadpool_info()
    ]
    return {
        **meta.machine(),
        "cpus_available": affinity,
        "memory_gb": mem_gb,
        "torch_blas": "MKL" if torch.backends.mkl.is_available() else "other",
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
        "threadpools": pools,
        "env_threads": {
            v: os.environ.get(v)
            for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
        },
        "cuda_available": torch.cuda.is_available(),
    }


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_netfold(X: torch.Tensor, k: int, seed: int, n_init: int) -> dict[str, Any]:
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    res = kmeans(X, k, n_init=n_init, seed=seed)
    wall = time.perf_counter() - t0
    obj = objective(X, res.labels, res.centers)
    out = {
        "call": f"kmeans(X, k={k}, n_init={n_init}, seed={seed})",
        "settings": {
            "n_init": n_init,
            "max_iter": 20,
            "tol": 1e-4,
            "init": "k-means++",
            "projection_dim": None,
            "input_dtype": str(X.dtype),
        },
        "time_s": wall,
        "n_iter": res.n_iter,
        "inertia_reported": res.inertia,
        "objective": obj,
        "clusters_nonempty": int((torch.bincount(res.labels, minlength=k) > 0).sum()),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    log(f"netfold n_init={n_init}: {wall:.2f} s, objective {obj:.6g}, n_iter {res.n_iter}")
    return out


def calibrate_sklearn(X: torch.Tensor, k: int, seed: int) -> dict[str, Any]:
    """Time k-means++ steps of scikit-learn in 4 configurations and one Lloyd iteration."""
    n, d = X.shape
    trials = 2 + int(math.log(k))
    steps = 40 if n * d <= 10_000_000 else 4
    arrays = {"float32": X.numpy(), "float64": X.double().numpy()}
    configs = []
    for dtype in ("float32", "float64"):
        for threads in (1, None):
            with threadpool_limits(limits=threads):
                t0 = time.perf_counter()
                kmeans_plusplus(arrays[dtype], steps, random_state=seed, n_local_trials=trials)
                wall = time.perf_counter() - t0
            per_step = wall / steps
            configs.append(
                {
                    "dtype": dtype,
                    "threadpool_limit": threads,
                    "kmeanspp_steps_timed": steps,
                    "kmeanspp_time_s": wall,
                    "kmeanspp_s_per_step": per_step,
                    "est_init_s": per_step * k,
                }
            )
            log(
                f"calibration {dtype} threads={threads}: {per_step:.4f} s/step -> init ~{per_step * k:.0f} s"
            )
    best = min(configs, key=lambda c: c["kmeanspp_s_per_step"])
    # One Lloyd iteration (plus scikit-learn's final assignment) on a slice: n/4 points,
    # k/4 centers; a Lloyd iteration costs ~ n * k * d, so scale by 16. Full size when small.
    frac = 1 if n * d <= 10_000_000 else 4
    ns, ks = n // frac, k // frac
    Xs = arrays[best["dtype"]][:ns]
    with threadpool_limits(limits=best["threadpool_limit"]):
        t0 = time.perf_counter()
        KMeans(n_clusters=ks, init=Xs[:ks], n_init=1, max_iter=1).fit(Xs)
        wall = time.perf_counter() - t0
    iter_est = wall * frac * frac
    log(f"calibration Lloyd iteration on {ns}x{d}, k={ks}: {wall:.2f} s -> full ~{iter_est:.1f} s")
    del arrays
    return {
        "configs": configs,
        "chosen": {"dtype": best["dtype"], "threadpool_limit": best["threadpool_limit"]},
        "lloyd_slice": {"n": ns, "k": ks, "max_iter": 1, "time_s": wall, "scale": frac * frac},
        "est_init_s": best["est_init_s"],
        "est_lloyd_iter_s": iter_est,
    }


def run_sklearn(
    X: torch.Tensor,
    k: int,
    seed: int,
    dtype: str,
    threads: int | None,
    max_iter: int,
) -> dict[str, Any]:
    arr = X.numpy() if dtype == "float32" else X.double().numpy()
    load_before = os.getloadavg()
    with threadpool_limits(limits=threads):
        t0 = time.perf_counter()
        km = KMeans(
            n_clusters=k, init="k-means++", n_init=1, random_state=seed, max_iter=max_iter
        ).fit(arr)
        wall = time.perf_counter() - t0
    del arr
    labels = torch.from_numpy(km.labels_.astype(np.int64))
    obj_means = objective(X, labels)
    obj_own = objective(X, labels, torch.from_numpy(km.cluster_centers_))
    out = {
        "call": (
            f"KMeans(n_clusters={k}, init='k-means++', n_init=1, random_state={seed}, "
            f"max_iter={max_iter}).fit(X.astype({dtype}))"
            f" under threadpool_limits({threads})"
        ),
        "settings": {"input_dtype": dtype, "threadpool_limit": threads, "max_iter": max_iter},
        "time_s": wall,
        "n_iter": int(km.n_iter_),
        "hit_max_iter": int(km.n_iter_) >= max_iter,
        "inertia_reported": float(km.inertia_),
        "objective": obj_means,
        "objective_own_centers": obj_own,
        "clusters_nonempty": int(np.unique(km.labels_).size),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    log(
        f"sklearn {dtype} threads={threads} max_iter={max_iter}: {wall:.2f} s, objective {obj_means:.6g}, n_iter {km.n_iter_}"
    )
    return out


def bench_shape(
    name: str, seed: int, budget_s: float, max_init_s: float, n_init_10: bool
) -> dict[str, Any]:
    spec = SHAPES[name]
    n, d, k = spec["n"], spec["d"], spec["k"]
    log(f"=== {name}: n={n} d={d} k={k}")
    X = make_mixture(n, d, k, seed)
    result: dict[str, Any] = {"n": n, "d": d, "k": k, "what": spec["what"]}
    result["netfold"] = run_netfold(X, k, seed, n_init=1)
    if n_init_10:
        result["netfold_n_init_10"] = run_netfold(X, k, seed, n_init=10)

    calib = calibrate_sklearn(X, k, seed)
    result["sklearn_calibration"] = calib
    est_init, est_iter = calib["est_init_s"], calib["est_lloyd_iter_s"]
    max_iter = SKLEARN_MAX_ITER
    capped = False
    if est_init + SKLEARN_MAX_ITER * est_iter > budget_s:
        max_iter = max(1, min(SKLEARN_MAX_ITER, int((budget_s - est_init) // max(est_iter, 1e-9))))
        capped = max_iter < SKLEARN_MAX_ITER
    chosen = calib["chosen"]
    if est_init > max_init_s:
        # Not run: report the measured per-step extrapolation only.
        result["sklearn"] = None
        result["sklearn_note"] = (
            f"scikit-learn NOT run: its k-means++ seeding alone was estimated at {est_init:.0f} s "
            f"(> --sklearn-max-init-s {max_init_s:.0f}) from the measured per-step times in "
            f"sklearn_calibration (fastest configuration {chosen}); one Lloyd iteration "
            f"~{est_iter:.1f} s (slice-extrapolated). No sklearn objective available."
        )
        nf = result["netfold"]
        est_total = est_init + est_iter
        result["comparison"] = {
            "time_ratio_netfold_over_sklearn_estimate": nf["time_s"] / est_total,
            "sklearn_time_estimate_s": est_total,
            "sklearn_time_estimate_basis": "extrapolated seeding + 1 Lloyd iteration (lower bound)",
            "objective_gap_rel": None,
            "target_met": None,
        }
        return result
    sk = run_sklearn(X, k, seed, chosen["dtype"], chosen["threadpool_limit"], max_iter)
    result["sklearn"] = sk

    note = (
        f"scikit-learn ran in its fastest calibrated configuration (input {chosen['dtype']}, "
        f"threadpool_limits({chosen['threadpool_limit']}); per-step k-means++ times of all four "
        f"configurations are in sklearn_calibration). Estimated before the run: seeding "
        f"{est_init:.0f} s, {est_iter:.1f} s per Lloyd iteration. "
    )
    if capped:
        note += (
            f"Because seeding + {SKLEARN_MAX_ITER} iterations could exceed the budget of "
            f"{budget_s:.0f} s, max_iter was capped at {max_iter}. "
        )
    else:
        note += f"Default max_iter={SKLEARN_MAX_ITER}, not capped. "
    if sk["hit_max_iter"]:
        note += (
            f"The run stopped at the cap (n_iter_={sk['n_iter']}), not converged by "
            "scikit-learn's criterion, so its time is a lower bound of an uncapped run and its "
            "objective may be above a converged one. "
        )
    else:
        note += f"It converged by scikit-learn's criterion after {sk['n_iter']} iterations. "
    note += (
        f"The reported time is one measured KMeans.fit: the full k-means++ seeding plus the "
        f"{sk['n_iter']} Lloyd iterations it ran; nothing is extrapolated."
    )
    result["sklearn_note"] = note

    if n * d <= 10_000_000:
        # Small enough: also scikit-learn's out-of-the-box configuration (float32, default pools).
        result["sklearn_default_config"] = run_sklearn(
            X, k, seed, "float32", None, SKLEARN_MAX_ITER
        )

    nf, skl = result["netfold"], result["sklearn"]
    ratio = nf["time_s"] / skl["time_s"]
    gap = (nf["objective"] - skl["objective"]) / skl["objective"]
    result["comparison"] = {
        "time_ratio_netfold_over_sklearn": ratio,
        "speedup_sklearn_over_netfold": 1.0 / ratio,
        "objective_gap_rel": gap,
        "objective_gap_rel_vs_sklearn_own_centers": (nf["objective"] - skl["objective_own_centers"])
        / skl["objective_own_centers"],
        "target": f"gap <= {TARGET_GAP:.0%} and time ratio <= {TARGET_TIME_RATIO}",
        "target_met": bool(gap <= TARGET_GAP and ratio <= TARGET_TIME_RATIO),
    }
    log(f"{name}: time ratio {ratio:.4f} (speedup {1 / ratio:.1f}x), objective gap {gap:+.4%}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m-mlp", "llama-7b-mlp"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/kmeans.json")
    parser.add_argument("--sklearn-budget-s", type=float, default=4000.0)
    parser.add_argument("--sklearn-max-init-s", type=float, default=5400.0)
    parser.add_argument("--no-n-init-10", action="store_true")
    args = parser.parse_args()
    for s in args.shapes:
        if s not in SHAPES:
            parser.error(f"unknown shape {s!r}; choose from {sorted(SHAPES)}")

    started = _dt.datetime.now(_dt.timezone.utc)
    report: dict[str, Any] = {
        "benchmark": "netfold.fold.kmeans vs sklearn.cluster.KMeans",
        "command": meta.command(),
        "date_utc": started.isoformat(timespec="seconds"),
        "git_commit": meta.git_revision(),
        "seed": args.seed,
        "machine": machine_info(),
        "loadavg_at_start": os.getloadavg(),
        "data": (
            "make_mixture(n, d, k, seed): float32; k latent centers c_j ~ N(0, I_d); each point "
            "picks a latent center uniformly at random; per-center noise std s_j ~ U(0.5, 1.5); "
            "x_i = c_{a_i} + s_{a_i} * N(0, I_d); one torch.Generator seeded with `seed`."
        ),
        "objective_definition": (
            "float64 sum of squared distances of points to the mean of their cluster; "
            "objective_gap_rel = (netfold - sklearn) / sklearn"
        ),
        "sklearn_budget_s": args.sklearn_budget_s,
        "shapes": {},
    }
    # Warm-up both libraries (thread pools, kernels) on a small problem.
    Xw = make_mixture(600, 300, 100, args.seed + 1)
    kmeans(Xw, 100, n_init=1)
    KMeans(n_clusters=100, n_init=1, random_state=0).fit(Xw.numpy())

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.shapes:
        report["shapes"][name] = bench_shape(
            name, args.seed, args.sklearn_budget_s, args.sklearn_max_init_s, not args.no_n_init_10
        )
        report["loadavg_at_end"] = os.getloadavg()
        report["total_wall_s"] = (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds()
        from netfold.atomic import write_json

        write_json(out, report, indent=2)  # partial results survive a crash
        log(f"wrote {out}")


if __name__ == "__main__":
    main()
