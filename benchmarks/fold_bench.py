"""Fold trained Fashion-MNIST ResNet18 / VGG11-BN at several ratios with every repair.

Run: python benchmarks/fold_bench.py [--models resnet18_cifar vgg11_bn_cifar] \
        [--ratios 0.1 0.25 0.35 0.45 0.55] [--out benchmarks/results/fold_fmnist.json]

Models come from benchmarks/train_fmnist.py (trained or reused from ~/.cache/netfold). For each
(model, repair, ratio) the script records test accuracy (10k images), parameter sparsity, the
variance ratio of the last layer (input of the classifier, 512 test images), and fold time.
Deep Inversion synthesises ONE batch per model from the original network (it depends only on
the original), reused for every ratio; its cost is recorded separately. Fold-R uses 512
calibration images from the train split. A plot (accuracy vs parameter sparsity) is drawn
from the JSON by benchmarks/plot_fold.py. Also times a fold of full-width ResNet18 (11.2M
parameters, random weights) for the "< 2 s on 2 cores" target.
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
from netfold.bench import meta
from netfold.data.fashion_mnist import calibration_batches, load_fashion_mnist
from netfold.eval.accuracy import evaluate_accuracy
from netfold.eval.variance import CLASSIFIER_INPUT, variance_ratio
from netfold.fold.deep_inversion import synthesize
from netfold.models import build_model
from netfold.models.train import get_trained


def time_full_resnet18(repeats: int = 3) -> dict:
    """Fold time of full-width CIFAR ResNet18 (random weights) for repair none / ar."""
    torch.manual_seed(0)
    base = build_model("resnet18_cifar", in_channels=3, num_classes=10, width=1.0).eval()
    x = torch.randn(2, 3, 32, 32)
    groups = netfold.find_groups(base, x)
    out = {"params": sum(p.numel() for p in base.parameters())}
    for repair in ("none", "ar"):
        times = []
        for _ in range(repeats):
            m = copy.deepcopy(base)
            t = time.perf_counter()
            rep = netfold.fold(m, netfold.FoldConfig(ratio=0.5, repair=repair), example_inputs=x)
            times.append(time.perf_counter() - t)
        m = copy.deepcopy(base)
        t = time.perf_counter()
        netfold.fold(
            m, netfold.FoldConfig(ratio=0.5, repair=repair), example_inputs=x, groups=groups
        )
        out[repair] = {
            "seconds_median": sorted(times)[len(times) // 2],
            "seconds_all": times,
            "seconds_with_cached_groups": time.perf_counter() - t,
            "sparsity": rep.sparsity,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18_cifar", "vgg11_bn_cifar"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.25, 0.35, 0.45, 0.55])
    ap.add_argument("--repairs", nargs="+", default=["none", "ar", "dir", "data"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--dir-steps", type=int, default=netfold.DeepInversionConfig.steps)
    ap.add_argument("--dir-batch", type=int, default=netfold.DeepInversionConfig.batch_size)
    ap.add_argument("--out", default="benchmarks/results/fold_fmnist.json")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)

    x_test, y_test = load_fashion_mnist("test")
    x_test, y_test = x_test[: args.n_test], y_test[: args.n_test]
    x_var = x_test[:512]
    calib = torch.cat(calibration_batches(n_batches=8, batch_size=64))
    results = {
        "command": meta.command(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": meta.git_revision(short=True),
        "machine": meta.machine(),
        "seed": args.seed,
        "n_test": len(y_test),
        "calibration": "512 train images (netfold.data.fashion_mnist.calibration_batches(8, 64))",
        "deep_inversion": {"steps": args.dir_steps, "batch_size": args.dir_batch},
        "models": {},
    }
    for name in args.models:
        model, info = get_trained(name, seed=args.seed)
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
        for repair in args.repairs:
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
                vr = variance_ratio(model, m, x_var)[CLASSIFIER_INPUT]
                row = {
                    "repair": repair,
                    "ratio": ratio,
                    "accuracy": acc,
                    "sparsity": rep.sparsity,
                    "params": rep.params_after,
                    "flops_ratio": rep.flops_ratio,
                    "variance_ratio_last": vr,
                    "fold_seconds": rep.seconds,
                }
                entry["runs"].append(row)
                print(
                    f"  {repair:>4} r={ratio:.2f} sparsity={100 * rep.sparsity:5.1f}% acc={100 * acc:6.2f}% "
                    f"VR={vr:.3f} {rep.seconds:.2f}s",
                    flush=True,
                )
        results["models"][name] = entry
    if not args.skip_timing:
        results["full_resnet18_fold_time"] = time_full_resnet18()
        print(
            "full-width ResNet18 fold time:",
            json.dumps(results["full_resnet18_fold_time"]),
            flush=True,
        )
    meta.finish(results)
    out = Path(args.out)
    from netfold.atomic import write_json

    write_json(out, results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
