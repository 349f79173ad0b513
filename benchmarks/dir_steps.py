"""Fold-DIR cost/accuracy trade-off: Deep-Inversion steps vs accuracy after folding.

Run: python benchmarks/dir_steps.py [--model vgg11_bn_cifar] [--steps 0 25 50 100] \
        [--ratios 0.35 0.45] [--out benchmarks/results/dir_steps.json]

Steps 0 means the BatchNorm statistics are re-estimated on pure Gaussian noise (no inversion):
the lower bound of what synthesis buys.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import sys
import time

import netfold
from netfold.data.fashion_mnist import load_fashion_mnist
from netfold.eval.accuracy import evaluate_accuracy
from netfold.fold.deep_inversion import synthesize
from netfold.models.train import get_trained


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vgg11_bn_cifar")
    ap.add_argument("--steps", nargs="+", type=int, default=[0, 25, 50, 100])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.35, 0.45])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--out", default="benchmarks/results/dir_steps.json")
    args = ap.parse_args(argv)
    model, _ = get_trained(args.model, progress=False)
    x, y = load_fashion_mnist("test")
    x, y = x[: args.n_test], y[: args.n_test]
    groups = netfold.find_groups(model, x[:2])
    rows = []
    for steps in args.steps:
        t = time.perf_counter()
        syn = synthesize(
            model,
            tuple(x.shape[1:]),
            netfold.DeepInversionConfig(steps=steps, batch_size=args.batch),
            progress=False,
        )
        synth_s = time.perf_counter() - t
        for ratio in args.ratios:
            m = copy.deepcopy(model)
            rep = netfold.fold(
                m,
                netfold.FoldConfig(ratio=ratio, repair="dir"),
                example_inputs=x[:2],
                synthetic=syn,
                groups=groups,
            )
            acc = evaluate_accuracy(m, x, y)
            rows.append(
                {
                    "steps": steps,
                    "synthesis_seconds": synth_s,
                    "ratio": ratio,
                    "sparsity": rep.sparsity,
                    "accuracy": acc,
                }
            )
            print(
                f"steps={steps:4d} synth={synth_s:6.1f}s ratio={ratio} sparsity={100 * rep.sparsity:.1f}% acc={100 * acc:.2f}%",
                flush=True,
            )
    from netfold.bench import meta

    out = meta.finish(
        meta.header(
            date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            model=args.model,
            batch_size=args.batch,
            n_test=len(y),
            rows=rows,
        )
    )
    meta.write_result(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
