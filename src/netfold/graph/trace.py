"""Discover channel groups of a CNN / MLP by tracing it with torch.fx.

Every tensor in the traced graph carries a *channel space* (which channels it is indexed by) and
the axis they lie on. Layers that create channels (Conv, Linear) open a new space; channel-wise
ops (activations, pooling, BatchNorm, depthwise conv, dropout) pass it through; residual
additions / products unite the spaces of their operands (one clustering for the whole stream);
``flatten`` keeps the space but widens each channel to H*W contiguous columns; ``torch.cat``
along channels gives a concatenation of spaces (each folds on its own, consumers read it at an
offset); a grouped conv confines its input and output spaces' clusters to its conv groups.
Every other op (LSTM, attention, split/chunk, topk/max/sort/argmax over channels, permute,
norms, functional layers, indexing along channels ...) freezes every space that reaches it and
gives its output a fresh frozen space, with the op's name as the reason: an unknown op can
leave groups unfolded but never causes a wrong shape or a silent wrong fold.

Run: ``python -c "import torchvision, netfold.graph.trace as t; print(t.find_groups(torchvision.models.resnet18()))"``
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .groups import ChannelGroup, Consumer

_UNARY_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
)
_SPATIAL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
)
_UNARY_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.gelu,
    F.silu,
    torch.sigmoid,
    F.sigmoid,
    torch.tanh,
    F.tanh,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.softplus,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    torch.clone,
}
_SPATIAL_FUNCTIONS = {
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.interpolate,
}
_UNARY_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "tanh",
    "contiguous",
    "clone",
    "detach",
    "to",
    "float",
    "double",
}
_BINARY = {
    operator.add,
    operator.iadd,
    operator.mul,
    operator.imul,
    operator.sub,
    operator.isub,
    operator.truediv,
    torch.add,
    torch.mul,
    torch.sub,
}
_BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_"}
_FLATTEN_FUNCTIONS = {torch.flatten}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
# Ops returning pieces of a tensor: followed only as frozen (no sub-space folding).
_SPLIT_FUNCTIONS = {torch.split, torch.chunk, torch.unbind, torch.tensor_split}
_SPLIT_METHODS = {"split", "chunk", "unbind", "tensor_split", "split_with_sizes"}


class TraceError(TypeError):
    """The model could not be traced into a graph netfold can reason about."""


@dataclass(frozen=True)
class _Val:
    """Channel information of one traced tensor.

    ``space`` is its channel space on axis ``axis`` with ``repeat`` contiguous columns per
    channel; a concatenation along the channel axis has ``parts`` (the spaces in order,
    ``space`` is then the first of them).
    """

    space: int
    axis: int
    repeat: int = 1
    parts: tuple[int, ...] = ()

    @property
    def spaces(self) -> tuple[int, ...]:
        return self.parts or (self.space,)

    @property
    def compound(self) -> bool:
        return len(self.parts) > 1


@dataclass(frozen=True)
class _Multi:
    """A tuple/list result of an op the tracer froze: every tensor taken from it is frozen."""

    why: str


class _Spaces:
    """Union-find over channel spaces with their members."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.frozen: list[list[str]] = []
        self.producers: list[list[str]] = []
        self.channel_ops: list[list[str]] = []
        self.consumers: list[list[Consumer]] = []
        self.bn_of: list[dict[str, str]] = []
        self.align: list[int] = []

    def new(self, size: int, frozen: str | None = None) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(size)
        self.frozen.append([frozen] if frozen else [])
        self.producers.append([])
        self.channel_ops.append([])
        self.consumers.append([])
        self.bn_of.append({})
        self.align.append(1)
        return i

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int, why: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            # Cannot happen for shape-consistent graphs; stay safe anyway.
            self.freeze(ra, f"{why}: mismatched widths {self.size[ra]} vs {self.size[rb]}")
            self.freeze(rb, f"{why}: mismatched widths {self.size[ra]} vs {self.size[rb]}")
            return ra
        lo, hi = min(ra, rb), max(ra, rb)  # keep the earlier space as root: stable naming
        self.parent[hi] = lo
        for attr in ("frozen", "producers", "channel_ops", "consumers"):
            getattr(self, attr)[lo].extend(getattr(self, attr)[hi])
        self.bn_of[lo].update(self.bn_of[hi])
        self.align[lo] = math.lcm(self.align[lo], self.align[hi])
        return lo

    def freeze(self, i: int, why: str) -> None:
        r = self.find(i)
        if why not in self.frozen[r]:
            self.frozen[r].append(why)

    def set_align(self, i: int, blocks: int) -> None:
        r = self.find(i)
        self.align[r] = math.lcm(self.align[r], blocks)


def _tensor_meta(node: fx.Node):
    return node.meta.get("tensor_meta")


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = _tensor_meta(node)
    if tm is None or not hasattr(tm, "shape"):
        return None
    return tuple(tm.shape)


def _flat_nodes(args) -> list[fx.Node]:
    out: list[fx.Node] = []

    def visit(a):
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)

    visit(args)
    return out


def _op_name(node: fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return str(node.target)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` (raises :class:`TraceError` naming the failure)."""
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types; all mean the same thing to a user
        raise TraceError(
            f"netfold cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}). "
            "Models with data-dependent control flow need a family adapter (netfold.families) "
            "or a traceable rewrite."
        ) from e


def find_groups(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
) -> list[ChannelGroup]:
    """Return every channel group of ``model``, foldable and frozen, in graph order.

    Args:
        model: a CNN / MLP made of torch.nn layers (custom modules are traced through).
        example_inputs: one input tensor (or a tuple) used for shape propagation, e.g.
            (N, C, H, W); inferred from the first layer when None.

    Raises:
        TraceError: the model cannot be traced by torch.fx.
    """
    if example_inputs is None:
        example_inputs = infer_example_inputs(model)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    gm = trace(model)
    was_training = model.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as e:
        raise TraceError(
            f"shape propagation failed on the example input: {type(e).__name__}: {e}"
        ) from e
    finally:
        model.train(was_training)
    return _analyse(gm)


def _is_multi(node: fx.Node) -> bool:
    """The node returns a tuple/list holding tensors (LSTM, MultiheadAttention, split, topk)."""
    tm = _tensor_meta(node)
    if isinstance(tm, TensorMetadata):  # a NamedTuple itself: one tensor
        return False
    return isinstance(tm, (tuple, list)) and any(
        isinstance(t, TensorMetadata) or isinstance(t, (tuple, list)) for t in tm
    )


def _full_slice(i) -> bool:
    return isinstance(i, slice) and i.start is None and i.stop is None and i.step is None


def _analyse(gm: fx.GraphModule) -> list[ChannelGroup]:
    modules = dict(gm.named_modules())
    sp = _Spaces()
    # None: no channel space (a constant, a size); _Val: tracked; _Multi: a frozen tuple
    vals: dict[fx.Node, _Val | _Multi | None] = {}
    module_out: dict[str, int] = {}
    module_in: dict[str, int] = {}
    compound_in: set[str] = set()

    def val(a) -> _Val | None:
        v = vals.get(a) if isinstance(a, fx.Node) else None
        return v if isinstance(v, _Val) else None

    def freeze_val(v: _Val | None, why: str) -> None:
        if v is not None:
            for s in v.spaces:
                sp.freeze(s, why)

    def freeze_inputs(node: fx.Node, why: str) -> None:
        for a in _flat_nodes((node.args, node.kwargs)):
            freeze_val(val(a), why)

    def fresh_frozen(node: fx.Node, why: str) -> _Val | _Multi | None:
        """An output nothing downstream may fold through: a new frozen space (or tuple)."""
        shape = _shape(node)
        if shape is None:
            return _Multi(why) if _is_multi(node) else None
        axis = 1 if len(shape) >= 2 else 0
        return _Val(sp.new(shape[axis] if shape else 1, frozen=why), axis)

    def unknown(node: fx.Node, why: str) -> None:
        freeze_inputs(node, why)
        vals[node] = fresh_frozen(node, why)

    def remember(table: dict[str, int], name: str, space: int) -> int:
        if table is module_in and name in compound_in:
            sp.freeze(space, f"module {name} called more than once")
        if name in table:
            return sp.union(table[name], space, f"module {name} called more than once")
        table[name] = space
        return space

    def consume(name: str, v: _Val, width: int, label: str) -> None:
        """Record ``name`` as reading every part of ``v`` on its weight axis 1."""
        sizes = [sp.size[sp.find(s)] for s in v.spaces]
        if sum(sizes) * v.repeat != width:
            freeze_val(v, f"{name}: input width {width} != traced width {sum(sizes) * v.repeat}")
        if not v.compound:
            s_in = remember(module_in, name, v.space)
            sp.consumers[sp.find(s_in)].append(Consumer(name, v.repeat))
            return
        if name in module_in or name in compound_in:
            freeze_val(v, f"module {name} called more than once")
            if name in module_in:
                sp.freeze(module_in[name], f"module {name} called more than once")
        compound_in.add(name)
        off = 0
        for s, n in zip(v.spaces, sizes):
            sp.consumers[sp.find(s)].append(Consumer(name, v.repeat, offset=off))
            off += n

    def new_producer(name: str, size: int) -> int:
        out = sp.new(size)
        sp.producers[out].append(name)
        return remember(module_out, name, out)

    for node in gm.graph.nodes:
        shape = _shape(node)
        label = _op_name(node)
        if node.op == "placeholder":
            if shape is not None and len(shape) >= 2:
                vals[node] = _Val(sp.new(shape[1], frozen="model input"), 1)
            else:
                vals[node] = None
            continue
        if node.op == "output":
            for a in _flat_nodes(node.args):
                freeze_val(val(a), "model output")
            continue
        if node.op == "get_attr":
            vals[node] = None  # a parameter/buffer: a constant with no channel space
            continue
        args = _flat_nodes((node.args, node.kwargs))
        tracked_in = [a for a in args if vals.get(a) is not None]
        if shape is None and not _is_multi(node):
            # A non-tensor result (size(), dim(), .shape): harmless when it only reads shapes.
            # Anything else computed from a tracked tensor (tolist(), item(), a module
            # returning a custom object) may carry its channels: freeze them.
            if tracked_in and not _shape_query(node):
                unknown(node, f"op {label} reads the channels into a non-tensor value")
            else:
                vals[node] = None
            continue
        if any(isinstance(vals.get(a), _Multi) for a in args):
            # getitem / getattr (.values, .indices) on a frozen tuple: its items stay frozen
            why = next(vals[a].why for a in args if isinstance(vals.get(a), _Multi))
            unknown(node, why)
            continue

        first = val(args[0]) if args else None
        in_shape = _shape(args[0]) if args else None
        if node.op == "call_module":
            name = str(node.target)
            mod = modules[name]
            kind = type(mod).__name__
            if _is_multi(node) or shape is None:
                unknown(node, f"module {name} ({kind}) returns a tuple the tracer does not follow")
                continue
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
                depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
                ok = first is not None and first.axis == 1 and first.repeat == 1
                if not ok or (first.compound and mod.groups > 1):
                    if first is not None:
                        freeze_val(first, f"{name} reads an unexpected layout")
                    if depthwise:
                        vals[node] = _Val(
                            sp.new(
                                mod.out_channels,
                                frozen=f"{name}: depthwise conv on untracked input",
                            ),
                            1,
                        )
                        continue
                    out = new_producer(name, mod.out_channels)
                    if mod.groups > 1:
                        sp.set_align(out, mod.groups)
                    vals[node] = _Val(out, 1)
                    continue
                if depthwise:
                    s = remember(module_in, name, first.space)
                    s = sp.union(s, remember(module_out, name, s), "depthwise")
                    sp.channel_ops[sp.find(s)].append(name)
                    vals[node] = _Val(s, 1)
                    continue
                if mod.groups > 1:
                    # Grouped conv: output channels of conv group j read only input group j,
                    # so both spaces fold with clusters confined to conv groups.
                    if sp.size[sp.find(first.space)] != mod.in_channels:
                        sp.freeze(first.space, f"{name}: in_channels != traced width")
                    s_in = remember(module_in, name, first.space)
                    sp.set_align(s_in, mod.groups)
                    sp.consumers[sp.find(s_in)].append(Consumer(name, 1, groups=mod.groups))
                    out = new_producer(name, mod.out_channels)
                    sp.set_align(out, mod.groups)
                    vals[node] = _Val(out, 1)
                    continue
                consume(name, first, mod.in_channels, label)
                vals[node] = _Val(new_producer(name, mod.out_channels), 1)
                continue
            if isinstance(mod, nn.Linear):
                nd = len(in_shape) if in_shape else 2
                if first is None or first.axis != nd - 1:
                    freeze_val(first, f"{name} (Linear) reads axis {nd - 1}, not the channel axis")
                else:
                    consume(name, first, mod.in_features, label)
                vals[node] = _Val(new_producer(name, mod.out_features), len(shape) - 1)
                continue
            if isinstance(mod, _BN):
                if (
                    first is None
                    or first.compound
                    or first.axis != 1
                    or first.repeat != 1
                    or not mod.track_running_stats
                ):
                    unknown(node, f"{name}: BatchNorm on an unexpected layout")
                    continue
                s = remember(module_in, name, first.space)
                sp.channel_ops[sp.find(s)].append(name)
                src = args[0]
                if (
                    src.op == "call_module"
                    and isinstance(modules[str(src.target)], (nn.Conv1d, nn.Conv2d, nn.Linear))
                    and len(src.users) == 1
                    and str(src.target) in sp.producers[sp.find(s)]
                ):
                    sp.bn_of[sp.find(s)][str(src.target)] = name
                vals[node] = _Val(s, 1)
                continue
            if isinstance(mod, nn.PReLU):
                if mod.num_parameters > 1:
                    if first is None or first.compound or first.axis != 1 or first.repeat != 1:
                        unknown(node, f"{name}: PReLU on an unexpected layout")
                        continue
                    s = remember(module_in, name, first.space)
                    sp.channel_ops[sp.find(s)].append(name)
                    vals[node] = _Val(s, 1)
                    continue
                vals[node] = first
                continue
            if isinstance(mod, _UNARY_MODULES):
                vals[node] = first
                continue
            if isinstance(mod, _SPATIAL_MODULES):
                if first is not None and (first.axis != 1 or first.repeat != 1):
                    unknown(node, f"{name} applied to an unexpected layout")
                    continue
                vals[node] = first
                continue
            if isinstance(mod, nn.Flatten):
                vals[node] = _flatten(sp, first, in_shape, shape, name) or fresh_frozen(
                    node, f"{name} reshapes across the channel axis"
                )
                continue
            unknown(node, f"module {name} ({kind}) is not understood by the tracer")
            continue

        # call_function / call_method
        tgt = node.target
        method = node.op == "call_method"
        if tgt in _SPLIT_FUNCTIONS or (method and tgt in _SPLIT_METHODS):
            unknown(node, f"op {label} splits a tensor into pieces (not followed; frozen)")
            continue
        if _is_multi(node):
            unknown(node, f"op {label} returns a tuple the tracer does not follow")
            continue
        if tgt in _UNARY_FUNCTIONS or (method and tgt in _UNARY_METHODS):
            if first is not None and any(vals.get(a) is not None for a in args[1:]):
                unknown(node, f"op {label} with tensor arguments is not understood")
                continue
            vals[node] = first
            continue
        if tgt in _SPATIAL_FUNCTIONS:
            if first is not None and (first.axis != 1 or first.repeat != 1):
                unknown(node, f"{label} applied to an unexpected layout")
                continue
            vals[node] = first
            continue
        if tgt in _FLATTEN_FUNCTIONS or (method and tgt in _RESHAPE_METHODS):
            vals[node] = _flatten(sp, first, in_shape, shape, label) or fresh_frozen(
                node, f"{label} reshapes across the channel axis"
            )
            continue
        if tgt is operator.getitem:
            out = _index(first, node.args[1], in_shape, shape)
            if out is None:
                unknown(node, f"indexing {node.args[1]!r} touches the channel axis")
            else:
                vals[node] = out
            continue
        if tgt is torch.cat:
            vals[node] = _cat(sp, node, vals, shape) or fresh_frozen(node, "torch.cat")
            continue
        if tgt in _BINARY or (method and tgt in _BINARY_METHODS):
            vals[node] = _binary(sp, node, [(_shape(a), val(a)) for a in args], shape, label)
            if vals[node] is None and any(val(a) is not None for a in args):
                unknown(node, f"{label} combines tensors on different channel layouts")
            continue
        if (method and tgt in ("mean", "sum")) or tgt in (torch.mean, torch.sum):
            out = _reduce(node, first, in_shape, shape)
            if out is None:
                unknown(node, f"{label} reduces over (or moves) the channel axis")
            else:
                vals[node] = out
            continue
        unknown(node, f"op {label} is not understood by the tracer")

    groups: list[ChannelGroup] = []
    roots = sorted({sp.find(i) for i in range(len(sp.parent))})
    for r in roots:
        if not sp.producers[r] and not sp.consumers[r] and not sp.channel_ops[r]:
            continue
        producers = list(dict.fromkeys(sp.producers[r]))
        frozen = list(dict.fromkeys(sp.frozen[r]))
        if not producers and not frozen:
            frozen = ["no layer produces these channels"]
        if sp.size[r] % sp.align[r]:
            frozen.append(
                f"grouped convs split these {sp.size[r]} channels into blocks that do not tile "
                f"({sp.align[r]} blocks)"
            )
        name = producers[0] if producers else f"<space {r}>"
        if len(producers) > 1:
            name = f"{producers[0]}+{len(producers) - 1}"
        consumers = list(dict.fromkeys(sp.consumers[r]))
        groups.append(
            ChannelGroup(
                name=name,
                size=sp.size[r],
                producers=producers,
                channel_ops=list(dict.fromkeys(sp.channel_ops[r])),
                consumers=consumers,
                bn_of=dict(sp.bn_of[r]),
                frozen_reasons=frozen,
                align=sp.align[r],
            )
        )
    return groups


_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "get_device", "is_contiguous"}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}


def _shape_query(node: fx.Node) -> bool:
    """The op only reads a tensor's shape/dtype/device (its result carries no channel values)."""
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return len(node.args) > 1 and node.args[1] in _SHAPE_ATTRS
        if node.target in (len, torch.numel):
            return True
        if node.target is operator.getitem:
            # indexing a size tuple: the indexed value is itself a shape
            src = node.args[0]
            return isinstance(src, fx.Node) and _shape(src) is None and not _is_multi(src)
    return False


def _binary(sp: _Spaces, node: fx.Node, ops: list, out_shape, label: str) -> _Val | None:
    """Elementwise add/mul/sub/div: operands that span the channel axis share one space.

    ``ops`` are (shape, val) of the node's tensor operands (shape None: a Python number).
    An operand broadcast along the channel axis (size 1 there, or fewer dims) reads no
    channel and is ignored; every full-width operand must be tracked on the same layout,
    and their spaces are united (one clustering for a residual stream). Returns None when
    no operand is tracked (constants) or the layouts differ (the caller freezes).
    """
    ops = [(s, v) for s, v in ops if s is not None]
    nd = len(out_shape)
    axes = {v.axis + nd - len(s) for s, v in ops if v is not None}
    if len(axes) != 1:
        return None
    ax = axes.pop()
    full: list[_Val | None] = []
    for s, v in ops:
        pos = ax - (nd - len(s))
        if (s[pos] if pos >= 0 else 1) == 1 and out_shape[ax] != 1:
            continue  # broadcast along the channels
        full.append(v)
    if not full or any(v is None for v in full):
        return None
    first = full[0]
    sizes = [sp.size[sp.find(x)] for x in first.spaces]
    for v in full[1:]:
        if v.repeat != first.repeat or [sp.size[sp.find(x)] for x in v.spaces] != sizes:
            return None
    if sum(sizes) * first.repeat != out_shape[ax]:
        return None
    roots = list(first.spaces)
    for v in full[1:]:
        roots = [sp.union(x, y, label) for x, y in zip(roots, v.spaces)]
    roots = [sp.find(r) for r in roots]
    return _Val(roots[0], ax, first.repeat, tuple(roots) if first.compound else ())


def _index(v: _Val | None, idx, in_shape, out_shape) -> _Val | None:
    """``x[idx]`` keeps the channel space only when it leaves the channel axis untouched.

    Entries before the channel axis must be slices (the batch may be sliced), the entry on it
    a full ``:`` (or absent); later entries may index spatial axes freely.
    """
    if v is None:
        return None  # a constant
    if in_shape is None or out_shape is None:
        return None
    items = idx if isinstance(idx, tuple) else (idx,)
    for i in range(min(len(items), v.axis + 1)):
        it = items[i]
        if not isinstance(it, slice) or isinstance(it, fx.Node):
            return None
        if any(isinstance(x, fx.Node) for x in (it.start, it.stop, it.step)):
            return None
        if i == v.axis and not _full_slice(it):
            return None
    if len(out_shape) <= v.axis or out_shape[v.axis] != in_shape[v.axis]:
        return None
    return v


def _cat(sp: _Spaces, node: fx.Node, vals: dict, out_shape) -> _Val | None:
    """``torch.cat(tensors, dim)`` along the channel axis: a concatenation of the input spaces.

    Returns None (the caller freezes) for any other cat; inputs are frozen here then.
    """
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    why = "torch.cat of tensors that are not all channel maps on one layout"
    items = list(tensors) if isinstance(tensors, (list, tuple)) else []
    vs = [vals.get(t) if isinstance(t, fx.Node) else None for t in items]
    ok = (
        out_shape is not None
        and isinstance(dim, int)
        and items
        and all(isinstance(v, _Val) for v in vs)
        and len({(v.axis, v.repeat) for v in vs}) == 1
    )
    if ok:
        axis, repeat = vs[0].axis, vs[0].repeat
        ok = dim % len(out_shape) == axis
        if not ok:
            why = f"torch.cat along axis {dim}, not the channel axis {axis}"
    if not ok:
        for v in vs:
            if isinstance(v, _Val):
                for s in v.spaces:
                    sp.freeze(s, why)
        return None
    parts = tuple(sp.find(s) for v in vs for s in v.spaces)
    if sum(sp.size[s] for s in parts) * repeat != out_shape[axis]:
        for s in parts:
            sp.freeze(s, "torch.cat: traced widths do not add up")
        return None
    return _Val(parts[0], axis, repeat, parts if len(parts) > 1 else ())


def _flatten(sp: _Spaces, v: _Val | None, in_shape, out_shape, label: str) -> _Val | None:
    """flatten / view / reshape: keep the space only for (N, C, *S) -> (N, C*prod(S)).

    Returns None for any other reshape of a tracked tensor (after freezing it): the caller
    gives the output a fresh frozen space.
    """
    if v is None or in_shape is None or out_shape is None:
        return None
    if tuple(in_shape) == tuple(out_shape):
        return v
    if v.axis == 1 and len(out_shape) == 2 and out_shape[0] == in_shape[0] and len(in_shape) >= 2:
        spatial = 1
        for d in in_shape[2:]:
            spatial *= d
        if out_shape[1] == in_shape[1] * spatial:
            return _Val(v.space, 1, v.repeat * spatial, v.parts)
    for s in v.spaces:
        sp.freeze(s, f"{label} reshapes across the channel axis")
    return None


def _reduce(node: fx.Node, v: _Val | None, in_shape, out_shape) -> _Val | None:
    """mean/sum over spatial axes keeping the channel axis; None when it touches channels."""
    if v is None or in_shape is None or out_shape is None:
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or not isinstance(dims, (int, tuple, list)):
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        return None
    dims = [d % len(in_shape) for d in dims]
    if v.axis in dims or v.repeat != 1 or 0 in dims:
        return None
    if v.axis < min(dims) and len(out_shape) > v.axis and out_shape[v.axis] == in_shape[v.axis]:
        return v
    return None


def infer_example_inputs(model: nn.Module) -> tuple[torch.Tensor]:
    """Guess an input for a model whose first layer is a Linear or a Conv (batch of 2).

    Tries common image sizes for convolutional models; raises ValueError when none runs.
    """
    first = next(
        (m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))), None
    )
    if first is None:
        raise ValueError(
            f"cannot infer an input for {type(model).__name__}: no Linear/Conv layer; pass example_inputs="
        )
    p = next(model.parameters())
    if isinstance(first, nn.Linear):
        candidates = [(2, first.in_features)]
    elif isinstance(first, nn.Conv1d):
        candidates = [(2, first.in_channels, n) for n in (64, 128, 256)]
    else:
        candidates = [(2, first.in_channels, s, s) for s in (32, 224, 28, 64, 96, 128)]
    was_training = model.training
    model.eval()
    try:
        for shape in candidates:
            x = torch.randn(*shape, dtype=p.dtype, device=p.device)
            try:
                with torch.no_grad():
                    model(x)
            except Exception:
                continue
            return (x,)
    finally:
        model.train(was_training)
    raise ValueError(f"cannot infer an input for {type(model).__name__}; pass example_inputs=")
