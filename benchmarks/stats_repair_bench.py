"""Data-free statistics repair (repair="stats") beside none / ar / dir / data, in one run.

Run: python benchmarks/stats_repair_bench.py [--models resnet18_cifar vgg11_bn_cifar] \
        [--ratios 0.1 0.25 0.35 0.45 0.55] [--n-test 10000] [--dir-steps 200] \
        [--epochs resnet18_cifar=1] [--out benchmarks/results/stats_repair.json]
     python benchmarks/stats_repair_bench.py --table benchmarks/results/stats_repair.json

Models come from netfold.models.train.get_trained (trained or reused from ~/.cache/netfold).
For each (model, repair, ratio): test accuracy on the first ``--n-test`` Fashion-MNIST test
images, parameter sparsity, fold time (``Report.seconds``: clustering + merge + repair), and
for the BatchNorm repairs the distance of every BatchNorm's running statistics to the ones
repair="data" measures on 512 real calibration images (mean over BatchNorms and channels of
|log var ratio| + |mean difference| / std). Deep Inversion synthesises one batch per model
(reused for every ratio, its cost recorded once); repair="data" uses 512 train images.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

import netfold
from netfold.atomic import write_json
from netfold.bench import meta
from netfold.data.fashion_mnist import calibration_batches, load_fashion_mnist
from netfold.eval.accuracy import evaluate_accuracy
from netfold.eval.variance import bn_distance, bn_stats
from netfold.fold.deep_inversion import synthesize
from netfold.models.train import get_trained

REPAIRS = ("none", "ar", "stats", "dir", "data")


def markdown_table(results: dict) -> str:
    """Accuracy (%) per model and ratio, one column per repair, plus fold times."""
    lines = []
    for name, entry in results["models"].items():
        runs = entry["runs"]
        repairs = list(dict.fromkeys(r["repair"] for r in runs))
        ratios = sorted({r["ratio"] for r in runs})
        by = {(r["repair"], r["ratio"]): r for r in runs}
        dense = 100 * entry["dense"]["accuracy"]
        lines.append(f"**{name}** (dense {dense:.2f}%, {entry['checkpoint']})")
        lines.append("")
        head = (
            "| ratio | sparsity | " + " | ".join(repairs) + " | stats - none | time stats / none |"
        )
        lines.append(head)
        lines.append("|" + "---|" * (len(repairs) + 4))
        for ratio in ratios:
            sp = 100 * next(r["sparsity"] for r in runs if r["ratio"] == ratio)
            cells = [f"{100 * by[(rep, ratio)]['accuracy']:.2f}" for rep in repairs]
            gain = tratio = ""
            if ("stats", ratio) in by and ("none", ratio) in by:
                st, no = by[("stats", ratio)], by[("none", ratio)]
                gain = f"{100 * (st['accuracy'] - no['accuracy']):+.2f}"
                tratio = f"{st['fold_seconds']:.2f} s / {no['fold_seconds']:.2f} s"
            lines.append(
                f"| {ratio:.2f} | {sp:.1f}% | " + " | ".join(cells) + f" | {gain} | {tratio} |"
            )
        if "deep_inversion_seconds" in entry:
            lines.append("")
            lines.append(
                f"Deep Inversion synthesis: {entry['deep_inversion_seconds']:.0f} s "
                f"({results['deep_inversion']['steps']} steps, batch "
                f"{results['deep_inversion']['batch_size']}), once per model."
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18_cifar", "vgg11_bn_cifar"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.25, 0.35, 0.45, 0.55])
    ap.add_argument("--repairs", nargs="+", default=list(REPAIRS), choices=REPAIRS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--dir-steps", type=int, default=netfold.DeepInversionConfig.steps)
    ap.add_argument("--dir-batch", type=int, default=netfold.DeepInversionConfig.batch_size)
    ap.add_argument(
        "--epochs",
        nargs="*",
        default=[],
        metavar="MODEL=N",
        help="training epochs per model, e.g. resnet18_cifar=1 (default: the preset)",
    )
    ap.add_argument("--out", default="benchmarks/results/stats_repair.json")
    ap.add_argument(
        "--table", metavar="JSON", help="only print the markdown table of a results file"
    )
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return 0
    torch.manual_seed(args.seed)
    epochs: dict[str, int] = {}
    for spec in args.epochs:
        model_name, sep, n = spec.partition("=")
        if not sep or not n.isdigit():
            raise SystemExit(f"--epochs takes MODEL=N, got {spec!r}")
        epochs[model_name] = int(n)

    x_test, y_test = load_fashion_mnist("test")
    x_test, y_test = x_test[: args.n_test], y_test[: args.n_test]
    calib = torch.cat(calibration_batches(n_batches=8, batch_size=64))
    machine = meta.machine()
    results = {
        "command": meta.command(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": meta.git_revision(short=True),
        "machine": machine,
        "seed": args.seed,
        "n_test": len(y_test),
        "calibration": "512 train images (netfold.data.fashion_mnist.calibration_batches(8, 64))",
        "deep_inversion": {"steps": args.dir_steps, "batch_size": args.dir_batch},
        "models": {},
    }
    for name in args.models:
        model, info = get_trained(name, seed=args.seed, epochs=epochs.get(name), progress=False)
        dense_acc = evaluate_accuracy(model, x_test, y_test)
        entry = {
            "checkpoint": Path(info["path"]).name,
            "train_info": {
                k: info.get(k) for k in ("model_kwargs", "epochs", "train_time_s", "test_accuracy")
            },
            "dense": {"accuracy": dense_acc, "params": sum(p.numel() for p in model.parameters())},
            "runs": [],
        }
        groups = netfold.find_groups(model, calib[:2])
        synthetic = None
        if "dir" in args.repairs:
            t = time.perf_counter()
            synthetic = synthesize(
                model,
                tuple(calib.shape[1:]),
                netfold.DeepInversionConfig(
                    steps=args.dir_steps, batch_size=args.dir_batch, seed=args.seed
                ),
                progress=False,
            )
            entry["deep_inversion_seconds"] = time.perf_counter() - t
        print(f"{name}: dense {100 * dense_acc:.2f}%", flush=True)
        # repair="data" first: its BatchNorm statistics are the reference for the others.
        order = sorted(args.repairs, key=lambda r: r != "data")
        ref_stats: dict[float, dict] = {}
        for repair in order:
            for ratio in args.ratios:
                m = copy.deepcopy(model)
                cfg = netfold.FoldConfig(ratio=ratio, repair=repair, seed=args.seed)
                rep = netfold.fold(
                    m,
                    cfg,
                    example_inputs=calib[:2],
                    data=calib if repair == "data" else None,
                    synthetic=synthetic,
                    groups=groups,
                )
                acc = evaluate_accuracy(m, x_test, y_test)
                row = {
                    "repair": repair,
                    "ratio": ratio,
                    "accuracy": acc,
                    "sparsity": rep.sparsity,
                    "params": rep.params_after,
                    "fold_seconds": rep.seconds,
                }
                st = bn_stats(m)
                if repair == "data":
                    ref_stats[ratio] = st
                elif ratio in ref_stats and repair != "ar":  # "ar" folds BN into the producer
                    row["bn_distance_to_data"] = bn_distance(st, ref_stats[ratio])
                entry["runs"].append(row)
                dist = row.get("bn_distance_to_data")
                print(
                    f"  {repair:>5} r={ratio:.2f} sparsity={100 * rep.sparsity:5.1f}% "
                    f"acc={100 * acc:6.2f}% {rep.seconds:.2f}s"
                    + (f" bn-dist={dist:.3f}" if dist is not None else ""),
                    flush=True,
                )
        by = {(r["repair"], r["ratio"]): r for r in entry["runs"]}
        if "stats" in args.repairs and "none" in args.repairs:
            gains = {
                str(r): by[("stats", r)]["accuracy"] - by[("none", r)]["accuracy"]
                for r in args.ratios
            }
            times = {
                str(r): by[("stats", r)]["fold_seconds"] / by[("none", r)]["fold_seconds"]
                for r in args.ratios
            }
            entry["stats_minus_none"] = gains
            entry["stats_time_over_none"] = times
        results["models"][name] = entry
        meta.finish(results)
        write_json(args.out, results)  # after each model: a long run keeps what it finished
    out = Path(args.out)
    write_json(out, results)
    print(markdown_table(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
