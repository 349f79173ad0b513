"""``netfold collapse``: LayerCollapse from the command line.

    netfold collapse MODEL --data fashion-mnist --lc 1.0 --epochs 2 --out DIR

MODEL is anything :func:`netfold.hub.load` reads that takes a tensor input (a saved netfold
directory, a training checkpoint, or an architecture with ``--weights``). Fine-tuning uses a seeded random subset of the training
split (``--subset``) with labels and distillation to the original model; accuracy is measured on
the test split before and after.
"""

from __future__ import annotations

import argparse

import torch

from .. import hub
from ..collapse.config import CollapseConfig
from .common import check_output, json_option, load_model, model_args, positive

__all__ = ["add_collapse_parser", "cmd_collapse"]


def add_collapse_parser(sub) -> argparse.ArgumentParser:
    """Register the ``collapse`` subcommand on an argparse subparsers object."""
    d = CollapseConfig()
    p = sub.add_parser("collapse", help="LayerCollapse: linearise activations, fine-tune, merge")
    model_args(p)
    p.add_argument("--data", help="fine-tuning / evaluation data set (fashion-mnist, or none)")
    p.add_argument("--subset", type=int, default=10000, help="training images for fine-tuning")
    p.add_argument("--batch-size", type=int, default=128, help="fine-tuning batch size")
    p.add_argument("--lc", type=float, default=d.lc, help="regulariser strength")
    p.add_argument("--epochs", type=int, default=d.epochs, help="fine-tuning epochs")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate of the weights")
    p.add_argument("--alpha-lr", type=float, default=d.alpha_lr, help="learning rate of alphas")
    p.add_argument("--tol", type=float, default=d.tol, help="collapse when |1 - alpha| <= tol")
    p.add_argument(
        "--init-slope", type=float, default=d.init_slope, help="initial PReLU negative slope"
    )
    p.add_argument("--max-pairs", type=int, default=None, help="collapse at most N pairs")
    p.add_argument("--target", action="append", default=[], help="fnmatch pattern of pairs")
    p.add_argument("--seed", type=int, default=0, help="seed of the fine-tuning subset")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", help="directory to save the collapsed model")
    p.set_defaults(func=cmd_collapse)
    return p


def cmd_collapse(args: argparse.Namespace) -> int:
    """Run the ``collapse`` subcommand; returns the exit status."""
    from ..collapse.api import collapse
    from ..eval.accuracy import evaluate_accuracy

    # Every argument is checked before the model is loaded or a thread count changes.
    check_output(args.out, "--out")
    positive(args, "subset", "batch_size", "threads")
    if args.data == "none":
        args.data = None
    if args.data is not None and args.data != "fashion-mnist":
        raise ValueError(f"--data {args.data!r} is unknown: only 'fashion-mnist' is available")
    json_option(args.model_kwargs, "--model-kwargs")
    config = CollapseConfig(
        lc=args.lc,
        epochs=args.epochs,
        lr=args.lr,
        alpha_lr=args.alpha_lr,
        tol=args.tol,
        init_slope=args.init_slope,
        max_pairs=args.max_pairs,
        targets=tuple(args.target),
        seed=args.seed,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _, info = load_model(args)
    if info.kind != "tensor":
        raise ValueError(f"collapse takes image/tensor models; {args.model} takes token ids")
    batches = test = None
    if args.data is not None:
        from ..data.fashion_mnist import load_fashion_mnist

        x, y = load_fashion_mnist("train")
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(len(y), generator=g)[: args.subset]
        x, y = x[idx], y[idx]
        bs = args.batch_size
        batches = [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(y) - bs + 1, bs)]
        test = load_fashion_mnist("test")
    acc0 = evaluate_accuracy(model, *test) if test is not None else None
    example = test[0][:2] if test is not None else None
    report = collapse(model, config, data=batches, example_inputs=example, progress=True)
    print(report)
    for e in report.log:
        if e["status"] != "prepared":
            alpha = f"alpha {e['alpha_mean']:.3f}" if e["alpha_mean"] == e["alpha_mean"] else ""
            print(
                f"  {e['status']:<9} {e['pair']:<40} {alpha:<12} "
                f"{e['params_before']:>10,} -> {e['params_after']:<10,} {e.get('reason', '')}"
            )
    if test is not None:
        acc1 = evaluate_accuracy(model, *test)
        print(f"  accuracy {100 * acc0:.2f}% -> {100 * acc1:.2f}%")
        report.extra.update(accuracy_before=acc0, accuracy_after=acc1)
    if args.out:
        hub.save(model, args.out, metadata={"report": report.to_dict()})
        print(f"saved to {args.out}")
    return 0
