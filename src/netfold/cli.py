"""netfold command line: thin wrappers around the Python API.

    netfold fold MODEL (--ratio R | --target-sparsity S) [--repair ar] --out DIR
    netfold eval MODEL --data fashion-mnist
    netfold demo
    netfold export MODEL --onnx out.onnx
    netfold bench-latency MODEL
    netfold collapse MODEL --data fashion-mnist --lc 1.0 --epochs 2 --out DIR

LLMs: MODEL is a Hugging Face folder, a ``.gguf`` file or a hub id, e.g.
    netfold fold SmolLM2.gguf --target-sparsity 0.2 --ppl pydocs --out DIR
    netfold eval DIR --ppl pydocs --seqlen 1024

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
from .config import (
    ALLOCATIONS,
    LLM_FEATURES,
    LLM_SYNTH_STARTS,
    METHODS,
    REPAIRS,
    DeepInversionConfig,
    FoldConfig,
)


def load_any(
    spec: str, *, weights: str | None = None, kwargs: dict | None = None, verify: bool = True
) -> nn.Module:
    """Load a model from a netfold dir, a training checkpoint, or an architecture spec."""
    p = Path(spec)
    if p.is_dir() and (p / "netfold.json").is_file():
        return io.load(p, verify=verify)
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


def is_llm_spec(spec: str) -> bool:
    """A GGUF file, a Hugging Face model folder, or a hub id ("org/name")."""
    p = Path(spec)
    if p.suffix == ".gguf":
        return True
    if p.is_dir():
        return (p / "config.json").is_file() and not (p / "netfold.json").is_file()
    return "/" in spec and ":" not in spec and not p.exists()


def _llm_ids(source: str, tokenizer, split: str = "eval") -> torch.Tensor:
    """Token ids (T,) of an evaluation text: "pydocs", "wikitext2", a text file or a .pt file."""
    if source.endswith(".pt"):
        ids = torch.load(source, weights_only=True)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
            raise ValueError(f"{source} must hold a 1-D tensor of token ids")
        return ids.long()
    from .data.text import load_text

    if tokenizer is None:
        raise ValueError("this model has no tokenizer: pass pre-tokenized ids as a .pt file")
    return tokenizer(load_text(source, split), return_tensors="pt").input_ids[0]


def cmd_fold_llm(args: argparse.Namespace) -> int:
    from .api import fold
    from .config import LLMConfig
    from .eval.perplexity import greedy_sample, perplexity
    from .families.llama import config_extension, load_causal_lm, save_pretrained

    model, tok = load_causal_lm(args.model, verify=not args.no_verify)
    cfg = FoldConfig(
        ratio=args.ratio if args.ratio is not None else 0.2,
        target_sparsity=args.target_sparsity,
        method=args.method,
        repair=args.repair,
        seed=args.seed,
        allocation=args.allocation,
        skip=tuple(args.skip or ()),
        round_to=args.round_to,
        llm=LLMConfig(
            heads=args.heads,
            correction=args.correction,
            features=args.features,
            synth_start=args.synth_start,
        ),
    )
    data = None
    if args.repair == "data":
        from .data.text import token_windows

        data = token_windows(_llm_ids(args.calib_text, tok, "calibration"), 512, args.calib_windows)
    ids = _llm_ids(args.ppl, tok) if args.ppl else None
    prompt = args.sample
    before = {}
    if ids is not None:
        before["ppl"] = perplexity(
            model, tok, ids=ids, seqlen=args.seqlen, max_windows=args.max_windows
        )
    if prompt and tok is not None:
        before["sample"] = greedy_sample(model, tok, prompt)
    report = fold(model, cfg, data=data, progress=True)
    print(report)
    if ids is not None:
        after = perplexity(model, tok, ids=ids, seqlen=args.seqlen, max_windows=args.max_windows)
        print(f"  perplexity {before['ppl']:.3f} -> {after:.3f} ({args.ppl})")
        report.extra.update(ppl_before=before["ppl"], ppl_after=after)
    if prompt and tok is not None:
        after_s = greedy_sample(model, tok, prompt)
        print(f"  sample before: {before['sample']!r}\n  sample after:  {after_s!r}")
        report.extra.update(
            sample_prompt=prompt, sample_before=before["sample"], sample_after=after_s
        )
    if args.out:
        d = save_pretrained(model, args.out, tok, metadata={"report": report.to_dict()})
        note = config_extension(d)
        print(f"saved to {args.out}" + (f" ({note})" if note else ""))
    return 0


def cmd_eval_llm(args: argparse.Namespace) -> int:
    from .eval.cost import count_params
    from .eval.perplexity import default_seqlen, perplexity
    from .families.llama import embedding_params, load_causal_lm

    model, tok = load_causal_lm(args.model, verify=not args.no_verify)
    n = count_params(model)
    print(f"params {n:,} ({n - embedding_params(model):,} non-embedding)")
    if args.ppl:
        ids = _llm_ids(args.ppl, tok)
        seqlen = default_seqlen(model, args.seqlen)
        ppl = perplexity(model, tok, ids=ids, seqlen=seqlen, max_windows=args.max_windows)
        print(f"ppl {ppl:.4f} on {args.ppl} ({seqlen}-token windows)")
    return 0


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

    if is_llm_spec(args.model):
        return cmd_fold_llm(args)

    model = load_any(
        args.model,
        weights=args.weights,
        kwargs=json.loads(args.model_kwargs),
        verify=not args.no_verify,
    )
    cfg = FoldConfig(
        ratio=args.ratio if args.ratio is not None else 0.5,
        target_sparsity=args.target_sparsity,
        allocation=args.allocation,
        skip=tuple(args.skip or ()),
        round_to=args.round_to,
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

    if is_llm_spec(args.model):
        return cmd_eval_llm(args)
    model = load_any(
        args.model,
        weights=args.weights,
        kwargs=json.loads(args.model_kwargs),
        verify=not args.no_verify,
    )
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
        p.add_argument(
            "--no-verify",
            action="store_true",
            help="load a saved folder without checking its checksums and finite weights",
        )

    def llm_args(p):
        p.add_argument(
            "--ppl", help="LLM perplexity text: pydocs, wikitext2, a text file or a .pt of ids"
        )
        p.add_argument("--seqlen", type=int, help="LLM window (default 2048 or the model's max)")
        p.add_argument("--max-windows", type=int, help="score only the first N windows")

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
    llm_args(p)
    p.add_argument("--heads", choices=("query", "kv"), default="query", help="LLM head unit")
    p.add_argument(
        "--correction", choices=("none", "scale", "lsq"), default="lsq", help="LLM repair='ar'"
    )
    p.add_argument(
        "--features",
        choices=LLM_FEATURES,
        default="auto",
        help="LLM MLP clustering features (auto: activations when text is at hand)",
    )
    p.add_argument(
        "--synth-start",
        choices=LLM_SYNTH_STARTS,
        default="random",
        help="LLM self-generated text starts from BOS + a random token, or BOS only",
    )
    p.add_argument("--allocation", choices=ALLOCATIONS, default="uniform")
    p.add_argument("--skip", nargs="*", help="fnmatch patterns of groups never folded")
    p.add_argument(
        "--round-to", type=int, default=1, help="fold channel groups to multiples of N (8, 16)"
    )
    p.add_argument("--calib-text", default="pydocs", help="LLM calibration text (repair='data')")
    p.add_argument("--calib-windows", type=int, default=16, help="LLM: 512-token windows")
    p.add_argument("--sample", help="LLM: greedy generation of this prompt before and after")
    p.set_defaults(func=cmd_fold)

    p = sub.add_parser("eval", help="parameters, FLOPs and accuracy of a model")
    model_args(p)
    p.add_argument("--data", default="fashion-mnist")
    llm_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="train-or-reuse a small Fashion-MNIST CNN and fold it")
    p.set_defaults(func=cmd_demo)

    from .bench.cli_handlers import add_bench_parsers

    add_bench_parsers(sub)

    from .collapse.cli_handlers import add_collapse_parser, cmd_collapse

    add_collapse_parser(sub).set_defaults(func=cmd_collapse)

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
