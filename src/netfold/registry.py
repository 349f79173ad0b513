"""Known architecture builders: the only way :func:`netfold.load` turns a name into a model.

A saved ``netfold.json`` names its architecture (``"arch"``) and constructor keyword arguments
(``"kwargs"``). Both are data read from a file, so they never choose code: the name is looked
up in this registry, and a name that is not in it is refused. No import, call or unpickling is
driven by file contents. Known names:

- ``"netfold:<name>"``: a model of :data:`netfold.models.MODELS`;
- ``"torchvision:<name>"``: a builder that ``torchvision.models.list_models()`` lists (random
  weights: ``weights`` / ``pretrained`` kwargs are refused, they would download and unpickle);
- ``"netfold.families.encoders:build_hf"`` (the name encoder saves carry): a Hugging Face encoder
  rebuilt from its class name and config (the class must be a ``transformers``
  ``PreTrainedModel``, no ``auto_map``); the builder lives with the loader
  (:func:`netfold.hub.build_hf_encoder`), which registers it with :func:`register_builtin`;
- any name a program registers in its own process::

      netfold.register_arch("mylib:Net", mylib.Net)
      model = netfold.load("saved/")   # netfold.json says "arch": "mylib:Net"

Keyword arguments must be plain JSON values (numbers, strings, booleans, null, lists, dicts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

__all__ = [
    "build",
    "is_known",
    "register_arch",
    "register_builtin",
    "registered",
    "unregister_arch",
]

Builder = Callable[..., nn.Module]

_USER: dict[str, Builder] = {}
# netfold's own builders that live in higher layers (they need transformers / the families),
# registered by the module that defines them; users cannot take these names.
_BUILTIN: dict[str, Builder] = {}
_RESERVED = ("netfold", "torchvision")
HF_ENCODER = "netfold.families.encoders:build_hf"
_BUILTIN_NAMES = (HF_ENCODER,)
# torchvision kwargs that fetch (pickled) weights from the network
_DOWNLOAD_KWARGS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")


def _check_name(name: str) -> tuple[str, str]:
    if not isinstance(name, str) or name.count(":") != 1:
        raise ValueError(
            f"architecture name {name!r} must look like 'prefix:NAME' ('netfold:NAME', "
            "'torchvision:NAME' or a registered 'mylib:Net')"
        )
    prefix, short = name.split(":")
    if not prefix or not short:
        raise ValueError(f"architecture name {name!r} has an empty part")
    return prefix, short


def register_arch(name: str, builder: Builder, *, overwrite: bool = False) -> None:
    """Make ``name`` loadable: :func:`netfold.load` may call ``builder(**kwargs)`` for it.

    Args:
        name: ``"prefix:NAME"``, e.g. ``"mylib:Net"``; the ``netfold:`` and ``torchvision:``
            prefixes are reserved for the built-in builders.
        builder: a callable returning an ``nn.Module`` from JSON keyword arguments.
        overwrite: replace an earlier registration of ``name``.

    Raises:
        ValueError: a malformed or reserved name, or ``name`` is taken and not ``overwrite``.
        TypeError: ``builder`` is not callable.
    """
    prefix, _ = _check_name(name)
    if prefix in _RESERVED or name in _BUILTIN_NAMES:
        raise ValueError(f"register_arch: name {name!r} is reserved for netfold's own builders")
    if not callable(builder):
        raise TypeError(f"register_arch: builder for {name!r} must be callable, got {builder!r}")
    if name in _USER and not overwrite and _USER[name] is not builder:
        raise ValueError(f"register_arch: {name!r} is already registered (pass overwrite=True)")
    _USER[name] = builder


def register_builtin(name: str, builder: Builder) -> None:
    """Register one of netfold's own reserved builders (see :data:`HF_ENCODER`).

    Called at import by the module that defines the builder (:mod:`netfold.hub`), which sits
    above this module, so the registry never imports upwards.

    Raises:
        ValueError: ``name`` is not one of netfold's reserved builder names.
    """
    if name not in _BUILTIN_NAMES:
        raise ValueError(f"register_builtin: {name!r} is not a reserved netfold builder name")
    _BUILTIN[name] = builder


def unregister_arch(name: str) -> None:
    """Forget a name registered with :func:`register_arch` (no error when unknown)."""
    _USER.pop(name, None)


def registered() -> list[str]:
    """Names registered in this process with :func:`register_arch` (sorted)."""
    return sorted(_USER)


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return False


def _netfold(short: str) -> Builder:
    from .models import MODELS

    if short not in MODELS:
        raise ValueError(f"unknown netfold model {short!r}; known: {sorted(MODELS)}")
    return MODELS[short]


def _torchvision(short: str, kwargs: dict[str, Any]) -> Builder:
    import torchvision

    if short not in torchvision.models.list_models():
        raise ValueError(f"torchvision.models has no architecture {short!r}")
    for k in _DOWNLOAD_KWARGS:
        if kwargs.get(k) not in (None, False):
            raise ValueError(
                f"torchvision:{short}: kwarg {k}={kwargs[k]!r} would download weights; "
                "netfold rebuilds the architecture only (weights come from the saved file)"
            )
    return torchvision.models.get_model_builder(short)


def is_known(name: str) -> bool:
    """True when ``name`` is registered or names a built-in builder family."""
    try:
        prefix, _ = _check_name(name)
    except ValueError:
        return False
    return name in _USER or prefix in _RESERVED or name in _BUILTIN_NAMES


def build(name: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate the registered architecture ``name`` with ``kwargs``.

    Args:
        name: see the module docstring.
        kwargs: constructor keyword arguments (plain JSON values).

    Raises:
        ValueError: an unknown name (the message says how to register it) or bad kwargs.
        TypeError: kwargs is not a dict of plain JSON values.
    """
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict) or not _plain(kwargs):
        raise TypeError(f"architecture kwargs for {name!r} must be a dict of plain JSON values")
    prefix, short = _check_name(name)
    if name in _USER:
        builder: Builder = _USER[name]
    elif prefix == "netfold":
        builder = _netfold(short)
    elif prefix == "torchvision":
        builder = _torchvision(short, kwargs)
    elif name in _BUILTIN_NAMES:
        if name not in _BUILTIN:  # registered when netfold.hub is imported (import netfold)
            raise ValueError(f"builder {name!r} is not available: import netfold first")
        builder = _BUILTIN[name]
    else:
        raise ValueError(
            f"architecture {name!r} is not registered: netfold never imports or calls a "
            f"callable named in a file. If you trust it, register it first in your program: "
            f"netfold.register_arch({name!r}, your_constructor)"
        )
    model = builder(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"builder of {name!r} returned {type(model).__name__}, not an nn.Module")
    return model
