"""netfold command line: thin wrappers around the Python API, one loader (:mod:`netfold.hub`).

One module per command group (:mod:`.fold`, :mod:`.eval`, :mod:`.merge`, :mod:`.collapse`,
:mod:`.fuse` for export and bench-latency, :mod:`.bench`); shared options in :mod:`.common`.
Argument parsing and printing only: every algorithm lives below, in the library.

    netfold fold MODEL (--ratio R | --target-sparsity S) [--repair ar] [--dtype bf16] --out DIR
    netfold eval MODEL [--data fashion-mnist] [--ppl pydocs]
    netfold export MODEL --onnx out.onnx
    netfold bench-latency MODEL
    netfold collapse MODEL --data fashion-mnist --lc 1.0 --epochs 2 --out DIR
    netfold demo

Every command reads every MODEL the others write, so they chain:

    netfold fold resnet18 --model-kwargs '{"num_classes": 10}' --input-shape 3,64,64 --out r18/
    netfold eval r18/ && netfold export r18/ --onnx r18.onnx && netfold bench-latency r18/

MODEL is a saved netfold folder (netfold.json), a Hugging Face folder (config.json), a
``.gguf`` file, a checkpoint trained by benchmarks/train_fmnist.py (``.safetensors`` with its
``.json``), ``smollm2``, an architecture name (``resnet18`` for torchvision,
``netfold:resnet18_cifar``, ``timm:NAME``) with ``--weights FILE`` / ``--model-kwargs JSON``,
or a hub id (``org/name``: needs the network; offline it fails at once). The input shape of
image models is recorded in the folder ``fold`` writes, so ``eval`` / ``export`` /
``bench-latency`` reuse it; ``--input-shape`` overrides it, a guessed shape is warned about.

Exit status: 0 on success; 2 for a usage error (bad option, bad input file or model, an output
path that cannot be written: checked before any work), with a one-line ``netfold: error: ...``;
1 for an unexpected internal error (``--debug`` anywhere on the line prints the traceback).
"""

from __future__ import annotations

import argparse
import sys
import traceback

from .bench import add_bench_parsers
from .collapse import add_collapse_parser
from .common import USER_ERRORS, one_line
from .eval import add_eval_parser
from .fold import add_fold_parser
from .fuse import add_bench_latency_parser, add_export_parser
from .merge import add_merge_parser

__all__ = ["build_parser", "main"]


def cmd_demo(args: argparse.Namespace) -> int:
    """Run ``netfold demo``."""
    from ..demo import main as demo_main

    return demo_main([])


EXAMPLES = """\
examples:
  netfold fold resnet18 --model-kwargs '{"num_classes": 10}' --input-shape 3,64,64 --ratio 0.5 --out r18/
  netfold eval r18/                      # params and FLOPs at the recorded input shape
  netfold export r18/ --onnx r18.onnx    # checked against ONNX Runtime
  netfold bench-latency r18/ --batch 1 8
  netfold fold smollm2 --target-sparsity 0.2 --ppl pydocs --out smol/ --dtype bf16
  netfold eval smol/ --ppl pydocs --seqlen 1024
  netfold fold netfold:small_cnn --weights w.safetensors --data fashion-mnist --out cnn/
  netfold collapse cnn/ --data fashion-mnist --lc 1.0 --epochs 2 --out cnn-lc/

MODEL: a folder netfold wrote (netfold.json or a Hugging Face folder), a .gguf file, a
training checkpoint (.safetensors + .json), smollm2, an architecture name (resnet18,
netfold:small_cnn, timm:NAME) with --weights/--model-kwargs, or a hub id (org/name; needs
network, fails at once offline). Exit status: 0 ok, 2 usage error, 1 internal error.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``netfold`` argument parser with every command registered."""
    from .. import __version__

    ap = argparse.ArgumentParser(
        prog="netfold",
        description="Compress trained PyTorch networks without data.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"netfold {__version__}")
    # Read by main() wherever it appears on the line; declared here for --help.
    ap.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    add_fold_parser(sub)
    add_eval_parser(sub)
    add_merge_parser(sub)
    p = sub.add_parser("demo", help="train-or-reuse a small Fashion-MNIST CNN and fold it")
    p.set_defaults(func=cmd_demo)
    add_bench_parsers(sub)
    add_collapse_parser(sub)
    add_export_parser(sub)
    add_bench_latency_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 usage error, 1 internal error).

    ``--debug`` anywhere on the line prints the traceback of an error as well.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: usage errors exit 2, --help exits 0
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"netfold: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("netfold: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: a short message, rc 1
        if debug:
            traceback.print_exc()
        print(
            f"netfold: internal error: {type(e).__name__}: {one_line(e)} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
