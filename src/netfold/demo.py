"""The default job of `make run`: fold a real trained CNN without data and show what it costs.

Trains (or reuses from ~/.cache/netfold) a small BatchNorm CNN on Fashion-MNIST, then folds a copy
at 30% of the channels with the default (``repair="auto"``, which picks the data-free repair
measured best for the model: Fold-stats for this BatchNorm CNN), Fold-naive, Fold-AR and
Fold-stats (all data-free) and Fold-R (512 calibration images), printing test accuracy,
parameters, FLOPs and fold time before and after.

Run: python -m netfold.demo [--ratio 0.5] [--model small_cnn]
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from . import FoldConfig, fold
from .data.fashion_mnist import calibration_batches, load_fashion_mnist
from .eval.accuracy import evaluate_accuracy
from .eval.cost import count_flops, count_params
from .models.train import get_trained


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small_cnn", help="registered model with a training preset")
    ap.add_argument(
        "--ratio", type=float, default=0.3, help="fraction of channels removed per group"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)

    print(f"[1/3] training or reusing {args.model} on Fashion-MNIST ...", flush=True)
    model, info = get_trained(args.model, seed=args.seed)
    print(f"      {'reused' if info.get('reused') else 'trained'} {info['path']}")
    x_test, y_test = load_fashion_mnist("test")
    calib = torch.cat(calibration_batches(n_batches=8, batch_size=64))
    x1 = x_test[:1]
    dense_acc = evaluate_accuracy(model, x_test, y_test)
    p0, f0 = count_params(model), count_flops(model, x1)

    print(f"[2/3] folding {args.ratio:.0%} of the channels of every group ...", flush=True)
    rows = [("dense", dense_acc, p0, f0, 0.0)]
    for label, repair in (
        ("default: auto", "auto"),
        ("Fold-naive", "none"),
        ("Fold-AR (no data)", "ar"),
        ("Fold-stats (no data)", "stats"),
        ("Fold-R (512 images)", "data"),
    ):
        m = copy.deepcopy(model)
        rep = fold(
            m,
            FoldConfig(ratio=args.ratio, repair=repair, seed=args.seed),
            example_inputs=calib[:2],
            data=calib if repair == "data" else None,
        )
        if repair == "auto":  # what FoldConfig() chose for this model, no data
            label = f"{label} ({rep.extra['repair']})"
        rows.append(
            (
                label,
                evaluate_accuracy(m, x_test, y_test),
                rep.params_after,
                count_flops(m, x1),
                rep.seconds,
            )
        )

    print("[3/3] results on the 10,000 test images\n")
    print(f"{'model':<24}{'accuracy':>10}{'params':>12}{'MFLOPs':>10}{'fold time':>11}")
    for label, acc, p, f, s in rows:
        print(f"{label:<24}{100 * acc:>9.2f}%{p:>12,}{f / 1e6:>10.2f}{s:>10.2f}s")
    print(f"\nparameter sparsity {1 - rows[-1][2] / p0:.1%}, FLOPs -{1 - rows[-1][3] / f0:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
