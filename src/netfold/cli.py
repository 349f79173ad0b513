"""netfold command line: thin wrappers around the Python API.

    netfold fold MODEL (--ratio R | --target-sparsity S) [--repair ar] --out DIR
    netfold eval MODEL --data fashion-mnist
    netfold demo
    netfold export MODEL --onnx out.onnx
    netfold bench-latency MODEL

MODEL is a saved netfold directory (netfold.json inside), a checkpoint trained by
benchmarks/train_fmnist.py (``.safetensors`` with its ``.json``), or an architecture name
(``resnet18`` for torchvision, ``netfold:resnet18_cifar``) with ``--weights FILE``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from . import io
from .config import METHODS, REPAIRS, DeepInversionConfig, FoldConfig


def load_any(spec: str, *, weights: str | None = None, kwargs: dict | None = None) -> nn.Module:
    """Load a model from a netfold dir, a training checkpoint, or an architecture spec."""
    p = Path(spec)
    if p.is_dir() and (p / "netfold.json").is_file():
        return io.load(p)
    if p.suffix in (".safetensors", ".json") and p.with_suffix(".json").is_file():
        from .models.train import load_checkpoint

        model, info = load_checkpoint(p)
        return io.set_arch(model, f"netfold:{info['arch']}", info["model_kwargs"])
    arch = spec if ":" in spec else f"torchvision:{spec}"
    model = io.build(arch, kwargs or {})
    if weights:
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        model.load_state_dict(state)
    return model.eval()


def _input_shape(arg: str | None) -> tuple[int, ...] | None:
    if arg:
        return tuple(int(v) for v in arg.split(","))
    return None


def _data(name: str | None, n_calib: int):
    if name is None:
        return None, None
    if name != "fashion-mnist":
        raise SystemExit(
            f"unknown dataset {name!r}: only 'fashion-mnist' ships with these machines"
        )
    from .data.fashion_mnist import calibration_batches, load_fashion_mnist

    test = load_fashion_mnist("test")
    calib = torch.cat(
        calibration_batches(n_batches=max(1, n_calib // 64), batch_size=min(64, n_calib))
    )
    return test, calib


def cmd_fold(args: argparse.Namespace) -> int:
    from .api import fold
    from .eval.accuracy import evaluate_accuracy

    model = load_any(args.model, weights=args.weights, kwargs=json.loads(args.model_kwargs))
    cfg = FoldConfig(
        ratio=args.ratio if args.ratio is not None else 0.5,
        target_sparsity=args.target_sparsity,
        method=args.method,
        repair=args.repair,
        seed=args.seed,
        deep_inversion=DeepInversionConfig(
            steps=args.dir_steps, batch_size=args.dir_batch, seed=args.seed
        ),
    )
    test, calib = _data(args.data, args.calib)
    shape = _input_shape(args.input_shape)
    example = None
    if shape is not None:
        example = torch.randn((2,) + shape, generator=torch.Generator().manual_seed(0))
    elif calib is not None:
        example = calib[:2]
    if test is not None:
        acc0 = evaluate_accuracy(model, *test)
    report = fold(
        model,
        cfg,
        example_inputs=example,
        data=calib if args.repair == "data" else None,
        progress=True,
    )
    print(report)
    if test is not None:
        acc1 = evaluate_accuracy(model, *test)
        print(f"  accuracy {100 * acc0:.2f}% -> {100 * acc1:.2f}%")
        report.extra.update(accuracy_before=acc0, accuracy_after=acc1)
    if args.out:
        io.save(model, args.out, metadata={"report": report.to_dict()})
        print(f"saved to {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.accuracy import evaluate_accuracy
    from .eval.cost import count_flops, count_params

    model = load_any(args.model, weights=args.weights, kwargs=json.loads(args.model_kwargs))
    test, _ = _data(args.data, 64)
    x = test[0][:1] if test is not None else None
    print(f"params {count_params(model):,}")
    if x is not None:
        print(f"FLOPs  {count_flops(model, x):,} per image")
        print(
            f"accuracy {100 * evaluate_accuracy(model, *test):.2f}% on {args.data} test ({len(test[1])} images)"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main([])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="netfold", description="Compress trained PyTorch networks without data."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    def model_args(p):
        p.add_argument(
            "model",
            help="netfold dir, training checkpoint, or architecture (resnet18, netfold:resnet18_cifar)",
        )
        p.add_argument(
            "--weights", help="state_dict file (.safetensors or .pth) for an architecture name"
        )
        p.add_argument(
            "--model-kwargs",
            default="{}",
            help="constructor kwargs as JSON, e.g. '{\"num_classes\": 10}'",
        )

    p = sub.add_parser("fold", help="fold a model (in a copy on disk)")
    model_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--ratio", type=float, help="fraction of channels removed per group (default 0.5)"
    )
    g.add_argument("--target-sparsity", type=float, help="fraction of parameters to remove")
    p.add_argument("--repair", choices=REPAIRS, default="ar")
    p.add_argument("--method", choices=METHODS, default="kmeans")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="dataset for accuracy and repair='data' (fashion-mnist)")
    p.add_argument("--calib", type=int, default=512, help="calibration images for repair='data'")
    p.add_argument(
        "--dir-steps", type=int, default=DeepInversionConfig.steps, help="deep inversion steps"
    )
    p.add_argument(
        "--dir-batch", type=int, default=DeepInversionConfig.batch_size, help="deep inversion batch"
    )
    p.add_argument("--input-shape", help="C,H,W of one input (default: inferred)")
    p.add_argument("--out", help="directory to save the folded model")
    p.set_defaults(func=cmd_fold)

    p = sub.add_parser("eval", help="parameters, FLOPs and accuracy of a model")
    model_args(p)
    p.add_argument("--data", default="fashion-mnist")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="train-or-reuse a small Fashion-MNIST CNN and fold it")
    p.set_defaults(func=cmd_demo)

    try:
        from .fuse.cli_handlers import (
            add_bench_latency_parser,
            add_export_parser,
            cmd_bench_latency,
            cmd_export,
        )

        add_export_parser(sub).set_defaults(func=cmd_export)
        add_bench_latency_parser(sub).set_defaults(func=cmd_bench_latency)
    except ImportError:  # optional extras (onnx) missing
        pass
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"netfold: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
