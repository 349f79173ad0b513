"""Discover channel groups of a CNN / MLP by tracing it with torch.fx.

Every tensor in the traced graph carries a *channel space* (which channels it is indexed by) and
the axis they lie on. Layers that create channels (Conv with groups=1, Linear) open a new space;
channel-wise ops (activations, pooling, BatchNorm, depthwise conv, dropout) pass it through;
residual additions / products unite the spaces of their operands (one clustering for the whole
stream); ``flatten`` keeps the space but widens each channel to H*W contiguous columns. Anything
the tracer does not understand freezes the spaces it touches, with the op's name as the reason,
so an unknown op can leave a group unfolded but can never cause a wrong shape.

Run: ``python -c "import torchvision, netfold.graph.trace as t; print(t.find_groups(torchvision.models.resnet18()))"``
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

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
_UNARY_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach"}
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


class TraceError(TypeError):
    """The model could not be traced into a graph netfold can reason about."""


@dataclass(frozen=True)
class _Val:
    """Channel information of one traced tensor: its space, channel axis and columns per channel."""

    space: int
    axis: int
    repeat: int = 1


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

    def new(self, size: int, frozen: str | None = None) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(size)
        self.frozen.append([frozen] if frozen else [])
        self.producers.append([])
        self.channel_ops.append([])
        self.consumers.append([])
        self.bn_of.append({})
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
        return lo

    def freeze(self, i: int, why: str) -> None:
        r = self.find(i)
        if why not in self.frozen[r]:
            self.frozen[r].append(why)


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


def _analyse(gm: fx.GraphModule) -> list[ChannelGroup]:
    modules = dict(gm.named_modules())
    sp = _Spaces()
    vals: dict[fx.Node, _Val | None] = {}  # None: a tensor with no tracked channel space
    module_out: dict[str, int] = {}
    module_in: dict[str, int] = {}

    def freeze_inputs(node: fx.Node, why: str) -> None:
        for a in _flat_nodes((node.args, node.kwargs)):
            v = vals.get(a)
            if v is not None:
                sp.freeze(v.space, why)

    def remember(table: dict[str, int], name: str, space: int) -> int:
        if name in table:
            return sp.union(table[name], space, f"module {name} called more than once")
        table[name] = space
        return space

    for node in gm.graph.nodes:
        shape = _shape(node)
        if node.op == "placeholder":
            if shape is not None and len(shape) >= 2:
                vals[node] = _Val(sp.new(shape[1], frozen="model input"), 1)
            else:
                vals[node] = None
            continue
        if node.op == "output":
            for a in _flat_nodes(node.args):
                v = vals.get(a)
                if v is not None:
                    sp.freeze(v.space, "model output")
            continue
        if shape is None:
            # size()/shape arithmetic and other non-tensor values carry no channels; but a
            # non-tensor result computed from a tracked tensor is harmless, so nothing to do.
            vals[node] = None
            continue
        if node.op == "get_attr":
            vals[node] = None
            continue

        args = _flat_nodes((node.args, node.kwargs))
        first = vals.get(args[0]) if args else None
        in_shape = _shape(args[0]) if args else None

        if node.op == "call_module":
            name = str(node.target)
            mod = modules[name]
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and not isinstance(
                mod, nn.modules.conv._ConvTransposeNd
            ):
                depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
                if first is None or first.axis != 1 or first.repeat != 1:
                    if first is not None:
                        sp.freeze(first.space, f"{name} reads an unexpected layout")
                    out = sp.new(
                        mod.out_channels,
                        frozen=None if not depthwise else "depthwise conv on untracked input",
                    )
                    if not depthwise:
                        sp.producers[out].append(name)
                    vals[node] = _Val(remember(module_out, name, out), 1)
                    continue
                if depthwise:
                    s = remember(module_in, name, first.space)
                    s = sp.union(s, remember(module_out, name, s), "depthwise")
                    sp.channel_ops[sp.find(s)].append(name)
                    vals[node] = _Val(s, 1)
                elif mod.groups == 1:
                    if sp.size[sp.find(first.space)] != mod.in_channels:
                        sp.freeze(first.space, f"{name}: in_channels != traced width")
                    s_in = remember(module_in, name, first.space)
                    sp.consumers[sp.find(s_in)].append(Consumer(name, 1))
                    out = sp.new(mod.out_channels)
                    sp.producers[out].append(name)
                    vals[node] = _Val(remember(module_out, name, out), 1)
                else:
                    why = f"{name} is a grouped conv (groups={mod.groups}) that ties input and output channels"
                    sp.freeze(first.space, why)
                    out = sp.new(mod.out_channels, frozen=why)
                    vals[node] = _Val(out, 1)
                continue
            if isinstance(mod, nn.Linear):
                nd = len(in_shape) if in_shape else 2
                if first is None or first.axis != nd - 1:
                    if first is not None:
                        sp.freeze(
                            first.space,
                            f"{name} (Linear) reads axis {nd - 1}, not the channel axis",
                        )
                    out = sp.new(mod.out_features)
                    sp.producers[out].append(name)
                    vals[node] = _Val(remember(module_out, name, out), len(shape) - 1)
                    continue
                if sp.size[sp.find(first.space)] * first.repeat != mod.in_features:
                    sp.freeze(first.space, f"{name}: in_features != traced width")
                s_in = remember(module_in, name, first.space)
                sp.consumers[sp.find(s_in)].append(Consumer(name, first.repeat))
                out = sp.new(mod.out_features)
                sp.producers[out].append(name)
                vals[node] = _Val(remember(module_out, name, out), len(shape) - 1)
                continue
            if isinstance(mod, _BN):
                if (
                    first is None
                    or first.axis != 1
                    or first.repeat != 1
                    or not mod.track_running_stats
                ):
                    if first is not None:
                        sp.freeze(first.space, f"{name}: BatchNorm on an unexpected layout")
                    vals[node] = None
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
                if first is not None and mod.num_parameters > 1:
                    sp.channel_ops[sp.find(first.space)].append(name)
                vals[node] = first
                continue
            if isinstance(mod, _UNARY_MODULES):
                vals[node] = first
                continue
            if isinstance(mod, _SPATIAL_MODULES):
                vals[node] = (
                    first if first is not None and first.axis == 1 and first.repeat == 1 else None
                )
                if first is not None and vals[node] is None:
                    sp.freeze(first.space, f"{name} applied to an unexpected layout")
                continue
            if isinstance(mod, nn.Flatten):
                vals[node] = _flatten(sp, first, in_shape, shape, name)
                continue
            why = f"module {name} ({type(mod).__name__}) is not understood by the tracer"
            freeze_inputs(node, why)
            vals[node] = None
            continue

        if node.op == "call_function" or node.op == "call_method":
            tgt = node.target
            label = _op_name(node)
            if tgt in _UNARY_FUNCTIONS or (node.op == "call_method" and tgt in _UNARY_METHODS):
                vals[node] = first
                continue
            if tgt in _SPATIAL_FUNCTIONS:
                ok = first is not None and first.axis == 1 and first.repeat == 1
                if first is not None and not ok:
                    sp.freeze(first.space, f"{label} applied to an unexpected layout")
                vals[node] = first if ok else None
                continue
            if tgt in _FLATTEN_FUNCTIONS or (node.op == "call_method" and tgt in _RESHAPE_METHODS):
                vals[node] = _flatten(sp, first, in_shape, shape, label)
                continue
            if tgt in _BINARY or (node.op == "call_method" and tgt in _BINARY_METHODS):
                tensor_args = [a for a in args if _shape(a) is not None]
                tracked = [vals.get(a) for a in tensor_args]
                if any(v is None for v in tracked):
                    freeze_inputs(node, f"{label} mixes a tracked tensor with an untracked one")
                    vals[node] = None
                    continue
                if len(tracked) == 1:
                    vals[node] = tracked[0]
                    continue
                a, b = tracked[0], tracked[1]
                sa, sb = _shape(tensor_args[0]), _shape(tensor_args[1])
                if (
                    a.axis != b.axis
                    or a.repeat != b.repeat
                    or sa is None
                    or sb is None
                    or len(sa) != len(sb)
                    or sa[a.axis] != sb[b.axis]
                ):
                    freeze_inputs(node, f"{label} combines tensors on different channel layouts")
                    vals[node] = None
                    continue
                s = sp.union(a.space, b.space, label)
                vals[node] = _Val(s, a.axis, a.repeat)
                continue
            if (
                node.op == "call_method"
                and tgt in ("mean", "sum", "amax")
                or tgt in (torch.mean, torch.sum)
            ):
                vals[node] = _reduce(sp, node, first, in_shape, shape, label)
                continue
            why = f"op {label} is not understood by the tracer"
            freeze_inputs(node, why)
            vals[node] = None
            continue

    groups: list[ChannelGroup] = []
    roots = sorted({sp.find(i) for i in range(len(sp.parent))})
    for r in roots:
        if not sp.producers[r] and not sp.consumers[r] and not sp.channel_ops[r]:
            continue
        producers = list(dict.fromkeys(sp.producers[r]))
        frozen = list(dict.fromkeys(sp.frozen[r]))
        if not producers and not frozen:
            frozen = ["no layer produces these channels"]
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
            )
        )
    return groups


def _flatten(sp: _Spaces, v: _Val | None, in_shape, out_shape, label: str) -> _Val | None:
    """flatten / view / reshape: keep the space only for (N, C, *S) -> (N, C*prod(S))."""
    if v is None or in_shape is None or out_shape is None:
        return None
    if tuple(in_shape) == tuple(out_shape):
        return v
    if v.axis == 1 and len(out_shape) == 2 and out_shape[0] == in_shape[0] and len(in_shape) >= 2:
        spatial = 1
        for d in in_shape[2:]:
            spatial *= d
        if out_shape[1] == in_shape[1] * spatial:
            return _Val(v.space, 1, v.repeat * spatial)
    sp.freeze(v.space, f"{label} reshapes across the channel axis")
    return None


def _reduce(
    sp: _Spaces, node: fx.Node, v: _Val | None, in_shape, out_shape, label: str
) -> _Val | None:
    """mean/sum over spatial axes keeps the channel axis; anything else freezes."""
    if v is None or in_shape is None or out_shape is None:
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        sp.freeze(v.space, f"{label} reduces over all axes")
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [d % len(in_shape) for d in dims]
    if v.axis in dims or v.repeat != 1 or 0 in dims:
        sp.freeze(v.space, f"{label} reduces over the channel axis")
        return None
    if v.axis < min(dims) and len(out_shape) > v.axis and out_shape[v.axis] == in_shape[v.axis]:
        return _Val(v.space, v.axis, 1)
    sp.freeze(v.space, f"{label} reduction moves the channel axis")
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
