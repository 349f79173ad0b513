"""Save and reload folded CNNs / MLPs: safetensors weights + a small JSON (no pickle).

A saved directory holds ``model.safetensors`` and ``netfold.json``. The JSON names how to build
the original architecture (``arch`` + ``kwargs``) and the width attributes of every layer;
:func:`load` builds the architecture, resizes the layers whose widths changed, and loads the
weights strictly. Architecture specs:

- ``"netfold:<name>"``: a model from :data:`netfold.models.MODELS`;
- ``"torchvision:<name>"``: a ``torchvision.models`` constructor;
- ``"<module.path>:<callable>"``: any importable constructor.

Files are written under temporary names and renamed into place, so an interrupted save never
leaves a partial model behind.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .graph.edits import apply_edits, get_edits
from .graph.surgery import SHAPE_ATTRS, set_tensor, sync_attributes

FORMAT = "netfold-model/1"
ARCH_ATTR = "_netfold_arch"


def set_arch(model: nn.Module, arch: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Record how ``model`` was built so :func:`save` needs no ``arch=`` argument."""
    setattr(model, ARCH_ATTR, {"arch": arch, "kwargs": dict(kwargs or {})})
    return model


def build(arch: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate an architecture spec (see the module docstring)."""
    kwargs = dict(kwargs or {})
    if ":" not in arch:
        raise ValueError(
            f"architecture spec {arch!r} must look like 'netfold:NAME', 'torchvision:NAME' or 'module:callable'"
        )
    prefix, name = arch.split(":", 1)
    if prefix == "netfold":
        from .models import MODELS

        if name not in MODELS:
            raise ValueError(f"unknown netfold model {name!r}; known: {sorted(MODELS)}")
        model = MODELS[name](**kwargs)
    elif prefix == "torchvision":
        import torchvision

        fn = getattr(torchvision.models, name, None)
        if fn is None or not callable(fn):
            raise ValueError(f"torchvision.models has no architecture {name!r}")
        model = fn(**kwargs)
    else:
        fn = getattr(importlib.import_module(prefix), name, None)
        if fn is None:
            raise ValueError(f"{prefix} has no attribute {name!r}")
        model = fn(**kwargs)
    return set_arch(model, arch, kwargs)


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


def _atomic_write_bytes(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "save_pretrained") and hasattr(model, "config")


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    arch: str | None = None,
    kwargs: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` to ``directory`` (created if needed).

    Args:
        model: a (folded) model built from an architecture spec.
        directory: output folder.
        arch / kwargs: architecture spec; default: what :func:`set_arch` / :func:`load` / the
            CLI recorded on the model.
        metadata: JSON-serialisable extras (e.g. the fold Report) stored in ``netfold.json``.

    Hugging Face models are written with ``save_pretrained`` (per-layer widths in the config,
    see :mod:`netfold.families.llama`), metadata in ``netfold_metadata.json``.

    Raises:
        ValueError: no architecture spec is known, or a tensor is not finite.
    """
    if arch is None and getattr(model, ARCH_ATTR, None) is None and _is_hf(model):
        # HF models marked with an arch spec (encoders: netfold.families.encoders.mark_hf)
        # take the netfold format below, which replays structural edits on load.
        from .families.llama import save_pretrained

        d = save_pretrained(model, directory)
        if metadata:
            _atomic_write_bytes(
                d / "netfold_metadata.json",
                lambda p: Path(p).write_text(json.dumps(metadata, indent=1, sort_keys=True)),
            )
        return d
    spec = getattr(model, ARCH_ATTR, None)
    if arch is not None:
        spec = {"arch": arch, "kwargs": dict(kwargs or {})}
    if spec is None:
        raise ValueError(
            "netfold.save needs to know how to rebuild the architecture: pass arch='torchvision:resnet18' "
            "(or 'netfold:NAME' / 'module:callable') and kwargs=..., or build it with netfold.io.build"
        )
    info = {
        "format": FORMAT,
        "arch": spec["arch"],
        "kwargs": spec["kwargs"],
        "widths": _widths(model),
        "metadata": metadata or {},
        "edits": get_edits(model),
    }
    json.dumps(info)  # fail before writing anything if metadata is not serialisable
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(
        d / "model.safetensors", lambda p: save_file(state, p, metadata={"format": FORMAT})
    )
    _atomic_write_bytes(
        d / "netfold.json", lambda p: Path(p).write_text(json.dumps(info, indent=1, sort_keys=True))
    )
    return d


def load(directory: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by :func:`save` (eval mode, CPU) with its folded widths.

    A Hugging Face folder (``config.json``, no ``netfold.json``) loads as a causal LM, with
    per-layer widths when the config records them.
    """
    d = Path(directory)
    meta_path = d / "netfold.json"
    if not meta_path.is_file() and (d / "config.json").is_file():
        from .families.llama import load_pretrained

        return load_pretrained(d)
    if not meta_path.is_file():
        raise FileNotFoundError(f"{d} has no netfold.json: not a saved netfold model")
    info = json.loads(meta_path.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: unsupported format {info.get('format')!r}")
    model = build(info["arch"], info["kwargs"])
    apply_edits(model, info.get("edits", []))  # collapsed pairs, PReLUs, folded heads
    state = load_file(str(d / "model.safetensors"))
    for name, attrs in info["widths"].items():
        m = model.get_submodule(name)
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
