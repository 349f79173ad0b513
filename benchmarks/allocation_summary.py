"""Mean and spread over clustering seeds: uniform widths vs cost-based allocation.

Run: netfold bench benchmarks/configs/fmnist_allocation_seeds.json
     python benchmarks/allocation_summary.py [benchmarks/results/fmnist_allocation_seeds.json]

Reads only the results JSON and prints a Markdown table (accuracy mean +- standard deviation
over seeds, and the per-seed difference cost - uniform) for docs/baselines.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def summarize(results: dict) -> str:
    acc: dict[tuple[str, float, str], dict[int, float]] = defaultdict(dict)
    sparsity: dict[tuple[str, float], float] = {}
    for r in results["rows"]:
        kind = "cost" if r["allocation"] == "cost" else "uniform"
        acc[(r["model"], r["ratio"], kind)][r["seed"]] = 100 * r["accuracy"]
        sparsity[(r["model"], r["ratio"])] = 100 * r["sparsity"]
    lines = [
        "| model | sparsity | repair | uniform | cost allocation | cost - uniform (per seed) |",
        "|---|---|---|---|---|---|",
    ]
    repair = ",".join(sorted({r["repair"] for r in results["rows"]}))
    for model, ratio in sorted(sparsity):
        u, c = acc[(model, ratio, "uniform")], acc[(model, ratio, "cost")]
        seeds = sorted(set(u) & set(c))
        if not seeds:
            continue
        diffs = [c[s] - u[s] for s in seeds]

        def ms(v: list[float]) -> str:
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            return f"{statistics.mean(v):.1f} +- {sd:.1f}"

        lines.append(
            f"| {model} | {sparsity[(model, ratio)]:.0f}% | {repair} | {ms([u[s] for s in seeds])}"
            f" | {ms([c[s] for s in seeds])} | {', '.join(f'{d:+.1f}' for d in diffs)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default="benchmarks/results/fmnist_allocation_seeds.json")
    args = ap.parse_args(argv)
    print(summarize(json.loads(Path(args.results).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
