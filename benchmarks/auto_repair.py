"""Which data-free repair should ``repair="auto"`` pick for networks WITHOUT BatchNorm?

Folds BatchNorm-free models trained on Fashion-MNIST (the ``mlp`` preset with
``batch_norm=False``, and ``mlp_mixer``, LayerNorm only) with every data-free repair that
applies ("none", "ar", "stats") and, as a reference, "data" (512 calibration images) and
"auto", at several uniform ratios; test accuracy on the 10,000 test images.
Results: benchmarks/results/auto_repair.json; the choice is
:data:`netfold.fold.auto.BN_FREE_REPAIR` (docs/repair.md).

Run: OMP_NUM_THREADS=1 python benchmarks/auto_repair.py [--models mlp_nobn mlp_mixer] \
        [--ratios 0.25 0.5 0.75] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import netfold
from netfold.atomic import write_json
from netfold.data.fashion_mnist import calibration_batches, load_fashion_mnist
from netfold.eval.accuracy import evaluate_accuracy
from netfold.eval.latency import machine_info
from netfold.models.train import get_trained

sys.path.insert(0, str(Path(__file__).parent))
from llm_bench import git_rev  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "auto_repair.json"
#: name -> get_trained arguments (BatchNorm-free models)
MODELS: dict[str, dict[str, Any]] = {
    "mlp_nobn": {"name": "mlp", "model_kwargs": {"batch_norm": False}},
    "mlp_mixer": {"name": "mlp_mixer"},
}
REPAIRS = ("none", "ar", "stats", "auto", "data")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    x_test, y_test = load_fashion_mnist("test")
    calib = torch.cat(calibration_batches(n_batches=8, batch_size=64))
    res: dict[str, Any] = {
        "command": " ".join(["python"] + sys.argv),
        "machine": machine_info(),
        "git_revision": git_rev(),
        "seed": args.seed,
        "eval": "Fashion-MNIST test, 10,000 images",
        "rows": [],
    }
    for key in args.models:
        spec = dict(MODELS[key])
        model, info = get_trained(spec.pop("name"), seed=args.seed, progress=False, **spec)
        model.eval()
        dense = evaluate_accuracy(model, x_test, y_test)
        res["rows"].append({"model": key, "repair": "dense", "ratio": 0.0, "accuracy": dense})
        print(json.dumps(res["rows"][-1]), flush=True)
        for ratio in args.ratios:
            for repair in REPAIRS:
                m = copy.deepcopy(model)
                row: dict[str, Any] = {"model": key, "repair": repair, "ratio": ratio}
                try:
                    t0 = time.perf_counter()
                    rep = netfold.fold(
                        m,
                        netfold.FoldConfig(ratio=ratio, repair=repair, seed=args.seed),
                        example_inputs=calib[:2],
                        data=calib if repair == "data" else None,
                    )
                    row.update(
                        seconds=time.perf_counter() - t0,
                        sparsity=rep.sparsity,
                        resolved=rep.extra.get("repair"),
                        warnings=rep.warnings,
                        accuracy=evaluate_accuracy(m, x_test, y_test),
                    )
                except ValueError as e:
                    row["error"] = str(e)
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
                write_json(args.out, res)
    write_json(args.out, res)
    print(table(args.out))
    return 0


def table(path: str | Path) -> str:
    """Markdown table: accuracy per model, ratio and repair."""
    res = json.loads(Path(path).read_text())
    rows = res["rows"]
    lines = ["| model | ratio | sparsity | " + " | ".join(REPAIRS) + " |"]
    lines.append("|---|---:|---:|" + "---:|" * len(REPAIRS))
    for model in dict.fromkeys(r["model"] for r in rows):
        dense = next(r for r in rows if r["model"] == model and r["repair"] == "dense")
        lines.append(f"| {model} | dense | 0% | {100 * dense['accuracy']:.2f} |" + " |" * 4)
        for ratio in sorted({r["ratio"] for r in rows if r["model"] == model} - {0.0}):
            cells, sp = [], None
            for repair in REPAIRS:
                r = next(
                    (
                        r
                        for r in rows
                        if r["model"] == model and r["ratio"] == ratio and r["repair"] == repair
                    ),
                    None,
                )
                if r is None or "accuracy" not in r:
                    cells.append("-" if r is None else "error")
                else:
                    cells.append(f"{100 * r['accuracy']:.2f}")
                    sp = r["sparsity"]
            lines.append(
                f"| {model} | {ratio:.2f} | {'-' if sp is None else f'{100 * sp:.0f}%'} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
