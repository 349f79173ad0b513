"""Latency measurement: medians of repeated runs after warm-up, with the thread count stated.

On a shared machine single timings are noise. :func:`measure_interleaved` runs several
candidates in rounds (every candidate in each round, order shuffled), so a burst of load from
elsewhere hits all of them alike and ratios taken from one run stay meaningful; the median over
all timed calls is reported with the 10th/90th percentiles.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = [
    "LatencyStats",
    "measure_latency",
    "measure_interleaved",
    "torch_threads",
    "machine_info",
    "format_latency_table",
]


@dataclass
class LatencyStats:
    """Wall-clock latency of one callable (milliseconds).

    Attributes:
        median_ms / p10_ms / p90_ms / min_ms / mean_ms: over the timed runs.
        runs: number of timed runs.
        warmup: untimed runs before them.
        threads: intra-op threads in effect.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    runs: int
    warmup: int
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _stats(times_s: list[float], warmup: int, threads: int) -> LatencyStats:
    ms = [t * 1e3 for t in times_s]
    return LatencyStats(
        median_ms=statistics.median(ms),
        p10_ms=_quantile(ms, 0.1),
        p90_ms=_quantile(ms, 0.9),
        min_ms=min(ms),
        mean_ms=statistics.fmean(ms),
        runs=len(ms),
        warmup=warmup,
        threads=threads,
    )


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Set ``torch.set_num_threads`` for the block (restored afterwards); yields the count."""
    old = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def measure_latency(
    fn: Callable[[], Any], *, warmup: int = 5, repeats: int = 30, threads: int | None = None
) -> LatencyStats:
    """Median latency of ``fn()`` over ``repeats`` timed runs after ``warmup`` untimed ones.

    Args:
        fn: zero-argument callable (e.g. ``lambda: model(x)``); run under ``torch.no_grad``.
        warmup: untimed calls first (allocator, oneDNN primitive caches, lazy init).
        repeats: timed calls.
        threads: torch intra-op threads during the measurement (None: leave as is).

    Returns:
        :class:`LatencyStats`.
    """
    return measure_interleaved(
        {"fn": fn}, warmup=warmup, repeats=repeats, threads=threads, settle_calls=0
    )["fn"]


def measure_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
    calls_per_round: int = 1,
    settle_calls: int = 1,
    seed: int = 0,
) -> dict[str, LatencyStats]:
    """Time several callables in rounds: each round runs every callable, in a shuffled order.

    Within a round a callable first gets ``settle_calls`` untimed calls, then
    ``calls_per_round`` timed ones. The untimed calls absorb the previous candidate's thread-pool
    tail: ONNX Runtime and OpenMP worker threads keep spinning for a while after a run, and a
    different runtime starting right then is measured up to 2x slow (measured here with two ORT
    sessions alternating: 75 ms vs 38 ms each).

    Args:
        fns: name -> zero-argument callable.
        warmup: untimed calls of each first.
        repeats: rounds.
        threads: torch intra-op threads during the measurement (None: leave as is). ONNX
            Runtime sessions carry their own thread count.
        calls_per_round: timed calls per callable per round (``runs = repeats * calls_per_round``).
        settle_calls: untimed calls per callable per round, before its timed ones.
        seed: seeds the per-round order.

    Returns:
        name -> :class:`LatencyStats` over all timed calls.
    """
    if repeats < 1 or warmup < 0 or calls_per_round < 1 or settle_calls < 0:
        raise ValueError(
            "need repeats >= 1, calls_per_round >= 1, warmup >= 0, settle_calls >= 0; got "
            f"{repeats}, {calls_per_round}, {warmup}, {settle_calls}"
        )
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(seed)
    with torch_threads(threads) as n_threads, torch.no_grad():
        for n in names:
            for _ in range(warmup):
                fns[n]()
        for _ in range(repeats):
            order = names[:]
            rng.shuffle(order)
            for n in order:
                fn = fns[n]
                for _ in range(settle_calls):
                    fn()
                for _ in range(calls_per_round):
                    t0 = time.perf_counter()
                    fn()
                    times[n].append(time.perf_counter() - t0)
    return {n: _stats(times[n], warmup, n_threads) for n in names}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model, core count, load, library versions and the date, for a results file."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        info["loadavg_1_5_15"] = list(os.getloadavg())
    except OSError:
        pass
    for mod in ("onnxruntime", "onnx", "torchvision", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            pass
    return info


def format_latency_table(result: dict[str, Any]) -> str:
    """A markdown table from :func:`netfold.fuse.bench.benchmark_paths` results."""
    lines = [
        "| model | batch | path | median ms | p10-p90 ms | speed-up vs eager | max abs err vs eager |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for entry in result.get("models", [result]):
        name = entry.get("model", "?")
        for batch, row in entry.get("batches", {}).items():
            base = row["latency"].get("eager", {}).get("median_ms")
            for path, st in row["latency"].items():
                sp = f"{base / st['median_ms']:.2f}x" if base else "-"
                err = row.get("max_abs_err", {}).get(path)
                err_s = "-" if err is None else f"{err:.1e}"
                lines.append(
                    f"| {name} | {batch} | {path} | {st['median_ms']:.2f} | "
                    f"{st['p10_ms']:.2f}-{st['p90_ms']:.2f} | {sp} | {err_s} |"
                )
    return "\n".join(lines)
