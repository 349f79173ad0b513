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


def _load_netfold_dir(d: Path, verify: bool = True) -> nn.Module:
    """io.load with a damaged save reported as one ValueError naming its netfold.json."""
    meta = d / "netfold.json"
    try:
        return io.load(d, verify=verify)
    except (KeyError, AttributeError, TypeError, IndexError) as e:
        # A file written by hand or cut short: its contents, not netfold, are at fault.
        detail = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{meta} is damaged ({_one_line(detail)})") from None
    except (ValueError, RuntimeError) as e:  # bad JSON, unknown arch, weights that do not fit
        msg = _one_line(e)
        raise ValueError(msg if str(d) in msg else f"{meta}: {msg}") from None


MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".pt", ".pth")


def load_any(
    spec: str, *, weights: str | None = None, kwargs: dict | None = None, verify: bool = True
) -> nn.Module:
    """Load a model from a netfold dir, a training checkpoint, or an architecture spec.

    Raises:
        FileNotFoundError: ``spec`` or ``weights`` names a path that does not exist, or a
            folder that holds no saved model.
        ValueError: a damaged save, an unknown architecture, weights that do not fit it.
    """
    p = Path(spec)
    if p.is_dir():
        if (p / "netfold.json").is_file():
            return _load_netfold_dir(p, verify=verify)
        raise FileNotFoundError(f"{spec} is a folder without netfold.json: not a saved model")
    if p.suffix in MODEL_FILE_SUFFIXES:
        if not p.is_file():
            raise FileNotFoundError(f"model file {spec} does not exist")
        if not p.with_suffix(".json").is_file():
            raise FileNotFoundError(
                f"{spec}: a training checkpoint needs its {p.with_suffix('.json').name} next to "
                "it; for a bare state_dict pass the architecture name and --weights FILE"
            )
        from .models.train import load_checkpoint

        model, info = load_checkpoint(p)
        return io.set_arch(model, f"netfold:{info['arch']}", info["model_kwargs"])
    if ":" not in spec and ("/" in spec or spec.startswith((".", "~"))):
        raise FileNotFoundError(f"model path {spec} does not exist")
    arch = spec if ":" in spec else f"torchvision:{spec}"
    if weights and not Path(weights).is_file():
        raise FileNotFoundError(f"--weights {weights} does not exist")
    model = io.build(arch, kwargs or {})
    if weights:
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ValueError(f"--weights {weights} do not fit {arch}: {first}") from None
    return model.eval()


def is_llm_spec(spec: str) -> bool:
    """A GGUF file, a Hugging Face model folder, or a hub id ("org/name")."""
    p = Path(spec)
    if p.suffix == ".gguf":
        return True
    if p.is_dir():
        return (p / "config.json").is_file() and not (p / "netfold.json").is_file()
    # A hub id is exactly "org/name"; a missing local path must not be sent to the hub.
    return (
        spec.count("/") == 1
        and ":" not in spec
        and not spec.startswith((".", "/", "~"))
        and p.suffix not in MODEL_FILE_SUFFIXES
        and not p.exists()
    )


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
            f"--data {name!r} is unknown: only {', '.join(DATASETS)} ships with these machines"
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


def cmd_fold(args: argparse.Namespace) -> int:
    from .api import fold
    from .eval.accuracy import evaluate_accuracy

    check_output(args.out, "--out")
    positive(args, "calib", "calib_windows", "round_to", "seqlen", "max_windows")
    if is_llm_spec(args.model):
        return cmd_fold_llm(args)
    kwargs = json_option(args.model_kwargs, "--model-kwargs")
    _check_dataset(args.data)
    if args.repair == "data" and args.data is None:
        raise ValueError("--repair data needs calibration images: pass --data fashion-mnist")
    shape = _input_shape(args.input_shape)
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
    model = load_any(args.model, weights=args.weights, kwargs=kwargs, verify=not args.no_verify)
    test, calib = _data(args.data, args.calib)
    example = None
    if shape is not None:
        example = torch.randn((2,) + shape, generator=torch.Generator().manual_seed(0))
        _check_fits(model, example, "--input-shape")
    elif calib is not None:
        example = calib[:2]
    if test is not None:
        _check_fits(model, test[0][:2], f"--data {args.data}")
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

    positive(args, "seqlen", "max_windows")
    if is_llm_spec(args.model):
        return cmd_eval_llm(args)
    data = None if args.data == "none" else args.data
    _check_dataset(data)
    model = load_any(
        args.model,
        weights=args.weights,
        kwargs=json_option(args.model_kwargs, "--model-kwargs"),
        verify=not args.no_verify,
    )
    test, _ = _data(data, 64)
    print(f"params {count_params(model):,}")
    if test is not None:
        x = test[0][:1]
        _check_fits(model, x, f"--data {data}")
        print(f"FLOPs  {count_flops(model, x):,} per image")
        print(
            f"accuracy {100 * evaluate_accuracy(model, *test):.2f}% on {data} test ({len(test[1])} images)"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main([])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="netfold", description="Compress trained PyTorch networks without data."
    )
    # Read by main() wherever it appears on the line; declared here for --help.
    ap.add_argument("--debug", action="store_true", help="print the traceback of an error")
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
    p.add_argument(
        "--data", default="fashion-mnist", help="test set for accuracy (fashion-mnist, or none)"
    )
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
