"""netfold command line: thin wrappers around the Python API, one loader (:mod:`netfold.hub`).

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
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.nn as nn

from . import hub, io
from .config import (
    ALLOCATIONS,
    LLM_FEATURES,
    LLM_SYNTH_STARTS,
    METHODS,
    REPAIRS,
    DeepInversionConfig,
    FoldConfig,
)

#: Exceptions that mean "the user's input is wrong" (exit 2), not "netfold is broken" (exit 1).
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


def _one_line(e: BaseException | str) -> str:
    """The exception's message on one line (multi-line messages joined with '; ')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(lines) or type(e).__name__


def check_output(path: str | None, option: str, *, directory: bool = True) -> None:
    """Refuse an output path that cannot be written, before any work is done.

    Creates nothing: an existing ``path`` must be a directory (``directory=True``) or a file
    (``directory=False``) and writable; a new one needs its nearest existing ancestor to be a
    writable directory.

    Raises:
        ValueError: naming ``option`` and the reason.
    """
    if path is None:
        return
    if not path:
        raise ValueError(f"{option} is empty")
    p = Path(path).absolute()
    if p.exists():
        if directory and not p.is_dir():
            raise ValueError(f"{option} {path} is an existing file, not a directory")
        if not directory and p.is_dir():
            raise ValueError(f"{option} {path} is an existing directory, not a file")
        # Saves are written to a temporary sibling and renamed into place: the parent must
        # take new entries.
        _probe_writable(p.parent, option, path)
        return
    anc = p.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"{option} {path} cannot be created: {anc} is a file, not a directory")
    _probe_writable(anc, option, path)


def _probe_writable(folder: Path, option: str, path: str) -> None:
    """Create and remove one empty file in ``folder``; ValueError naming ``option`` if refused.

    ``os.access`` answers yes to root everywhere (even under /proc or on a read-only mount), so
    only a real write tells.
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".netfold-probe-")
    except OSError as e:
        raise ValueError(f"{option} {path} is not writable ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def json_option(text: str, option: str) -> dict:
    """Parse a JSON-object option value, or raise ValueError naming the option."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{option} is not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object, got {text!r}")
    return value


def positive(args: argparse.Namespace, *names: str) -> None:
    """Raise ValueError naming the first integer option among ``names`` that is set and < 1."""
    for n in names:
        v = getattr(args, n, None)
        if v is not None and v < 1:
            raise ValueError(f"--{n.replace('_', '-')} must be >= 1, got {v}")


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


def model_args(
    p: argparse.ArgumentParser, *, dtypes: tuple[str, ...] = (), dtype_help: str = ""
) -> None:
    """The model options every command shares: MODEL, --weights, --model-kwargs, --no-verify."""
    p.add_argument(
        "model",
        help="saved netfold or Hugging Face folder, .gguf file, training checkpoint, smollm2, "
        "architecture (resnet18, netfold:small_cnn, timm:NAME) or hub id (org/name)",
    )
    p.add_argument(
        "--weights", help="state_dict file (.safetensors or .pth) for an architecture name"
    )
    p.add_argument(
        "--model-kwargs",
        default="{}",
        help="constructor kwargs of an architecture name as JSON, e.g. '{\"num_classes\": 10}'",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="load a saved folder without checking its checksums and finite weights",
    )
    if dtypes:
        p.add_argument("--dtype", choices=dtypes, default=None, help=dtype_help)


def input_shape_arg(p: argparse.ArgumentParser) -> None:
    """``--input-shape C,H,W``: one sample's input shape for models that take a tensor."""
    p.add_argument(
        "--input-shape",
        help="C,H,W of one input (default: recorded by netfold fold, 3,224,224 for "
        "torchvision/timm models, 32x32 for netfold models, else a guess)",
    )


def load_model(args: argparse.Namespace, *, dtype: str | None = None):
    """``hub.load`` on the shared model options of ``args``: (model, tokenizer, info)."""
    return hub.load(
        args.model,
        weights=args.weights,
        kwargs=json_option(args.model_kwargs, "--model-kwargs"),
        dtype=dtype,
        verify=not args.no_verify,
    )


def resolve_input_shape(
    info: hub.LoadInfo, arg: tuple[int, ...] | None, *, image_size: int | None = None
) -> tuple[tuple[int, ...], str]:
    """The input shape to use and where it comes from; warns on stderr when it is a guess.

    Raises:
        ValueError: no shape is known and none was given.
    """
    if arg is not None:
        return arg, "from --input-shape"
    shape, note = info.input_shape, info.input_note
    if shape is None:
        raise ValueError(f"cannot tell the input shape of {info.spec} ({note}): pass --input-shape")
    if image_size is not None:
        if len(shape) != 3:
            raise ValueError(f"--image-size applies to C,H,W inputs; {info.spec} takes {shape}")
        return (shape[0], image_size, image_size), "from --image-size"
    if info.shape_guessed:
        print(
            f"netfold: warning: input shape {shape} of {info.spec} is a guess ({note}); "
            "pass --input-shape C,H,W if the model was trained on another size",
            file=sys.stderr,
        )
    return shape, note


def _save_dtype(model: nn.Module, name: str | None) -> nn.Module:
    return model if name is None else model.to(hub.DTYPES[name])


def cmd_fold_llm(args: argparse.Namespace, model: nn.Module, tok) -> int:
    from .api import fold
    from .config import LLMConfig
    from .eval.perplexity import greedy_sample, perplexity
    from .families.llama import config_extension, save_pretrained

    ratio = args.ratio
    if ratio is None and args.target_sparsity is None:
        ratio = 0.2  # LLMs lose far more per channel than CNNs: a milder default
    cfg = FoldConfig(
        ratio=ratio,
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
    print(f"input: token ids (batch, seq_len); vocabulary {model.config.vocab_size:,}")
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
        model = _save_dtype(model, args.dtype)
        metadata = {"report": report.to_dict()}
        if getattr(model, io.ARCH_ATTR, None) is not None:
            # Encoders with folded heads are marked for the netfold format, which replays the
            # head edits on load (stock from_pretrained would refuse the folded shapes).
            d = io.save(model, args.out, metadata=metadata)
            if tok is not None:
                tok.save_pretrained(d)  # beside a complete save: hub.load picks it up
        else:
            d = save_pretrained(model, args.out, tok, metadata=metadata)
        note = config_extension(d)
        print(f"saved to {args.out} ({_dtype_name(model)})" + (f" ({note})" if note else ""))
    return 0


def _dtype_name(model: nn.Module) -> str:
    dt = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dt).removeprefix("torch.")


def cmd_eval_llm(args: argparse.Namespace, model: nn.Module, tok) -> int:
    from .eval.cost import count_params
    from .eval.perplexity import default_seqlen, perplexity
    from .families.llama import embedding_params

    n = count_params(model)
    try:
        emb = f" ({n - embedding_params(model):,} non-embedding)"
    except (AttributeError, TypeError, ValueError):  # a model without a token embedding table
        emb = ""
    print(f"params {n:,}{emb}")
    print(f"input: token ids (batch, seq_len); dtype {_dtype_name(model)}")
    if args.ppl:
        ids = _llm_ids(args.ppl, tok)
        seqlen = default_seqlen(model, args.seqlen)
        ppl = perplexity(model, tok, ids=ids, seqlen=seqlen, max_windows=args.max_windows)
        print(f"ppl {ppl:.4f} on {args.ppl} ({seqlen}-token windows)")
    return 0


def _input_shape(arg: str | None) -> tuple[int, ...] | None:
    if not arg:
        return None
    try:
        shape = tuple(int(v) for v in arg.split(","))
    except ValueError:
        raise ValueError(f"--input-shape must look like C,H,W (integers), got {arg!r}") from None
    if any(v < 1 for v in shape):
        raise ValueError(f"--input-shape sizes must be >= 1, got {arg!r}")
    return shape


DATASETS = ("fashion-mnist",)


def _check_dataset(name: str | None) -> None:
    if name is not None and name not in DATASETS:
        raise ValueError(
            f"--data {name!r} is unknown: only {', '.join(DATASETS)} (or none) ships with these "
            "machines"
        )


def _data(name: str | None, n_calib: int):
    if name is None:
        return None, None
    _check_dataset(name)
    from .data.fashion_mnist import calibration_batches, load_fashion_mnist

    test = load_fashion_mnist("test")
    calib = torch.cat(
        calibration_batches(n_batches=max(1, n_calib // 64), batch_size=min(64, n_calib))
    )
    return test, calib


def _check_fits(model: nn.Module, x: torch.Tensor, what: str) -> None:
    """Run one input through ``model`` (eval, no grad) or raise ValueError naming ``what``."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except Exception as e:  # noqa: BLE001 - any failure: the input does not fit this model
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"{what} inputs of shape {tuple(x.shape)} do not fit the model: {reason}"
        ) from None
    finally:
        model.train(was)


def _no_data(name: str | None) -> str | None:
    return None if name in (None, "none") else name


def cmd_fold_stream(args: argparse.Namespace) -> int:
    """``netfold fold DIR --out OUT --stream``: layer by layer from safetensors shards."""
    from .config import LLMConfig
    from .scale import fold_folder

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
    from .scale import needs_streaming

    try:
        big = needs_streaming(p)
    except ValueError:
        return False
    if big:
        print("netfold: the float32 model would not fit in memory: folding layer by layer")
    return big


def cmd_fold(args: argparse.Namespace) -> int:
    from .api import fold
    from .eval.accuracy import evaluate_accuracy

    # Every option is checked before the model is loaded.
    check_output(args.out, "--out")
    if _stream_wanted(args):
        return cmd_fold_stream(args)
    positive(args, "calib", "calib_windows", "round_to", "seqlen", "max_windows")
    json_option(args.model_kwargs, "--model-kwargs")
    data_name = _no_data(args.data)
    _check_dataset(data_name)
    shape_arg = _input_shape(args.input_shape)
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
    test, calib = _data(data_name, args.calib)
    if shape_arg is None and calib is not None:
        shape, note = tuple(calib.shape[1:]), f"from --data {data_name}"
    else:
        shape, note = resolve_input_shape(info, shape_arg)
    example = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0)).to(info.dtype)
    _check_fits(model, example, "--input-shape" if shape_arg else f"the {note}")
    print(f"input shape {shape} ({note})")
    if test is not None:
        _check_fits(model, test[0][:2].to(info.dtype), f"--data {data_name}")
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
        model = _save_dtype(model, args.dtype)
        meta = {"report": report.to_dict(), "input_shape": list(shape)}
        io.save(model, args.out, metadata=meta)
        print(f"saved to {args.out} ({_dtype_name(model)})")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """``netfold merge A B [C ...]``: several models of one architecture into one, saved."""
    from .eval.accuracy import evaluate_accuracy
    from .merge import MergeConfig, merge

    # Every option is checked before any model is loaded.
    check_output(args.out, "--out")
    positive(args, "calib")
    if len(args.models) < 2:
        raise ValueError(f"merge needs at least two models, got {len(args.models)}")
    data_name = _no_data(args.data)
    _check_dataset(data_name)
    shape_arg = _input_shape(args.input_shape)
    if args.repair == "data" and data_name is None:
        raise ValueError("--repair data needs calibration images: pass --data fashion-mnist")
    cfg = MergeConfig(
        method=args.method,
        repair=args.repair,
        width=args.width,
        seed=args.seed,
        zip_layers=args.zip_layers,
        deep_inversion=DeepInversionConfig(
            steps=args.dir_steps, batch_size=args.dir_batch, seed=args.seed
        ),
    )
    models, infos = [], []
    for spec in args.models:
        model, _, info = hub.load(spec, verify=not args.no_verify)
        if info.kind == "tokens":
            raise ValueError(f"{spec}: merge takes traced CNNs / MLPs, not token models")
        models.append(model)
        infos.append(info)
    test, calib = _data(data_name, args.calib)
    if shape_arg is None and calib is not None:
        shape, note = tuple(calib.shape[1:]), f"from --data {data_name}"
    else:
        shape, note = resolve_input_shape(infos[0], shape_arg)
    example = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
    example = example.to(infos[0].dtype)
    for spec, model in zip(args.models, models):
        _check_fits(model, example, f"{spec}: the {note}")
    print(f"input shape {shape} ({note})")
    # ZipIt! matches on activations whenever images are at hand; REPAIR needs them.
    use_data = calib if (args.repair == "data" or args.method == "zipit") else None
    merged, report = merge(models, cfg, example_inputs=example, data=use_data)
    print(report)
    if test is not None:
        accs = [evaluate_accuracy(m, *test) for m in models]
        acc = evaluate_accuracy(merged, *test)
        print("  accuracy " + " / ".join(f"{100 * a:.2f}%" for a in accs) + f" -> {100 * acc:.2f}%")
        report.extra.update(accuracy_models=accs, accuracy_merged=acc)
    if args.out:
        io.save(merged, args.out, metadata={"report": report.to_dict(), "input_shape": list(shape)})
        print(f"saved to {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.accuracy import evaluate_accuracy
    from .eval.cost import count_flops, count_params

    positive(args, "seqlen", "max_windows")
    json_option(args.model_kwargs, "--model-kwargs")
    data = _no_data(args.data)
    _check_dataset(data)
    shape_arg = _input_shape(args.input_shape)
    model, tok, info = load_model(args, dtype=args.dtype)
    if info.kind == "tokens":
        return cmd_eval_llm(args, model, tok)
    test, _ = _data(data, 64)
    print(f"params {count_params(model):,}")
    if test is not None and shape_arg is None:
        x = test[0][:1].to(info.dtype)
        _check_fits(model, x, f"--data {data}")
        note = f"from --data {data}"
    else:
        shape, note = resolve_input_shape(info, shape_arg)
        x = torch.zeros((1, *shape), dtype=info.dtype)
        _check_fits(model, x, "--input-shape" if shape_arg else f"the {note}")
    print(f"input shape {tuple(x.shape[1:])} ({note}); dtype {_dtype_name(model)}")
    print(f"FLOPs  {count_flops(model, x):,} per input")
    if test is not None:
        xs, ys = test
        _check_fits(model, xs[:1].to(info.dtype), f"--data {data}")
        acc = evaluate_accuracy(model, xs.to(info.dtype), ys)
        print(f"accuracy {100 * acc:.2f}% on {data} test ({len(ys)} images)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

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
    from . import __version__

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

    def llm_args(p):
        p.add_argument(
            "--ppl", help="LLM perplexity text: pydocs, wikitext2, a text file or a .pt of ids"
        )
        p.add_argument("--seqlen", type=int, help="LLM window (default 2048 or the model's max)")
        p.add_argument("--max-windows", type=int, help="score only the first N windows")

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
        default="ar",
        help="statistics repair after merging (ar: data-free; dir: deep inversion; data: "
        "calibration data) (default ar)",
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
        default="uniform",
        help="per-group widths: the same ratio everywhere, or by measured folding cost",
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

    p = sub.add_parser("merge", help="merge models of one architecture into one (saved copy)")
    p.add_argument("models", nargs="+", help="two or more saved netfold folders or checkpoints")
    p.add_argument(
        "--method",
        choices=("fold", "weight-matching", "zipit", "average"),
        default="fold",
        help="k-means over all models' channels, weight matching, ZipIt!, or plain averaging",
    )
    p.add_argument(
        "--repair",
        choices=("none", "data", "dir"),
        default="none",
        help="statistics repair of the merged model (data: needs --data; dir: deep inversion)",
    )
    p.add_argument(
        "--width", type=float, default=1.0, help="merged width as a multiple of one model's"
    )
    p.add_argument("--zip-layers", type=int, help="zipit: merge only the first N groups")
    p.add_argument("--seed", type=int, default=0, help="seed of k-means and synthetic data")
    p.add_argument("--data", help="fashion-mnist (accuracy, repair, ZipIt! activations) or none")
    p.add_argument("--calib", type=int, default=512, help="calibration images")
    p.add_argument(
        "--dir-steps", type=int, default=DeepInversionConfig.steps, help="deep inversion steps"
    )
    p.add_argument(
        "--dir-batch", type=int, default=DeepInversionConfig.batch_size, help="deep inversion batch"
    )
    p.add_argument("--no-verify", action="store_true", help="skip checksum checks on load")
    input_shape_arg(p)
    p.add_argument("--out", help="directory to save the merged model")
    p.set_defaults(func=cmd_merge)

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
        print(f"netfold: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("netfold: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: a short message, rc 1
        if debug:
            traceback.print_exc()
        print(
            f"netfold: internal error: {type(e).__name__}: {_one_line(e)} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
