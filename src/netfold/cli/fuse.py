"""``netfold export`` and ``netfold bench-latency`` (argparse in, files/tables out).

Models are loaded by :func:`netfold.hub.load`, the loader every command shares, so any folder
``netfold fold`` wrote (CNN or LLM) exports and benchmarks with the input shape it recorded;
``--input-shape`` / ``--image-size`` override it. Bare architecture names (``resnet18``) get
random weights and seeded random BatchNorm statistics
(:func:`netfold.fuse.bench.randomize_bn`), so fusing them is not trivially exact.

    netfold export r18/ --onnx r18.onnx [--fuse]
    netfold bench-latency r18/ --batch 1 8 --paths eager,fused,ort
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any

import torch

from ..fuse.bench import randomize_bn
from .common import (
    check_output,
    input_shape_arg,
    json_option,
    load_model,
    model_args,
    parse_input_shape,
    positive,
    resolve_input_shape,
)

__all__ = [
    "add_bench_latency_parser",
    "add_export_parser",
    "cmd_bench_latency",
    "cmd_export",
]


def _cli_model(args: argparse.Namespace, *, dtype: str | None = None):
    """(model, info, example-input maker) from the shared model options of ``args``."""
    torch.manual_seed(args.seed)
    model, _, info = load_model(args, dtype=dtype)
    if info.random_weights:
        randomize_bn(model, args.seed)  # fusing fresh BatchNorms would be trivially exact
        print(f"{args.model}: random weights, seeded BatchNorm statistics (seed {args.seed})")
    if info.kind == "tokens":
        print(f"input: token ids (batch, {args.seq_len})")
        shape = None
    else:
        shape, note = resolve_input_shape(
            info, parse_input_shape(args.input_shape), image_size=args.image_size
        )
        print(f"input shape {shape} ({note})")

    def inputs(batch: int) -> Any:
        return info.example_inputs(batch, seq_len=args.seq_len, seed=args.seed, input_shape=shape)

    return model, info, inputs


# ---- netfold export ---------------------------------------------------------------------------


def add_export_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``netfold export MODEL --onnx out.onnx`` on a subparsers object."""
    p = sub.add_parser("export", help="export a model (optionally fused) to ONNX and check it")
    model_args(
        p,
        dtypes=("fp32", "fp16"),
        dtype_help="dtype of the exported graph (default fp32, what ONNX Runtime on CPU runs)",
    )
    p.add_argument("--onnx", required=True, help="output .onnx path")
    p.add_argument("--fuse", action="store_true", help="netfold.fuse the model before export")
    p.add_argument("--batch", type=int, default=1, help="example batch size (batch dim is dynamic)")
    p.add_argument("--image-size", type=int, default=None, help="vision input H = W")
    input_shape_arg(p)
    p.add_argument("--seq-len", type=int, default=32, help="LM example sequence length")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (exporter default if unset)")
    p.add_argument("--seed", type=int, default=0, help="seed of example inputs / random weights")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime comparison")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args: argparse.Namespace) -> int:
    """Handler of ``netfold export``: load, optionally fuse, export, compare with ONNX Runtime."""
    from ..export import check_onnx, export_onnx
    from ..fuse import format_decision_log, fuse

    check_output(args.onnx, "--onnx", directory=False)
    positive(args, "batch", "image_size", "seq_len", "opset")
    json_option(args.model_kwargs, "--model-kwargs")
    parse_input_shape(args.input_shape)
    model, info, inputs = _cli_model(args, dtype=args.dtype or "fp32")
    x = inputs(args.batch)
    if args.fuse:
        report = fuse(model, example_inputs=x)
        print(report)
        print(format_decision_log(report))
    path = export_onnx(model, x, args.onnx, opset=args.opset)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if not args.no_check:
        err = check_onnx(model, x, path)
        print(
            f"ONNX Runtime vs PyTorch: max abs err {err.max_abs_err:.3g}, rel {err.max_rel_err:.3g}"
        )
        if not err.ok:
            print(f"warning: {err.reason}")
            return 1
    return 0


# ---- netfold bench-latency ----------------------------------------------------------------------


def add_bench_latency_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``netfold bench-latency MODEL`` on a subparsers object."""
    p = sub.add_parser(
        "bench-latency",
        help="latency of eager / fused eager / torch.compile / ONNX Runtime (median of repeats)",
    )
    model_args(p)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (torch and ORT)")
    p.add_argument(
        "--paths",
        default="eager,fused,compile,fused_compile,ort,fused_ort",
        help="comma-separated [fused_|fusednhwc_](eager|compile|ort) paths (fusednhwc: "
        "FuseConfig(channels_last=True)), e.g. eager,fusednhwc,fusednhwc_compile",
    )
    p.add_argument("--repeats", type=int, default=15, help="rounds (every path once per round)")
    p.add_argument("--calls-per-round", type=int, default=3, help="timed calls per path per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per path first")
    p.add_argument("--image-size", type=int, default=None, help="vision input H = W")
    input_shape_arg(p)
    p.add_argument("--seq-len", type=int, default=32, help="LM sequence length")
    p.add_argument("--seed", type=int, default=0, help="seed of example inputs / random weights")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--workdir", default=None, help="where ONNX files go (a temp dir if unset)")
    p.set_defaults(func=cmd_bench_latency)
    return p


def cmd_bench_latency(args: argparse.Namespace) -> int:
    """Handler of ``netfold bench-latency``: prints a table, optionally writes JSON."""
    from ..eval.latency import format_latency_table
    from ..fuse.bench import benchmark_paths

    check_output(args.json, "--json", directory=False)
    check_output(args.workdir, "--workdir")
    positive(args, "threads", "repeats", "calls_per_round", "image_size", "seq_len")
    if any(b < 1 for b in args.batch):
        raise ValueError(f"--batch sizes must be >= 1, got {args.batch}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not paths:
        raise ValueError(f"--paths names no path: {args.paths!r}")
    json_option(args.model_kwargs, "--model-kwargs")
    parse_input_shape(args.input_shape)
    # Latency is measured in float32: the dtype ONNX Runtime and torch run fastest on CPU.
    model, info, inputs = _cli_model(args, dtype="fp32")
    with tempfile.TemporaryDirectory() as tmp:
        result = benchmark_paths(
            model,
            {b: inputs(b) for b in args.batch},
            paths=paths,
            threads=args.threads,
            repeats=args.repeats,
            warmup=args.warmup,
            calls_per_round=args.calls_per_round,
            workdir=args.workdir or tmp,
            model_name=args.model,
        )
    # main() records the line it parsed (sys.argv is the caller's when main(argv) is called).
    argv = getattr(args, "argv", None)
    argv = sys.argv[1:] if argv is None else argv
    result["command"] = " ".join(["netfold", *argv])
    print(format_latency_table(result))
    if args.json:
        from ..atomic import write_json

        write_json(args.json, result, indent=2)
        print(f"wrote {args.json}")
    return 0
