"""What every command shares: model options, the loader call, output and option checks.

Argument parsing and printing helpers only; models are loaded by :func:`netfold.hub.load`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from .. import hub

#: Exceptions that mean "the user's input is wrong" (exit 2), not "netfold is broken" (exit 1).
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


def one_line(e: BaseException | str) -> str:
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


def llm_ids(source: str, tokenizer, split: str = "eval") -> torch.Tensor:
    """Token ids (T,) of an evaluation text: "pydocs", "wikitext2", a text file or a .pt file."""
    if source.endswith(".pt"):
        ids = torch.load(source, weights_only=True)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
            raise ValueError(f"{source} must hold a 1-D tensor of token ids")
        return ids.long()
    from ..data.text import load_text

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


def llm_args(p: argparse.ArgumentParser) -> None:
    """LLM perplexity options: --ppl, --seqlen, --max-windows."""
    p.add_argument(
        "--ppl", help="LLM perplexity text: pydocs, wikitext2, a text file or a .pt of ids"
    )
    p.add_argument("--seqlen", type=int, help="LLM window (default 2048 or the model's max)")
    p.add_argument("--max-windows", type=int, help="score only the first N windows")


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


def save_dtype(model: nn.Module, name: str | None) -> nn.Module:
    """``model`` cast to the ``--dtype`` name (unchanged when None)."""
    return model if name is None else model.to(hub.DTYPES[name])


def dtype_name(model: nn.Module) -> str:
    dt = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dt).removeprefix("torch.")


def parse_input_shape(arg: str | None) -> tuple[int, ...] | None:
    """``--input-shape C,H,W`` as a tuple (None when not given); ValueError when malformed."""
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


def check_dataset(name: str | None) -> None:
    """Refuse a ``--data`` name no loader here knows."""
    if name is not None and name not in DATASETS:
        raise ValueError(
            f"--data {name!r} is unknown: only {', '.join(DATASETS)} (or none) ships with these "
            "machines"
        )


def dataset(name: str | None, n_calib: int):
    """(test split (images, labels), calibration images (n, C, H, W)) of ``--data``, or Nones."""
    if name is None:
        return None, None
    check_dataset(name)
    from ..data.fashion_mnist import calibration_batches, load_fashion_mnist

    test = load_fashion_mnist("test")
    calib = torch.cat(
        calibration_batches(n_batches=max(1, n_calib // 64), batch_size=min(64, n_calib))
    )
    return test, calib


def check_fits(model: nn.Module, x: torch.Tensor, what: str) -> None:
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


def no_data(name: str | None) -> str | None:
    """``--data none`` means no data set."""
    return None if name in (None, "none") else name
