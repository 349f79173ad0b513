"""``netfold bench CONFIG`` and ``netfold bench-plot RESULTS`` (see :mod:`netfold.bench`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

__all__ = ["add_bench_parsers", "cmd_bench", "cmd_bench_plot"]


def add_bench_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``netfold bench`` and ``netfold bench-plot`` on a subparsers object."""
    p = sub.add_parser(
        "bench", help="run an experiment config (model x method x repair x ratio) to JSON"
    )
    p.add_argument("config", help="experiment config JSON (see benchmarks/configs/)")
    p.add_argument("--out", help="results JSON (default benchmarks/results/<name>.json)")
    p.add_argument("--plots", help="also draw the plots and table into this directory")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("bench-plot", help="draw plots and a table from results JSON")
    p.add_argument("results", nargs="+", help="results JSON written by netfold bench")
    p.add_argument("--out-dir", default="docs", help="folder for the plots and the table")
    p.add_argument(
        "--merge-into", help="several results of one config (one per model): merge into this JSON"
    )
    p.set_defaults(func=cmd_bench_plot)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``netfold bench``: one experiment config to results JSON (and plots)."""
    import torch

    from ..bench.plots import plot_results
    from ..bench.sweep import run_sweep

    config = json.loads(Path(args.config).read_text())
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or f"benchmarks/results/{config['name']}.json"
    command = shlex.join(["netfold", *sys.argv[1:]]) if sys.argv[0].endswith("netfold") else None
    results = run_sweep(config, out, command=command)
    print(f"wrote {out} ({len(results['rows'])} rows)")
    if args.plots:
        for p in plot_results(results, args.plots):
            print(f"wrote {p}")
    return 0


def cmd_bench_plot(args: argparse.Namespace) -> int:
    """Run ``netfold bench-plot``: plots and a table from results JSON."""
    from ..bench.plots import plot_results
    from ..bench.sweep import _atomic_json, merge_results

    parts = [json.loads(Path(r).read_text()) for r in args.results]
    if len(parts) > 1 and not args.merge_into:
        raise ValueError("several results files need --merge-into OUT.json")
    results = merge_results(parts) if len(parts) > 1 else parts[0]
    if args.merge_into:
        _atomic_json(Path(args.merge_into), results)
        print(f"wrote {args.merge_into}")
    for p in plot_results(results, args.out_dir):
        print(f"wrote {p}")
    return 0
