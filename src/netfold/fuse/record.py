"""Record one eager forward pass as a tape of tensor ops, tagged with the module running each op.

torch.fx cannot trace most Hugging Face models (data-dependent control flow, caches, kwargs).
Fusion does not need a graph of the whole program, only proof that one op's output tensor is
consumed by exactly the op we want to merge it with. An eager run under a
:class:`~torch.overrides.TorchFunctionMode` sees every tensor-level call (``F.linear``,
``Tensor.view``, ``x + y``, in-place ops ...) with the actual tensor objects, and module hooks say
which module was running. Holding a reference to every recorded tensor keeps ``id()`` unique for
the length of the recording, so "consumed by" is an identity test, not a guess.

Metadata queries (``x.shape``, ``x.dtype``, ``x.size(0)`` ...) do not read values and are not
counted as uses.
"""

from __future__ import annotations

import functools
import inspect
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..eval.cost import call_model  # re-exported: fuse modules call models through it

__all__ = [
    "Key",
    "OpRecord",
    "Recording",
    "record_forward",
    "call_model",
    "func_name",
    "is_inplace",
]

# Calls that read only metadata: never a "use" of the tensor's values.
_METADATA = frozenset(
    {
        "size",
        "dim",
        "shape",
        "dtype",
        "device",
        "ndim",
        "layout",
        "numel",
        "nelement",
        "stride",
        "storage_offset",
        "element_size",
        "is_contiguous",
        "is_floating_point",
        "is_complex",
        "is_cuda",
        "is_cpu",
        "is_meta",
        "is_sparse",
        "is_quantized",
        "is_leaf",
        "is_nested",
        "requires_grad",
        "grad_fn",
        "data_ptr",
        "names",
        "_version",
        "__len__",
        "__hash__",
        "get_device",
        "_set_grad_enabled",
    }
)


def func_name(func: Callable[..., Any]) -> str:
    """A readable name for a function seen by ``__torch_function__`` (``x.shape`` -> ``shape``)."""
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":  # property getter such as Tensor.shape
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name


Key = tuple[int, int]  # (id(tensor), version): a version is one value the tensor object held


def is_inplace(name: str) -> bool:
    """``relu_``, ``add_``, ``x += y`` (``__iadd__``), ``x[i] = v`` (``__setitem__``) ..."""
    if name == "__setitem__":
        return True
    if name.startswith("__"):
        return (
            name.startswith("__i") and name.endswith("__") and name not in ("__index__", "__int__")
        )
    return name.endswith("_")


@functools.lru_cache(maxsize=512)
def _inplace_position(func: Callable[..., Any]) -> int | None:
    """Position of an ``inplace`` parameter (``F.relu(x, inplace)``), if the function has one."""
    try:
        params = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def _mutates_first_arg(func: Callable[..., Any], name: str, args: tuple, kwargs: dict) -> bool:
    if is_inplace(name):
        return True
    if kwargs.get("inplace") is True:
        return True
    try:
        pos = _inplace_position(func)
    except TypeError:  # unhashable callable
        return False
    return pos is not None and pos < len(args) and args[pos] is True


@dataclass
class OpRecord:
    """One recorded call.

    Attributes:
        index: position on the tape.
        name: function name (``linear``, ``conv2d``, ``batch_norm``, ``add``, ``relu_`` ...).
        func: the callable itself.
        args / kwargs: the actual arguments (tensors by reference).
        inputs: keys of the tensor values read.
        outputs: keys of the tensor values returned.
        out_tensors: the returned tensors (by reference, aligned with ``outputs``).
        module: qualified name of the innermost module running when the call was made
            ("" for the root, None if outside every module).
    """

    index: int
    name: str
    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inputs: tuple[Key, ...]
    outputs: tuple[Key, ...]
    out_tensors: tuple[torch.Tensor, ...]
    module: str | None

    def arg(self, position: int, keyword: str, default: Any = None) -> Any:
        """The argument at ``position`` or passed as ``keyword``."""
        if position < len(self.args):
            return self.args[position]
        return self.kwargs.get(keyword, default)

    def where(self) -> str:
        return f"{self.name} (in {self.module!r})" if self.module else f"{self.name} (top level)"


@dataclass
class ModuleCall:
    """One call of a module: its inputs and its output (by reference, output value's key)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = None
    out_key: Key | None = None


@dataclass
class Recording:
    """The tape of one forward pass.

    A tensor modified in place (``relu_``, ``+=``) holds a new *version* afterwards; readers are
    tracked per version, so ``relu_(h)`` followed by ``linear(h)`` is not "linear reads h".

    Attributes:
        ops: every non-metadata call, in execution order.
        calls: module name -> list of its calls (a module reused twice has two entries).
        consumers: value key -> indices of the ops that read that value.
        model_outputs: keys of the values in the model's return value (these are observable).
        keep: references that keep every recorded tensor alive (so ids stay unique).
    """

    ops: list[OpRecord] = field(default_factory=list)
    calls: dict[str, list[ModuleCall]] = field(default_factory=lambda: defaultdict(list))
    consumers: dict[Key, list[int]] = field(default_factory=lambda: defaultdict(list))
    version: dict[int, int] = field(default_factory=dict)
    model_outputs: set[Key] = field(default_factory=set)
    keep: list[Any] = field(default_factory=list)
    _by_module: dict[str | None, list[OpRecord]] = field(default_factory=dict, repr=False)
    _by_module_n: list[int] = field(default_factory=list, repr=False)  # ops indexed so far

    def key(self, t: torch.Tensor) -> Key:
        """The key of the value ``t`` holds now (at the end of the recording)."""
        return (id(t), self.version.get(id(t), 0))

    def output_of(self, module: str) -> torch.Tensor | None:
        """The tensor a module returned, if it was called exactly once and returned one tensor."""
        calls = self.calls.get(module, [])
        if len(calls) != 1 or not isinstance(calls[0].output, torch.Tensor):
            return None
        return calls[0].output

    def output_key(self, module: str) -> Key | None:
        """Key of the value a module returned (see :meth:`output_of`)."""
        calls = self.calls.get(module, [])
        if len(calls) != 1 or not isinstance(calls[0].output, torch.Tensor):
            return None
        return calls[0].out_key

    def ops_in(self, module: str) -> list[OpRecord]:
        """The ops whose innermost running module is ``module``."""
        if len(self._by_module_n) != 1 or self._by_module_n[0] != len(self.ops):
            self._by_module.clear()
            for op in self.ops:
                self._by_module.setdefault(op.module, []).append(op)
            self._by_module_n[:] = [len(self.ops)]
        return self._by_module.get(module, [])

    def uses(self, key: Key | None) -> list[OpRecord]:
        """Every recorded op that read the value ``key``."""
        if key is None:
            return []
        return [self.ops[i] for i in self.consumers.get(key, [])]


def _tensors(obj: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(obj)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


class _Tape(TorchFunctionMode):
    def __init__(self, rec: Recording, stack: list[str]) -> None:
        super().__init__()
        self.rec = rec
        self.stack = stack

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func_name(func)
        if name in _METADATA:
            return out
        rec = self.rec
        ins = _tensors((args, kwargs))
        in_keys = tuple(rec.key(t) for t in ins)
        if (
            args
            and isinstance(args[0], torch.Tensor)
            and _mutates_first_arg(func, name, args, kwargs)
        ):
            rec.version[id(args[0])] = rec.version.get(id(args[0]), 0) + 1
        outs = tuple(_tensors(out))
        op = OpRecord(
            index=len(rec.ops),
            name=name,
            func=func,
            args=tuple(args),
            kwargs=dict(kwargs),
            inputs=in_keys,
            outputs=tuple(rec.key(t) for t in outs),
            out_tensors=outs,
            module=self.stack[-1] if self.stack else None,
        )
        rec.ops.append(op)
        for k in dict.fromkeys(in_keys):
            rec.consumers[k].append(op.index)
        return out


def record_forward(model: nn.Module, inputs: Any) -> Recording:
    """Run ``model`` once on ``inputs`` (no grad) and return the tape.

    Args:
        model: any ``nn.Module``; it is not modified (hooks are removed afterwards).
        inputs: example inputs (see :func:`call_model`).

    Returns:
        The :class:`Recording` of that forward pass.
    """
    rec = Recording()
    stack: list[str] = []
    handles = []

    def pre(name: str):
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
            stack.append(name)
            rec.calls[name].append(ModuleCall(tuple(args), dict(kwargs)))
            rec.keep.append((args, kwargs))

        return hook

    def post(name: str):
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any):
            if stack and stack[-1] == name:
                stack.pop()
            call = rec.calls[name][-1]
            call.output = output
            if isinstance(output, torch.Tensor):
                call.out_key = rec.key(output)
            rec.keep.append(output)

        return hook

    try:
        for name, mod in model.named_modules():
            handles.append(mod.register_forward_pre_hook(pre(name), with_kwargs=True))
            handles.append(
                mod.register_forward_hook(post(name), with_kwargs=True, always_call=True)
            )
        with torch.no_grad(), _Tape(rec, stack):
            out = call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    rec.model_outputs = {rec.key(t) for t in _tensors(_plain(out))}
    rec.keep.append(out)
    return rec


def _plain(out: Any) -> Any:
    """Model outputs as nested tuples/lists/dicts (HF ModelOutput is a dict subclass)."""
    if isinstance(out, dict):
        return {k: _plain(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return [_plain(v) for v in out]
    return out
