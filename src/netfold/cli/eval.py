"""``netfold eval``: parameters, FLOPs, and accuracy or perplexity of a model.

netfold eval MODEL [--data fashion-mnist] [--ppl pydocs]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from .common import (
    check_dataset,
    check_fits,
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
)

__all__ = ["add_eval_parser", "cmd_eval"]


def add_eval_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``netfold eval`` on a subparsers object."""
    dtypes = ("fp32", "fp16", "bf16")
    p = sub.add_parser("eval", help="parameters, FLOPs, and accuracy or perplexity of a model")
    model_args(p, dtypes=dtypes, dtype_help="evaluate in this dtype (default: the saved model's)")
    p.add_argument(
        "--data",
        default=None,
        help="test set for accuracy: fashion-mnist, or none (default: none, parameters and "
        "FLOPs only)",
    )
    input_shape_arg(p)
    llm_args(p)
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval_llm(args: argparse.Namespace, model: nn.Module, tok) -> int:
    """``netfold eval`` of a token model: parameters and perplexity."""
    from ..eval.cost import count_params
    from ..eval.perplexity import default_seqlen, perplexity
    from ..families.llama import embedding_params

    n = count_params(model)
    try:
        emb = f" ({n - embedding_params(model):,} non-embedding)"
    except (AttributeError, TypeError, ValueError):  # a model without a token embedding table
        emb = ""
    print(f"params {n:,}{emb}")
    print(f"input: token ids (batch, seq_len); dtype {dtype_name(model)}")
    if args.ppl:
        ids = llm_ids(args.ppl, tok)
        seqlen = default_seqlen(model, args.seqlen)
        ppl = perplexity(model, tok, ids=ids, seqlen=seqlen, max_windows=args.max_windows)
        print(f"ppl {ppl:.4f} on {args.ppl} ({seqlen}-token windows)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Run ``netfold eval``; returns the exit status."""
    from ..eval.accuracy import evaluate_accuracy
    from ..eval.cost import count_flops, count_params

    positive(args, "seqlen", "max_windows")
    json_option(args.model_kwargs, "--model-kwargs")
    data = no_data(args.data)
    check_dataset(data)
    shape_arg = parse_input_shape(args.input_shape)
    model, tok, info = load_model(args, dtype=args.dtype)
    if info.kind == "tokens":
        return cmd_eval_llm(args, model, tok)
    test, _ = dataset(data, 64)
    print(f"params {count_params(model):,}")
    if test is not None and shape_arg is None:
        x = test[0][:1].to(info.dtype)
        check_fits(model, x, f"--data {data}")
        note = f"from --data {data}"
    else:
        shape, note = resolve_input_shape(info, shape_arg)
        x = torch.zeros((1, *shape), dtype=info.dtype)
        check_fits(model, x, "--input-shape" if shape_arg else f"the {note}")
    print(f"input shape {tuple(x.shape[1:])} ({note}); dtype {dtype_name(model)}")
    print(f"FLOPs  {count_flops(model, x):,} per input")
    if test is not None:
        xs, ys = test
        check_fits(model, xs[:1].to(info.dtype), f"--data {data}")
        acc = evaluate_accuracy(model, xs.to(info.dtype), ys)
        print(f"accuracy {100 * acc:.2f}% on {data} test ({len(ys)} images)")
    return 0
