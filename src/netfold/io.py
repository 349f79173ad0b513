"""Save and reload folded models: safetensors weights + a small JSON (no pickle, no code).

A netfold folder holds ``model.safetensors`` and ``netfold.json``. The JSON names the
architecture (``arch`` + ``kwargs``, looked up in :mod:`netfold.registry`; a name that is not
registered is refused, nothing named in a file is imported or called), the width attributes of
every layer, the structural edits to replay (a fixed table of module types, see
:func:`netfold.graph.edits.apply_edits`), user metadata, and the sha256 of the weight file.
:func:`load` verifies the checksum and refuses non-finite weights (``verify=False`` skips both),
builds the architecture, resizes the layers whose widths changed and loads the weights strictly.

This module knows only that format (and the checksum helpers Hugging Face saves share).
``netfold.save`` / ``netfold.load`` (:func:`netfold.hub.save` / :func:`netfold.hub.load_saved`)
also write and read Hugging Face folders (``save_pretrained`` with ``netfold_checksums.json``
beside it, see :func:`netfold.families.llama.save_pretrained`).

Every save is atomic: the folder is written as a temporary sibling and swapped in by renames
(protocol in :mod:`netfold.atomic`), so at every instant the output path holds either the old
complete save or the new complete one; a failed save leaves the previous state and no
temporary files, and files of an earlier save of another format never survive.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from . import registry
from .atomic import atomic_directory, recover
from .graph.edits import apply_edits, get_edits
from .graph.surgery import SHAPE_ATTRS, set_tensor, sync_attributes

__all__ = [
    "ARCH_ATTR",
    "CHECKSUMS",
    "FORMAT",
    "build",
    "check_finite",
    "load",
    "register_arch",
    "save",
    "set_arch",
]

FORMAT = "netfold-model/1"
ARCH_ATTR = "_netfold_arch"
WEIGHTS = "model.safetensors"
META = "netfold.json"
CHECKSUMS = "netfold_checksums.json"
CHECKSUMS_FORMAT = "netfold-checksums/1"
register_arch = registry.register_arch

# Files a netfold or Hugging Face save may hold: an existing folder with anything else in it
# is not replaced (a typo like save(model, "~") must not delete a home folder).
_SAVE_MARKERS = (META, "config.json")


def set_arch(model: nn.Module, arch: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Record how ``model`` was built so :func:`save` needs no ``arch=`` argument."""
    setattr(model, ARCH_ATTR, {"arch": arch, "kwargs": dict(kwargs or {})})
    return model


def build(arch: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate a registered architecture (see :mod:`netfold.registry`) and record its spec."""
    kwargs = dict(kwargs or {})
    return set_arch(registry.build(arch, kwargs), arch, kwargs)


def _widths(model: nn.Module) -> dict[str, dict[str, int]]:
    out = {}
    for name, m in model.named_modules():
        attrs = {a: int(getattr(m, a)) for a in SHAPE_ATTRS if isinstance(getattr(m, a, None), int)}
        if (
            attrs
            and any(True for _ in m.parameters(recurse=False))
            or isinstance(m, nn.modules.batchnorm._BatchNorm)
        ):
            out[name] = attrs
    return out


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "save_pretrained") and hasattr(model, "config")


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise ValueError naming the first floating tensor with a NaN or inf.

    Args:
        tensors: name -> tensor (a state dict).
        where: what the tensors belong to, for the message.
    """
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"{where}: tensor {name!r} has {bad} non-finite value(s) (NaN/inf) of {t.numel()}"
            )


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def verify_checksums(directory: Path, expected: Any) -> None:
    """Check every ``*.safetensors`` of ``directory`` against ``expected`` (file -> sha256).

    Raises:
        ValueError: a malformed record, a weight file missing from it or from the folder, or a
            mismatch.
    """
    if not isinstance(expected, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in expected.items()
    ):
        raise ValueError(f"{directory}: malformed sha256 record {expected!r}")
    present = {p.name for p in directory.glob("*.safetensors")}
    if present != set(expected):
        raise ValueError(
            f"{directory}: weight files {sorted(present)} do not match the recorded "
            f"{sorted(expected)} (pass verify=False / --no-verify to load anyway)"
        )
    for name, want in sorted(expected.items()):
        got = sha256_file(directory / name)
        if got != want:
            raise ValueError(
                f"{directory / name}: sha256 {got[:16]}... does not match the saved "
                f"{want[:16]}...: the file is corrupted or was modified (pass verify=False / "
                "--no-verify to load anyway)"
            )


def write_checksums(directory: Path) -> dict[str, str]:
    """Record the sha256 of every ``*.safetensors`` of ``directory`` in ``netfold_checksums.json``."""
    sums = {p.name: sha256_file(p) for p in sorted(directory.glob("*.safetensors"))}
    (directory / CHECKSUMS).write_text(
        json.dumps({"format": CHECKSUMS_FORMAT, "sha256": sums}, indent=1, sort_keys=True)
    )
    return sums


def read_checksums(directory: Path) -> dict[str, str] | None:
    """The sha256 record of a Hugging Face folder saved by netfold (None when absent)."""
    p = directory / CHECKSUMS
    if not p.is_file():
        return None
    info = _read_json(p)
    if info.get("format") != CHECKSUMS_FORMAT:
        raise ValueError(f"{p}: unsupported format {info.get('format')!r}")
    return info.get("sha256")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return info


def replaceable(path: Path) -> str | None:
    """Why an existing folder may not be overwritten by a save (None: it may).

    Empty folders and earlier saves (``netfold.json`` or ``config.json`` at the top) may be.
    """
    names = [p.name for p in path.iterdir()]
    if not names or any(m in names for m in _SAVE_MARKERS):
        return None
    shown = ", ".join(sorted(names)[:5])
    return (
        f"exists and is not an earlier save (holds {shown}); refusing to replace it, "
        "choose an empty or new folder"
    )


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    arch: str | None = None,
    kwargs: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` to ``directory``, atomically (the folder is replaced as a whole).

    Args:
        model: a (folded) model built from a registered architecture.
        directory: output folder; an existing earlier save there is replaced.
        arch / kwargs: architecture spec; default: what :func:`set_arch` / :func:`load` / the
            CLI recorded on the model.
        metadata: JSON-serialisable extras (e.g. the fold Report) stored in ``netfold.json``.

    Hugging Face decoders without a spec save with ``netfold.save``
    (:func:`netfold.hub.save`), which writes ``save_pretrained`` folders.

    Returns:
        The folder.

    Raises:
        ValueError: no architecture spec is known, a tensor is not finite (named), or the
            folder holds files that are not an earlier save. Raised before anything is written.
        TypeError: metadata is not JSON-serialisable.
    """
    spec = getattr(model, ARCH_ATTR, None)
    if arch is not None:
        spec = {"arch": arch, "kwargs": dict(kwargs or {})}
    if spec is None and _is_hf(model):
        raise ValueError(
            f"netfold.io.save writes netfold folders only and {type(model).__name__} has no "
            "architecture spec: save Hugging Face models with netfold.save (save_pretrained)"
        )
    if spec is None:
        raise ValueError(
            "netfold.save needs to know how to rebuild the architecture: pass arch='torchvision:resnet18' "
            "(or 'netfold:NAME' / a name registered with netfold.register_arch) and kwargs=..., "
            "or build it with netfold.io.build"
        )
    if not isinstance(spec.get("arch"), str):
        raise TypeError(f"arch must be a string, got {spec.get('arch')!r}")
    info = {
        "format": FORMAT,
        "arch": spec["arch"],
        "kwargs": spec["kwargs"],
        "widths": _widths(model),
        "metadata": metadata or {},
        "edits": get_edits(model),
    }
    json.dumps(info)  # TypeError before writing anything if metadata is not serialisable
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    check_finite(state, "netfold.save")
    with atomic_directory(directory, replaceable=replaceable) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        info["sha256"] = {WEIGHTS: sha256_file(tmp / WEIGHTS)}
        (tmp / META).write_text(json.dumps(info, indent=1, sort_keys=True))
    return Path(directory)


def _str_dict(v: Any, what: str, path: Path) -> dict[str, Any]:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise ValueError(f"{path}: {what} must be a JSON object")
    return v


def load(directory: str | os.PathLike, *, verify: bool = True) -> nn.Module:
    """Rebuild a model saved by :func:`save` (eval mode, CPU) with its folded widths.

    Hugging Face folders (``config.json``, no ``netfold.json``) load with ``netfold.load``
    (:func:`netfold.hub.load_saved`).

    Args:
        directory: the saved folder.
        verify: check the recorded sha256 of the weight files and refuse NaN/inf weights.

    Raises:
        FileNotFoundError: not a saved model.
        ValueError: an unknown format or unregistered architecture, a checksum mismatch, or
            non-finite weights (with ``verify``).
    """
    d = Path(directory)
    recover(d)  # a save killed mid-swap: put the complete old save back first
    meta_path = d / META
    if not meta_path.is_file() and (d / "config.json").is_file():
        raise FileNotFoundError(
            f"{d} is a Hugging Face folder (config.json, no netfold.json): load it with "
            "netfold.load"
        )
    if not meta_path.is_file():
        raise FileNotFoundError(f"{d} has no netfold.json: not a saved netfold model")
    info = _read_json(meta_path)
    if info.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unsupported format {info.get('format')!r}")
    arch = info.get("arch")
    if not isinstance(arch, str):
        raise ValueError(f"{meta_path}: arch must be a string")
    kwargs = _str_dict(info.get("kwargs", {}), "kwargs", meta_path)
    widths = _str_dict(info.get("widths", {}), "widths", meta_path)
    edits = info.get("edits", [])
    if not isinstance(edits, list):
        raise ValueError(f"{meta_path}: edits must be a list")
    if not registry.is_known(arch):  # before reading weights: say how to register it
        registry.build(arch, kwargs)
    weights = d / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{d} has no {WEIGHTS}")
    if verify and "sha256" in info:
        verify_checksums(d, info["sha256"])
    state = load_file(str(weights))
    if verify:
        check_finite(state, str(weights))
    model = build(arch, kwargs)
    apply_edits(model, edits)  # collapsed pairs, PReLUs, folded heads
    for name, attrs in widths.items():
        attrs = _str_dict(attrs, f"widths[{name!r}]", meta_path)
        if any(a not in SHAPE_ATTRS or type(v) is not int or v < 0 for a, v in attrs.items()):
            raise ValueError(f"{meta_path}: widths[{name!r}] must map shape attributes to ints")
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{meta_path}: widths name unknown module {name!r}") from None
        changed = any(getattr(m, a, None) != v for a, v in attrs.items())
        if not changed:
            continue
        for tname in list(m._parameters) + list(m._buffers):
            key = f"{name}.{tname}" if name else tname
            if key in state:
                set_tensor(m, tname, torch.empty_like(state[key]))
        for a, v in attrs.items():
            setattr(m, a, v)
        sync_attributes(m)
    model.load_state_dict(state, strict=True)
    return model.eval()
