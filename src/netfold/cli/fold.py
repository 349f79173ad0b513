"""``netfold fold``: fold a model (CNN, MLP or Hugging Face LLM) and save the folded copy.

netfold fold MODEL (--ratio R | --target-sparsity S) [--repair ar] [--dtype bf16] --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

from .. import hub, io
from ..config import (
    ALLOCATIONS,
    LLM_FEATURES,
    LLM_SYNTH_STARTS,
    METHODS,
    REPAIRS,
    DeepInversionConfig,
    FoldConfig,
)
from .common import (
    check_dataset,
    check_fits,
    check_output,
    dataset,
    dtype_name,
    input_shape_arg,
    json_option,
    llm_args,
    llm_ids,
    load_model,
    model_args,
    no_data,
    parse_input_shape,
    positive,
    resolve_input_shape,
    save_dtype,
)

__all__ = ["add_fold_parser", "cmd_fold"]


def add_fold_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``netfold fold`` on a subparsers object."""
    dtypes = ("fp32", "fp16", "bf16")
    p = sub.add_parser("fold", help="fold a model (in a copy on disk)")
    model_args(
        p, dtypes=dtypes, dtype_help="dtype of the saved model (default: the loaded model's)"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--ratio", type=float, help="fraction of channels removed per group (default 0.5)"
    )
    g.add_argument("--target-sparsity", type=float, help="fraction of parameters to remove")
    p.add_argument(
        "--repair",
        choices=REPAIRS,
        default="auto",
        help="statistics repair after merging (auto: the measured best data-free one for the "
        "model, printed in the report; ar / stats: data-free; dir: deep inversion; data: "
        "calibration data) (default auto)",
    )
    p.add_argument(
        "--method", choices=METHODS, default="kmeans", help="how channels are grouped or kept"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of clustering and synthetic data")
    p.add_argument("--data", help="dataset for accuracy and repair='data' (fashion-mnist, or none)")
    p.add_argument("--calib", type=int, default=512, help="calibration images for repair='data'")
    p.add_argument(
        "--dir-steps", type=int, default=DeepInversionConfig.steps, help="deep inversion steps"
    )
    p.add_argument(
        "--dir-batch", type=int, default=DeepInversionConfig.batch_size, help="deep inversion batch"
    )
    input_shape_arg(p)
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
    p.add_argument(
        "--allocation",
        choices=ALLOCATIONS,
        default="auto",
        help="per-group widths: the same ratio everywhere, or by measured folding cost "
        "(auto: cost for decoder LLMs, uniform otherwise)",
    )
    p.add_argument("--skip", nargs="*", help="fnmatch patterns of groups never folded")
    p.add_argument(
        "--round-to", type=int, default=1, help="fold channel groups to multiples of N (8, 16)"
    )
    p.add_argument("--calib-text", default="pydocs", help="LLM calibration text (repair='data')")
    p.add_argument("--calib-windows", type=int, default=16, help="LLM: 512-token windows")
    p.add_argument("--sample", help="LLM: greedy generation of this prompt before and after")
    p.add_argument(
        "--stream",
        action="store_true",
        help="LLM folder: fold layer by layer from the safetensors shards (automatic when the "
        "float32 model would not fit in memory)",
    )
    p.add_argument("--workers", type=int, default=1, help="--stream: local worker processes")
    p.add_argument("--ray-address", help="--stream: Ray cluster address ('local' starts one)")
    p.add_argument("--threads", type=int, help="--stream: torch threads per layer job")
    p.add_argument("--device", default="cpu", help="--stream: where layers fold (cpu, cuda)")
    p.set_defaults(func=cmd_fold)
    return p


def print_self_check(report) -> None:
    """The decoder fold's self-check in one line; a failed one as a banner on stderr."""
    sc = report.extra.get("self_check")
    if not sc:
        return
    print(
        f"  self-check: perplexity on {sc['tokens']} tokens of the original model's own text "
        f"{sc['ppl_before']:.3f} -> {sc['ppl_after']:.3f} ({sc['ratio']:.2f}x, "
        f"KL {sc['kl']:.3f} nats/token, {sc['seconds']:.1f} s)"
    )
    if sc["failed"]:
        bar = "!" * 78
        msg = next((w for w in report.warnings if w.startswith("self-check")), "self-check failed")
        print(f"{bar}\nWARNING: {msg}\n{bar}", file=sys.stderr)


def cmd_fold_llm(args: argparse.Namespace, model: nn.Module, tok) -> int:
    """``netfold fold`` of a token model (Hugging Face decoder or encoder)."""
    from ..api import fold
    from ..config import LLMConfig
    from ..eval.perplexity import greedy_sample, perplexity
    from ..families.llama import config_extension, save_pretrained

    target = args.target_sparsity
    if args.ratio is None and target is None:
        # LLMs lose far more per channel than CNNs: a milder default, as a parameter target so
        # that "auto" allocates it by measured cost (a uniform ratio collapses small LLMs)
        target = 0.2
    cfg = FoldConfig(
        ratio=args.ratio,
        target_sparsity=target,
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
    print(f"input: token ids (batch, seq_len); vocabulary {model.config.vocab_size:,}")
    data = None
    if args.repair == "data":
        from ..data.text import token_windows

        data = token_windows(llm_ids(args.calib_text, tok, "calibration"), 512, args.calib_windows)
    ids = llm_ids(args.ppl, tok) if args.ppl else None
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
    print_self_check(report)
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
        model = save_dtype(model, args.dtype)
        metadata = {"report": report.to_dict()}
        if getattr(model, io.ARCH_ATTR, None) is not None:
            # Encoders with folded heads are marked for the netfold format, which replays the
            # head edits on load (stock from_pretrained would refuse the folded shapes).
            d = hub.save(model, args.out, metadata=metadata)
            if tok is not None:
                tok.save_pretrained(d)  # beside a complete save: hub.load picks it up
        else:
            d = save_pretrained(model, args.out, tok, metadata=metadata)
        note = config_extension(d)
        print(f"saved to {args.out} ({dtype_name(model)})" + (f" ({note})" if note else ""))
    return 0


def cmd_fold_stream(args: argparse.Namespace) -> int:
    """``netfold fold DIR --out OUT --stream``: layer by layer from safetensors shards."""
    from ..config import LLMConfig
    from ..scale import fold_folder

    if not args.out:
        raise ValueError("--stream writes a folder: pass --out DIR")
    ratio = args.ratio
    if ratio is None and args.target_sparsity is None:
        ratio = 0.2  # as the in-RAM LLM fold
    cfg = FoldConfig(
        ratio=ratio,
        target_sparsity=args.target_sparsity,
        method=args.method,
        repair=args.repair,
        seed=args.seed,
        allocation=args.allocation,
        skip=tuple(args.skip or ()),
        round_to=args.round_to,
        llm=LLMConfig(heads=args.heads, correction=args.correction, features=args.features),
    )
    report = fold_folder(
        args.model,
        args.out,
        cfg,
        workers=args.workers,
        ray_address=args.ray_address,
        threads=args.threads,
        device=args.device,
        progress=True,
    )
    print(report)
    print(f"saved to {args.out}")
    return 0


def _stream_wanted(args: argparse.Namespace) -> bool:
    """--stream, --workers/--ray-address, or a safetensors folder too big to fold in RAM."""
    if args.stream or args.workers > 1 or args.ray_address:
        return True
    p = Path(args.model)
    if not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
        return False
    from ..scale import needs_streaming

    try:
        big = needs_streaming(p)
    except ValueError:
        return False
    if big:
        print("netfold: the float32 model would not fit in memory: folding layer by layer")
    return big


def cmd_fold(args: argparse.Namespace) -> int:
    """Run ``netfold fold``; returns the exit status."""
    from ..api import fold
    from ..eval.accuracy import evaluate_accuracy

    # Every option is checked before the model is loaded.
    check_output(args.out, "--out")
    if _stream_wanted(args):
        return cmd_fold_stream(args)
    positive(args, "calib", "calib_windows", "round_to", "seqlen", "max_windows")
    json_option(args.model_kwargs, "--model-kwargs")
    data_name = no_data(args.data)
    check_dataset(data_name)
    shape_arg = parse_input_shape(args.input_shape)
    tokens = hub.is_token_spec(args.model)
    if args.repair == "data" and data_name is None and not tokens:
        raise ValueError("--repair data needs calibration images: pass --data fashion-mnist")
    cfg = FoldConfig(
        ratio=args.ratio,
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
    model, tok, info = load_model(args)
    if info.kind == "tokens":
        return cmd_fold_llm(args, model, tok)
    if args.repair == "data" and data_name is None:
        raise ValueError("--repair data needs calibration images: pass --data fashion-mnist")
    test, calib = dataset(data_name, args.calib)
    if shape_arg is None and calib is not None:
        shape, note = tuple(calib.shape[1:]), f"from --data {data_name}"
    else:
        shape, note = resolve_input_shape(info, shape_arg)
    example = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0)).to(info.dtype)
    check_fits(model, example, "--input-shape" if shape_arg else f"the {note}")
    print(f"input shape {shape} ({note})")
    if test is not None:
        check_fits(model, test[0][:2].to(info.dtype), f"--data {data_name}")
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
        model = save_dtype(model, args.dtype)
        meta = {"report": report.to_dict(), "input_shape": list(shape)}
        hub.save(model, args.out, metadata=meta)
        print(f"saved to {args.out} ({dtype_name(model)})")
    return 0
