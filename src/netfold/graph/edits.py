"""Structural edits (module replacements, attribute changes) recorded so a saved model rebuilds.

Folding only changes widths, which :mod:`netfold.io` restores from the saved tensor shapes.
LayerCollapse and head folding also change the module *structure*: an activation becomes a
PReLU, a collapsed pair becomes one Linear plus Identities, an attention module keeps fewer
heads. Every such change is made through :func:`replace_module` / :func:`set_attributes`,
which append a JSON entry to the model's ``_netfold_edits`` list; :func:`netfold.save` writes
the list and :func:`netfold.load` replays it on the freshly built architecture before loading
the weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .surgery import get_module

EDITS_ATTR = "_netfold_edits"

__all__ = [
    "EDITS_ATTR",
    "apply_edits",
    "build_module",
    "get_edits",
    "module_spec",
    "patch_module",
    "record_swaps",
    "replace_module",
    "set_attributes",
]


def module_spec(module: nn.Module) -> dict[str, Any]:
    """JSON description of a module that :func:`build_module` can rebuild (empty weights).

    Raises:
        TypeError: a module type edits cannot describe.
    """
    if isinstance(module, nn.Identity):
        return {"type": "Identity"}
    if isinstance(module, nn.PReLU):
        return {"type": "PReLU", "num_parameters": module.num_parameters}
    if isinstance(module, nn.Linear):
        return {
            "type": "Linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }
    raise TypeError(f"cannot record a replacement by {type(module).__name__}")


def build_module(spec: dict[str, Any]) -> nn.Module:
    """Instantiate a :func:`module_spec` description."""
    kind = spec.get("type")
    if kind == "Identity":
        return nn.Identity()
    if kind == "PReLU":
        return nn.PReLU(int(spec["num_parameters"]))
    if kind == "Linear":
        return nn.Linear(int(spec["in_features"]), int(spec["out_features"]), bool(spec["bias"]))
    raise ValueError(f"unknown module spec {spec!r}")


def get_edits(root: nn.Module) -> list[dict[str, Any]]:
    """The structural edits recorded on ``root`` (a new list; empty when none)."""
    return list(getattr(root, EDITS_ATTR, None) or [])


def _record(root: nn.Module, edit: dict[str, Any]) -> None:
    edits = getattr(root, EDITS_ATTR, None)
    if edits is None:
        edits = []
        setattr(root, EDITS_ATTR, edits)
    edits.append(edit)


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    if not name:
        raise ValueError("cannot replace the root module")
    parent_name, _, attr = name.rpartition(".")
    return (get_module(root, parent_name) if parent_name else root), attr


def replace_module(root: nn.Module, name: str, new: nn.Module, *, record: bool = True) -> nn.Module:
    """Put ``new`` at ``name`` inside ``root`` and return the module it replaces.

    Args:
        root: the model.
        name: dotted module name (``"classifier.3"``, ``"encoder.layer.0.intermediate.dense"``).
        new: the replacement (Identity, PReLU or Linear when ``record``).
        record: append the replacement to the model's edit list (for save / load).
    """
    parent, attr = _parent(root, name)
    if attr not in parent._modules:
        raise KeyError(f"module {name!r} not found in {type(root).__name__}")
    spec = module_spec(new) if record else None
    old = parent._modules[attr]
    parent._modules[attr] = new
    if spec is not None:
        _record(root, {"op": "replace", "module": name, "spec": spec})
    return old


def set_attributes(root: nn.Module, name: str, attrs: dict[str, int]) -> None:
    """Set plain int attributes of module ``name`` (e.g. ``num_attention_heads``) and record it."""
    m = get_module(root, name)
    for a, v in attrs.items():
        setattr(m, a, int(v))
    _record(root, {"op": "setattr", "module": name, "attrs": {a: int(v) for a, v in attrs.items()}})


# private attributes that mirror a public one (Conv's padding, used for non-zero padding modes)
_PRIVATE_ATTRS = ("_reversed_padding_repeated_twice",)


def _plain(v: Any) -> bool:
    """A JSON-safe constructor-style attribute: int/float/bool/str or a tuple/list of them."""
    if isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, (tuple, list)) and all(isinstance(x, (bool, int, float, str)) for x in v)


def patch_module(
    root: nn.Module, name: str, params: dict[str, list[int]], attrs: dict[str, Any]
) -> None:
    """Give module ``name`` new parameter slots and plain attributes, and record it.

    Args:
        params: parameter name -> shape, for slots that are empty (``None``) now, e.g. the bias a
            fused Conv2d gains; filled by the weights loaded afterwards.
        attrs: plain attributes to set (e.g. a Conv's ``padding`` after a pad was absorbed);
            lists become tuples where the module holds a tuple.
    """
    m = get_module(root, name)
    for p, shape in params.items():
        ref = next(iter(m.parameters(recurse=False)), None)
        dtype = ref.dtype if ref is not None else None
        m.register_parameter(p, nn.Parameter(torch.empty(*shape, dtype=dtype)))
    for a, v in attrs.items():
        setattr(m, a, tuple(v) if isinstance(getattr(m, a, None), tuple) else v)
    _record(root, {"op": "patch", "module": name, "params": params, "attrs": attrs})


def record_swaps(root: nn.Module, before: dict[str, nn.Module]) -> int:
    """Record, as edits, every module of ``root`` that is no longer the object it was.

    ``before`` maps module names to the modules registered there earlier (``dict(
    root.named_modules())``). A replacement of another class is recorded as "replace" (its
    :func:`module_spec`); a rewritten copy of the same class (a fused Conv2d with a new bias, a
    new padding) as "patch": the parameter slots it gained and the plain attributes that changed.
    Used by :func:`netfold.fuse` so :func:`netfold.save` / :func:`netfold.load` rebuild a fused
    model.

    Returns:
        The number of edits recorded.

    Raises:
        TypeError: a replacement that edits cannot describe (nothing is recorded then).
    """
    edits: list[tuple[str, nn.Module, nn.Module]] = []
    swapped: set[str] = set()
    for name, new in root.named_modules():
        old = before.get(name)
        if old is None or old is new or not name:
            continue
        if any(name.startswith(s + ".") for s in swapped):
            continue  # inside a parent of another class: rebuilt with it
        if type(new) is not type(old):
            swapped.add(name)
        edits.append((name, old, new))  # a same-class copy's children are compared too
    plan: list[dict[str, Any]] = []
    for name, old, new in edits:
        if type(new) is not type(old):
            plan.append({"op": "replace", "module": name, "spec": module_spec(new)})
            continue
        params = {
            p: list(t.shape)
            for p, t in new._parameters.items()
            if t is not None and old._parameters.get(p) is None
        }
        attrs = {
            a: list(v) if isinstance(v, tuple) else v
            for a, v in vars(new).items()
            if (not a.startswith("_") or a in _PRIVATE_ATTRS)
            and _plain(v)
            and vars(old).get(a) != v
        }
        if params or attrs:
            plan.append({"op": "patch", "module": name, "params": params, "attrs": attrs})
    for e in plan:
        _record(root, e)
    return len(plan)


def _name_ok(name: Any) -> bool:
    """A dotted module path of plain identifiers (no dunder / private segments)."""
    return (
        isinstance(name, str)
        and all(part.isidentifier() or part.isdigit() for part in name.split("."))
        and not any(part.startswith("_") for part in name.split("."))
    )


def _check_edit(root: nn.Module, e: Any) -> None:
    """Reject an edit read from a file unless it fits the fixed table of ops and module types.

    Edits are data: module names must exist, a replacement is one of :func:`build_module`'s
    types with integer sizes, ``setattr`` sets existing int attributes to ints, ``patch`` fills
    empty parameter slots with shapes of non-negative ints and overwrites existing plain
    attributes with plain values. No class or callable is ever looked up by a name in a file.
    """
    if not isinstance(e, dict) or e.get("op") not in ("replace", "setattr", "patch"):
        raise ValueError(f"unknown structural edit {e!r}")
    name = e.get("module")
    if not _name_ok(name) or not name:
        raise ValueError(f"structural edit names an invalid module {name!r}")
    try:
        m = get_module(root, name)
    except (AttributeError, KeyError):
        raise ValueError(f"structural edit names an unknown module {name!r}") from None
    if e["op"] == "replace":
        spec = e.get("spec")
        sizes = ("num_parameters", "in_features", "out_features")
        if not isinstance(spec, dict) or spec.get("type") not in ("Identity", "PReLU", "Linear"):
            raise ValueError(f"unknown module spec {spec!r}")
        if any(k in spec and (type(spec[k]) is not int or spec[k] < 0) for k in sizes):
            raise ValueError(f"module spec {spec!r}: sizes must be non-negative ints")
        return
    if e["op"] == "setattr":
        attrs = e.get("attrs")
        if not isinstance(attrs, dict) or not all(
            isinstance(a, str)
            and not a.startswith("_")
            and type(v) is int
            and type(vars(m).get(a)) is int
            for a, v in attrs.items()
        ):
            raise ValueError(
                f"setattr edit on {name!r} must set existing int attributes: {attrs!r}"
            )
        return
    params, attrs = e.get("params"), e.get("attrs")
    if not isinstance(params, dict) or not isinstance(attrs, dict):
        raise ValueError(f"patch edit on {name!r} needs params and attrs objects")
    for p, shape in params.items():
        if not (
            isinstance(p, str)
            and p in m._parameters
            and m._parameters[p] is None
            and isinstance(shape, list)
            and all(type(n) is int and n >= 0 for n in shape)
        ):
            raise ValueError(f"patch edit on {name!r}: bad parameter slot {p!r} {shape!r}")
    for a, v in attrs.items():
        ok_name = isinstance(a, str) and (not a.startswith("_") or a in _PRIVATE_ATTRS)
        if not (ok_name and a in vars(m) and _plain(vars(m)[a]) and _plain(v)):
            raise ValueError(f"patch edit on {name!r}: attribute {a!r} cannot be set")


def apply_edits(root: nn.Module, edits: list[dict[str, Any]]) -> None:
    """Replay recorded edits on a freshly built model (weights are loaded afterwards).

    Every edit is checked by :func:`_check_edit` before it is applied (they come from a file).
    """
    if not isinstance(edits, list):
        raise ValueError(f"structural edits must be a list, got {type(edits).__name__}")
    for e in edits:
        _check_edit(root, e)
        op = e["op"]
        if op == "replace":
            replace_module(root, e["module"], build_module(e["spec"]))
        elif op == "setattr":
            set_attributes(root, e["module"], e["attrs"])
        else:
            patch_module(root, e["module"], e["params"], e["attrs"])
