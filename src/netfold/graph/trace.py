"""Discover channel groups of a CNN / MLP / ViT by tracing it with torch.fx.

Every tensor in the traced graph carries a *channel space* (which channels it is indexed by) and
the axis they lie on. Layers that create channels (Conv, Linear) open a new space; channel-wise
ops (activations, pooling, BatchNorm, depthwise conv, dropout) pass it through; residual
additions / products unite the spaces of their operands (one clustering for the whole stream; a
squeeze-excite gate joins its expand conv to the gated tensor's space); ``flatten`` keeps the
space but widens each channel to H*W contiguous columns; ``torch.cat`` along channels gives a
concatenation of spaces (each folds on its own, consumers read it at an offset), along another
axis it unites them; a grouped conv confines its input and output spaces' clusters to its conv
groups; ``permute`` / ``transpose`` / reshapes that keep the channel axis whole move it.

Modules traced through (timm's BatchNormAct2d, LayerNorm2d, Linear) reach the graph as
functional ``batch_norm`` / ``layer_norm`` / ``linear`` calls on ``get_attr`` parameters; a
call whose parameters are all one BatchNorm / LayerNorm / Linear module's is treated as that
module. A bare parameter added to or multiplied with the channels (layer-scale gamma (C,) or
(C, 1, 1), a ViT's class token and position embedding) is a per-channel parameter of the space.
LayerNorm over the channel axis is folded as a per-channel op and recorded as an approximation
(``ChannelGroup.approximations``): it normalises across channels, so merging changes its
statistics unless every cluster has the same size.

Every other op (LSTM, attention, split/chunk, topk/max/sort/argmax over channels, norms over
other axes, reshapes that split the channel axis such as attention heads, indexing along
channels ...) freezes every space that reaches it and gives its output a fresh frozen space,
with the op's name as the reason; so does a group module's parameter read by an op the tracer
does not follow. An unknown op can leave groups unfolded but never causes a wrong shape or a
silent wrong fold.

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

from .groups import ChannelGroup, ChannelParam, Consumer

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
    # padding of the spatial axes treats every channel alike
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
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
_PERMUTE_FUNCTIONS = {torch.permute, torch.transpose, torch.swapaxes, torch.swapdims}
_PERMUTE_METHODS = {"permute", "transpose", "swapaxes", "swapdims"}
# Ops that only re-view a parameter (for following a layer-scale gamma / position embedding
# from its get_attr to the op that applies it to the channels).
_PARAM_VIEW_METHODS = (
    _RESHAPE_METHODS
    | _PERMUTE_METHODS
    | {
        "expand",
        "expand_as",
        "unsqueeze",
        "squeeze",
        "contiguous",
        "clone",
        "detach",
        "to",
        "float",
        "double",
        "half",
        "bfloat16",
        "type_as",
    }
)
_PARAM_VIEW_FUNCTIONS = (
    _FLATTEN_FUNCTIONS
    | _PERMUTE_FUNCTIONS
    | {
        torch.reshape,
        torch.unsqueeze,
        torch.squeeze,
        torch.broadcast_to,
        operator.getitem,
    }
)
# Tensor methods whose result takes only dtype/device (and a given shape) from the tensor:
# timm's drop_path draws its per-sample mask with x.new_empty((N, 1, 1, 1)).bernoulli_().
_FACTORY_METHODS = {"new_empty", "new_zeros", "new_ones", "new_full", "new_tensor"}
_LN_APPROX = (
    "{}: LayerNorm over the channel axis normalises across channels; merged channels keep its "
    "mean/variance only when every cluster has the same size (approximate otherwise)"
)


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
class _PRef:
    """A tensor that is a view of parameter/buffer ``target``: ``dims[i]`` is the parameter axis
    behind axis i (None: a broadcast or new axis)."""

    target: str
    dims: tuple[int | None, ...]


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
        self.params: list[list[ChannelParam]] = []
        self.approx: list[list[str]] = []

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
        self.params.append([])
        self.approx.append([])
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
        for attr in ("frozen", "producers", "channel_ops", "consumers", "params", "approx"):
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
        model: a CNN / MLP / ViT made of torch.nn layers (custom modules, such as timm's, are
            traced through). Left as it was: mode, parameters and buffers.
        example_inputs: one input tensor (or a tuple) used for shape propagation, e.g.
            (N, C, H, W); inferred from the first layer when None.

    Raises:
        TraceError: the model cannot be traced by torch.fx.
    """
    if example_inputs is None:
        example_inputs = infer_example_inputs(model)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    # A module traced through (timm's BatchNormAct2d) bakes its train/eval branch into the
    # graph: in train mode tracing runs its ``num_batches_tracked.add_(1)`` eagerly (fx does
    # not proxy buffers) and shape propagation its functional batch_norm, which updates the
    # running statistics on the example input. Finding groups must not change the model.
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    try:
        gm = trace(model)
    except BaseException:
        _restore(buffers)
        raise
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
        _restore(buffers)
    return _analyse(gm, model)


def _restore(buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)


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


def _bind(node: fx.Node, names: Sequence[str]) -> dict:
    """Positional and keyword arguments of a functional call, by parameter name."""
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _attr_of(a) -> tuple[str, str] | None:
    """(module name, tensor name) of a ``get_attr`` node, else None."""
    if isinstance(a, fx.Node) and a.op == "get_attr":
        mod, _, tname = str(a.target).rpartition(".")
        return mod, tname
    return None


def _own_tensors(mod: nn.Module, name: str, ba: dict, keys: Sequence[str]) -> bool:
    """Each of ``keys`` in the bound call ``ba`` is ``name.<key>``, or None where the module's is."""
    for k in keys:
        a = ba.get(k)
        if a is None:
            if getattr(mod, k, None) is not None:
                return False
        elif _attr_of(a) != (name, k):
            return False
    return True


def _producer_name(src) -> str | None:
    """The module whose weights compute node ``src``: a module call, or a functional
    conv / linear call on one module's ``weight`` (None otherwise)."""
    if not isinstance(src, fx.Node):
        return None
    if src.op == "call_module":
        return str(src.target)
    if src.op == "call_function" and src.target in (F.conv1d, F.conv2d, F.linear):
        owner = _attr_of(src.args[1] if len(src.args) > 1 else src.kwargs.get("weight"))
        return owner[0] if owner and owner[1] == "weight" else None
    return None


def _real_users(node: fx.Node) -> list[fx.Node]:
    """Users that read values (not only the shape: timm asserts on ``x.ndim``)."""
    return [u for u in node.users if not _shape_query(u)]


def _analyse(gm: fx.GraphModule, model: nn.Module) -> list[ChannelGroup]:
    # The model's own modules: a GraphModule rebuilds the owners of get_attr targets as bare
    # nn.Module shells, so their types (BatchNormAct2d, LayerNorm2d, Linear) live only here.
    modules = dict(model.named_modules())
    sp = _Spaces()
    # None: no channel space (a constant, a size); _Val: tracked; _Multi: a frozen tuple
    vals: dict[fx.Node, _Val | _Multi | None] = {}
    # untracked tensors that are views of one parameter (to find per-channel parameters)
    prefs: dict[fx.Node, _PRef] = {}
    # get_attr target -> the space its channel entries belong to
    param_space: dict[str, int] = {}
    # (get_attr target, node) pairs the tracer understood: any other read of a group module's
    # parameter freezes the group (merging would change a shape that read does not expect)
    ok_use: set[tuple[str, fx.Node]] = set()
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

    def add_params(node: fx.Node, space: int, found: list[tuple[str, int]]) -> int:
        """Attach per-channel parameters (target, axis) to ``space``; returns its root."""
        for target, axis in found:
            mod, _, tname = target.rpartition(".")
            if target in param_space:
                space = sp.union(param_space[target], space, f"parameter {target} reused")
            param_space[target] = space
            sp.params[sp.find(space)].append(ChannelParam(mod, tname, axis))
            ok_use.add((target, node))
        return sp.find(space)

    def do_linear(node: fx.Node, name: str, mod: nn.Linear, first, in_shape, shape, label) -> None:
        nd = len(in_shape) if in_shape else 2
        if first is None or first.axis != nd - 1:
            freeze_val(first, f"{name} (Linear) reads axis {nd - 1}, not the channel axis")
        else:
            consume(name, first, mod.in_features, label)
        vals[node] = _Val(new_producer(name, mod.out_features), len(shape) - 1)

    def do_bn(node: fx.Node, name: str, mod: nn.Module, first, src) -> None:
        if (
            first is None
            or first.compound
            or first.axis != 1
            or first.repeat != 1
            or not mod.track_running_stats
        ):
            unknown(node, f"{name}: BatchNorm on an unexpected layout")
            return
        s = remember(module_in, name, first.space)
        sp.channel_ops[sp.find(s)].append(name)
        producer = _producer_name(src)
        if (
            producer is not None
            and isinstance(modules.get(producer), (nn.Conv1d, nn.Conv2d, nn.Linear))
            and len(_real_users(src)) == 1
            and producer in sp.producers[sp.find(s)]
        ):
            sp.bn_of[sp.find(s)][producer] = name
        vals[node] = _Val(sp.find(s), 1)

    def do_conv(node: fx.Node, name: str, mod: nn.Module, first) -> None:
        """Conv1d / Conv2d (module call, or functional call on one conv module's weights)."""
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
                return
            out = new_producer(name, mod.out_channels)
            if mod.groups > 1:
                sp.set_align(out, mod.groups)
            vals[node] = _Val(out, 1)
            return
        if depthwise:
            s = remember(module_in, name, first.space)
            s = sp.union(s, remember(module_out, name, s), "depthwise")
            sp.channel_ops[sp.find(s)].append(name)
            vals[node] = _Val(s, 1)
            return
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
            return
        consume(name, first, mod.in_channels, name)
        vals[node] = _Val(new_producer(name, mod.out_channels), 1)

    def do_layer_norm(node: fx.Node, name: str | None, norm_shape, first, shape, label) -> None:
        """LayerNorm over the channel axis (the last): a per-channel op, approximately."""
        width = sp.size[sp.find(first.space)] if first is not None else None
        if (
            first is None
            or first.compound
            or first.repeat != 1
            or first.axis != len(shape) - 1
            or tuple(norm_shape) != (width,)
        ):
            unknown(node, f"{label}: LayerNorm over {tuple(norm_shape)} on an unexpected layout")
            return
        s = first.space
        if name is not None:  # affine: weight/bias merged by the cluster mean
            s = remember(module_in, name, s)
            sp.channel_ops[sp.find(s)].append(name)
        why = _LN_APPROX.format(name or label)
        r = sp.find(s)
        if why not in sp.approx[r]:
            sp.approx[r].append(why)
        vals[node] = _Val(r, first.axis)

    def functional(node: fx.Node, first, in_shape, shape, label) -> bool:
        """F.batch_norm / F.layer_norm / F.linear on one module's parameters; True if handled."""
        tgt = node.target
        if tgt is F.batch_norm:
            keys = ("running_mean", "running_var", "weight", "bias")
            ba = _bind(node, ("input",) + keys + ("training", "momentum", "eps"))
            owner = _attr_of(ba.get("running_mean"))
            mod = modules.get(owner[0]) if owner else None
            if not isinstance(mod, nn.modules.batchnorm._BatchNorm) or not _own_tensors(
                mod, owner[0], ba, keys
            ):
                unknown(node, "op batch_norm on statistics that are not one BatchNorm module's")
                return True
            ok_use.update((str(ba[k].target), node) for k in keys if ba.get(k) is not None)
            do_bn(node, owner[0], mod, first, ba.get("input"))
            return True
        if tgt is F.layer_norm:
            keys = ("weight", "bias")
            ba = _bind(node, ("input", "normalized_shape") + keys + ("eps",))
            owner = _attr_of(ba.get("weight"))
            norm_shape = ba.get("normalized_shape")
            if not isinstance(norm_shape, (list, tuple)) or not all(
                isinstance(d, int) for d in norm_shape
            ):
                unknown(node, "op layer_norm with a traced normalized_shape")
                return True
            if owner is None and ba.get("bias") is None:
                do_layer_norm(node, None, norm_shape, first, shape, label)
                return True
            mod = modules.get(owner[0]) if owner else None
            if not isinstance(mod, nn.LayerNorm) or not _own_tensors(mod, owner[0], ba, keys):
                unknown(node, "op layer_norm with parameters that are not one LayerNorm's")
                return True
            ok_use.update((str(ba[k].target), node) for k in keys if ba.get(k) is not None)
            do_layer_norm(node, owner[0], norm_shape, first, shape, label)
            return True
        if tgt in (F.conv1d, F.conv2d):
            # Conv subclasses that call F.conv2d on their own weights (e.g. "same"-padding
            # convs) are the conv module itself, when every argument is the module's own.
            keys = ("weight", "bias")
            ba = _bind(node, ("input",) + keys + ("stride", "padding", "dilation", "groups"))
            owner = _attr_of(ba.get("weight"))
            mod = modules.get(owner[0]) if owner else None
            if (
                not isinstance(mod, (nn.Conv1d, nn.Conv2d))
                or not _own_tensors(mod, owner[0], ba, keys)
                or ba.get("groups", 1) != mod.groups
            ):
                unknown(node, f"op {tgt.__name__} with weights that are not one conv module's")
                return True
            ok_use.update((str(ba[k].target), node) for k in keys if ba.get(k) is not None)
            do_conv(node, owner[0], mod, first)
            return True
        if tgt is F.pad:
            ba = _bind(node, ("input", "pad", "mode", "value"))
            pad, nd = ba.get("pad"), len(in_shape) if in_shape is not None else 0
            spatial = isinstance(pad, (list, tuple)) and len(pad) <= 2 * (nd - 2)
            if first is not None and (not spatial or first.axis != 1 or first.repeat != 1):
                unknown(node, "op pad pads the channel axis or an unexpected layout")
                return True
            vals[node] = first  # padding H / W treats every channel alike
            return True
        if tgt is F.linear:
            keys = ("weight", "bias")
            ba = _bind(node, ("input",) + keys)
            owner = _attr_of(ba.get("weight"))
            mod = modules.get(owner[0]) if owner else None
            if not isinstance(mod, nn.Linear) or not _own_tensors(mod, owner[0], ba, keys):
                unknown(node, "op linear with weights that are not one Linear module's")
                return True
            ok_use.update((str(ba[k].target), node) for k in keys if ba.get(k) is not None)
            do_linear(node, owner[0], mod, first, in_shape, shape, label)
            return True
        return False

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
            if shape is not None and len(shape) >= 1:
                prefs[node] = _PRef(str(node.target), tuple(range(len(shape))))
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
                do_conv(node, name, mod, first)
                continue
            if isinstance(mod, nn.Linear):
                do_linear(node, name, mod, first, in_shape, shape, label)
                continue
            if isinstance(mod, _BN):
                do_bn(node, name, mod, first, args[0] if args else None)
                continue
            if isinstance(mod, nn.LayerNorm):
                do_layer_norm(
                    node,
                    name if mod.weight is not None or mod.bias is not None else None,
                    mod.normalized_shape,
                    first,
                    shape,
                    name,
                )
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
                vals[node] = _reshape(sp, first, in_shape, shape, name) or fresh_frozen(
                    node, f"{name} reshapes across the channel axis"
                )
                continue
            unknown(node, f"module {name} ({kind}) is not understood by the tracer")
            continue

        # call_function / call_method
        tgt = node.target
        method = node.op == "call_method"
        if method and tgt in _FACTORY_METHODS:
            vals[node] = None  # a new constant: no channel values flow from the tensor
            continue
        if not tracked_in:
            # Only constants and parameters in: the result is a constant. Follow views of one
            # parameter so that applying it to the channels is recognised (layer scale).
            vals[node] = None
            src = args[0] if args else None
            if src in prefs and (
                (method and tgt in _PARAM_VIEW_METHODS) or tgt in _PARAM_VIEW_FUNCTIONS
            ):
                dims = _view_dims(node, prefs[src].dims, _shape(src), shape)
                if dims is not None:
                    prefs[node] = _PRef(prefs[src].target, dims)
            continue
        if tgt in _SPLIT_FUNCTIONS or (method and tgt in _SPLIT_METHODS):
            unknown(node, f"op {label} splits a tensor into pieces (not followed; frozen)")
            continue
        if _is_multi(node):
            unknown(node, f"op {label} returns a tuple the tracer does not follow")
            continue
        if not method and functional(node, first, in_shape, shape, label):
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
        if tgt in _PERMUTE_FUNCTIONS or (method and tgt in _PERMUTE_METHODS):
            perm = _permutation(node, len(in_shape)) if in_shape is not None else None
            if first is None or perm is None:
                unknown(node, f"op {label} with arguments the tracer does not follow")
                continue
            vals[node] = _Val(first.space, perm.index(first.axis), first.repeat, first.parts)
            continue
        if (
            tgt in _FLATTEN_FUNCTIONS
            or tgt is torch.reshape
            or (method and tgt in _RESHAPE_METHODS)
        ):
            vals[node] = _reshape(sp, first, in_shape, shape, label) or fresh_frozen(
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
            got = _cat(sp, node, vals, prefs, shape)
            if got is None:
                vals[node] = fresh_frozen(node, "torch.cat")
            else:
                vals[node] = got[0]
                if got[1]:
                    r = add_params(node, got[0].space, got[1])
                    vals[node] = _Val(r, got[0].axis, got[0].repeat)
            continue
        if tgt in _BINARY or (method and tgt in _BINARY_METHODS):
            ops = [(_shape(a), val(a), prefs.get(a)) for a in args]
            got = _binary(sp, ops, shape, label)
            if got is None:
                vals[node] = None
                if any(val(a) is not None for a in args):
                    unknown(node, f"{label} combines tensors on different channel layouts")
                continue
            vals[node] = got[0]
            if got[1]:
                r = add_params(node, got[0].space, got[1])
                vals[node] = _Val(r, got[0].axis, got[0].repeat)
            continue
        if (method and tgt in ("mean", "sum")) or tgt in (torch.mean, torch.sum):
            out = _reduce(node, first, in_shape, shape)
            if out is None:
                unknown(node, f"{label} reduces over (or moves) the channel axis")
            else:
                vals[node] = out
            continue
        unknown(node, f"op {label} is not understood by the tracer")

    _freeze_direct_reads(gm, sp, prefs, ok_use, module_in, module_out, param_space)

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
                channel_params=list(dict.fromkeys(sp.params[r])),
                approximations=list(dict.fromkeys(sp.approx[r])),
            )
        )
    return groups


def _freeze_direct_reads(
    gm: fx.GraphModule,
    sp: _Spaces,
    prefs: dict[fx.Node, _PRef],
    ok_use: set[tuple[str, fx.Node]],
    module_in: dict[str, int],
    module_out: dict[str, int],
    param_space: dict[str, int],
) -> None:
    """Freeze a space when a parameter it merges is also read by an op the tracer did not follow.

    Merging shrinks that parameter; the other read (a tied weight, ``gamma.sum()`` ...) would
    then see a shape it does not expect.
    """

    def terminals(n: fx.Node, target: str):
        for u in n.users:
            if u in prefs and prefs[u].target == target and u.op != "get_attr":
                yield from terminals(u, target)
            else:
                yield u

    for node in gm.graph.nodes:
        if node.op != "get_attr" or node not in prefs:
            continue
        target = str(node.target)
        bad = [u for u in terminals(node, target) if (target, u) not in ok_use]
        if not bad:
            continue
        mod = target.rpartition(".")[0]
        spaces = [t[mod] for t in (module_in, module_out) if mod in t]
        if target in param_space:
            spaces.append(param_space[target])
        for s in spaces:
            sp.freeze(s, f"parameter {target} is also read by {_op_name(bad[0])}")


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


def _param_axis(pref: _PRef | None, shape, ax: int, nd: int) -> int | None:
    """The parameter axis behind output axis ``ax`` of an operand of ``shape`` (right-aligned)."""
    if pref is None:
        return None
    pos = ax - (nd - len(shape))
    if pos < 0 or pos >= len(pref.dims):
        return None
    return pref.dims[pos]


def _binary(sp: _Spaces, ops: list, out_shape, label: str):
    """Elementwise add/mul/sub/div: operands that span the channel axis share one space.

    ``ops`` are (shape, val, pref) of the node's tensor operands (shape None: a Python number;
    pref: the parameter an untracked operand is a view of). An operand broadcast along the
    channel axis (size 1 there, or fewer dims) reads no channel and is ignored; a parameter
    spanning the channel axis (layer-scale gamma, position embedding) is a per-channel
    parameter of the space; every other full-width operand must be tracked on the same
    layout, and their spaces are united (one clustering for a residual stream, and a
    squeeze-excite gate's expand conv joins the gated space).

    Returns (val, [(parameter target, parameter axis)]), or None when no operand is tracked
    (constants) or the layouts differ (the caller freezes).
    """
    ops = [(s, v, p) for s, v, p in ops if s is not None]
    nd = len(out_shape)
    axes = {v.axis + nd - len(s) for s, v, _ in ops if v is not None}
    if len(axes) != 1:
        return None
    ax = axes.pop()
    full: list[_Val] = []
    params: list[tuple[str, int]] = []
    for s, v, p in ops:
        pos = ax - (nd - len(s))
        if (s[pos] if pos >= 0 else 1) == 1 and out_shape[ax] != 1:
            continue  # broadcast along the channels
        if v is not None:
            full.append(v)
            continue
        pa = _param_axis(p, s, ax, nd)
        if pa is None:
            return None  # a full-width constant the tracer cannot attribute: freeze
        params.append((p.target, pa))
    if not full:
        return None
    first = full[0]
    sizes = [sp.size[sp.find(x)] for x in first.spaces]
    for v in full[1:]:
        if v.repeat != first.repeat or [sp.size[sp.find(x)] for x in v.spaces] != sizes:
            return None
    if sum(sizes) * first.repeat != out_shape[ax]:
        return None
    if params and (first.compound or first.repeat != 1):
        return None  # one parameter over several spaces / flattened columns: not followed
    roots = list(first.spaces)
    for v in full[1:]:
        roots = [sp.union(x, y, label) for x, y in zip(roots, v.spaces)]
    roots = [sp.find(r) for r in roots]
    return _Val(roots[0], ax, first.repeat, tuple(roots) if first.compound else ()), params


def _index(v: _Val | None, idx, in_shape, out_shape) -> _Val | None:
    """``x[idx]`` keeps the channel space when it leaves the channel axis whole.

    Before the channel axis: slices, integers (the axis moves left: ViT's ``x[:, 0]`` class
    token) and None (it moves right); on it: a full ``:`` (or nothing); after it: anything
    but a second advanced index (which would move the axis to the front).
    """
    if v is None or in_shape is None or out_shape is None:
        return None
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if sum(it is Ellipsis for it in items) > 1:
        return None
    if Ellipsis in items:
        e = items.index(Ellipsis)
        real = sum(it is not None for it in items) - 1
        items[e : e + 1] = [slice(None)] * (len(in_shape) - real)
    d = o = 0
    new_axis = None
    advanced = 0
    for it in items:
        if it is None:
            o += 1
            continue
        if d == v.axis:
            if not _full_slice(it):
                return None
            new_axis = o
            d, o = d + 1, o + 1
            continue
        if isinstance(it, slice):
            if any(isinstance(x, fx.Node) for x in (it.start, it.stop, it.step)) and d < v.axis:
                return None
            d, o = d + 1, o + 1
        elif isinstance(it, int) and not isinstance(it, bool):
            d += 1
        else:  # a tensor / list index
            advanced += 1
            if d < v.axis or advanced > 1:
                return None
            d, o = d + 1, o + 1  # approximate: checked against out_shape below
    if new_axis is None:
        new_axis = o + (v.axis - d)
    if new_axis >= len(out_shape) or out_shape[new_axis] != in_shape[v.axis]:
        return None
    return _Val(v.space, new_axis, v.repeat, v.parts)


def _cat(sp: _Spaces, node: fx.Node, vals: dict, prefs: dict, out_shape):
    """``torch.cat(tensors, dim)``: along the channel axis a concatenation of the input spaces;
    along another axis (ViT's class token before the patch tokens) one united space, with
    parameters spanning the channels as per-channel parameters.

    Returns (val, [(parameter target, axis)]) or None (the caller freezes; inputs are frozen
    here then).
    """
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    why = "torch.cat of tensors that are not all channel maps on one layout"
    items = list(tensors) if isinstance(tensors, (list, tuple)) else []
    vs = [vals.get(t) if isinstance(t, fx.Node) else None for t in items]
    tracked = [v for v in vs if isinstance(v, _Val)]

    def fail(reason: str):
        for v in tracked:
            for s in v.spaces:
                sp.freeze(s, reason)
        return None

    if out_shape is None or not isinstance(dim, int) or not items or not tracked:
        return fail(why)
    if any(isinstance(v, _Multi) for v in vs) or len({(v.axis, v.repeat) for v in tracked}) != 1:
        return fail(why)
    axis, repeat = tracked[0].axis, tracked[0].repeat
    if dim % len(out_shape) != axis:
        # along another axis: every tracked input is the same channel map, parameters join
        sizes = [sp.size[sp.find(x)] for x in tracked[0].spaces]
        params: list[tuple[str, int]] = []
        for t, v in zip(items, vs):
            if isinstance(v, _Val):
                if [sp.size[sp.find(x)] for x in v.spaces] != sizes:
                    return fail(why)
                continue
            pref = prefs.get(t) if isinstance(t, fx.Node) else None
            pa = pref.dims[axis] if pref is not None and axis < len(pref.dims) else None
            if pa is None:
                return fail(f"torch.cat along axis {dim} of a constant the tracer cannot follow")
            params.append((pref.target, pa))
        if params and (tracked[0].compound or repeat != 1):
            return fail(why)
        roots = list(tracked[0].spaces)
        for v in tracked[1:]:
            roots = [sp.union(x, y, "torch.cat") for x, y in zip(roots, v.spaces)]
        roots = [sp.find(r) for r in roots]
        first = tracked[0]
        return _Val(roots[0], axis, repeat, tuple(roots) if first.compound else ()), params
    if len(tracked) != len(vs):
        return fail(why)
    parts = tuple(sp.find(s) for v in vs for s in v.spaces)
    if sum(sp.size[s] for s in parts) * repeat != out_shape[axis]:
        return fail("torch.cat: traced widths do not add up")
    return _Val(parts[0], axis, repeat, parts if len(parts) > 1 else ()), []


def _reshape_axis(in_shape, out_shape, a: int) -> tuple[int, int] | None:
    """Where axis ``a`` lands in a reshape: (output axis b, columns per input entry m).

    Row-major reshape keeps axis a whole iff some output axis b starts after exactly the
    elements of in_shape[:a] and ends after those of in_shape[:j] (j > a): b then holds
    axis a merged with in_shape[a + 1 : j] (m = their product).
    """
    pre = math.prod(in_shape[:a])
    cum_in = [math.prod(in_shape[:j]) for j in range(len(in_shape) + 1)]
    for b in range(len(out_shape)):
        if math.prod(out_shape[:b]) != pre:
            continue
        upto = math.prod(out_shape[: b + 1])
        for j in range(a + 1, len(in_shape) + 1):
            if cum_in[j] == upto:
                return b, math.prod(in_shape[a + 1 : j])
    return None


def _reshape(sp: _Spaces, v: _Val | None, in_shape, out_shape, label: str) -> _Val | None:
    """flatten / view / reshape: keep the space when the channel axis stays whole.

    (N, C, H, W) -> (N, C*H*W) widens each channel to H*W contiguous columns;
    (N, C, H, W) -> (N, C, H*W) (ViT patches) keeps it. Returns None for a reshape that
    splits the channel axis (attention heads) or merges it under another axis, after
    freezing the space: the caller gives the output a fresh frozen space.
    """
    if v is None or in_shape is None or out_shape is None:
        return None
    if tuple(in_shape) == tuple(out_shape):
        return v
    got = _reshape_axis(tuple(in_shape), tuple(out_shape), v.axis)
    if got is not None and got[0] < len(out_shape):
        return _Val(v.space, got[0], v.repeat * got[1], v.parts)
    shapes = f"{tuple(in_shape)} -> {tuple(out_shape)}"
    if _splits_axis(tuple(in_shape), tuple(out_shape), v.axis):
        why = f"{label} splits the channel axis ({shapes}), as into attention heads: not followed"
    else:
        why = f"{label} reshapes across the channel axis ({shapes})"
    for s in v.spaces:
        sp.freeze(s, why)
    return None


def _splits_axis(in_shape: tuple, out_shape: tuple, a: int) -> bool:
    """Whether the reshape cuts axis ``a`` into several output axes (heads x head_dim)."""
    pre = math.prod(in_shape[:a])
    for b in range(len(out_shape)):
        if math.prod(out_shape[:b]) == pre:
            for e in range(b + 2, len(out_shape) + 1):
                if math.prod(out_shape[b:e]) == in_shape[a] and out_shape[b] != 1:
                    return True
    return False


def _reduce(node: fx.Node, v: _Val | None, in_shape, out_shape) -> _Val | None:
    """mean/sum over axes other than the batch and the channels; None when it touches them."""
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
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if not isinstance(keep, bool):
        return None
    axis = v.axis if keep else v.axis - sum(d < v.axis for d in dims)
    if axis < len(out_shape) and out_shape[axis] == in_shape[v.axis]:
        return _Val(v.space, axis, v.repeat, v.parts)
    return None


def _permutation(node: fx.Node, nd: int) -> list[int] | None:
    """The permutation of a permute / transpose call (output axis i is input axis perm[i])."""
    rest = list(node.args[1:])
    if node.target in ("permute",) or node.target is torch.permute:
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        dims = node.kwargs.get("dims", dims)
        if not all(isinstance(d, int) for d in dims) or len(dims) != nd:
            return None
        perm = [d % nd for d in dims]
        return perm if sorted(perm) == list(range(nd)) else None
    names = ("dim0", "dim1") if node.target in ("transpose", torch.transpose) else ()
    pair = rest[:2] or [node.kwargs.get(k) for k in (names or ("axis0", "axis1"))]
    if len(pair) != 2 or not all(isinstance(d, int) for d in pair):
        return None
    a, b = (d % nd for d in pair)
    perm = list(range(nd))
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _view_dims(node: fx.Node, dims: tuple, in_shape, out_shape) -> tuple | None:
    """Parameter axes behind each output axis of a view of a parameter (None: not followed)."""
    if in_shape is None or out_shape is None:
        return None
    tgt = node.target
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if tgt in _PERMUTE_METHODS or tgt in _PERMUTE_FUNCTIONS:
        perm = _permutation(node, len(in_shape))
        return tuple(dims[p] for p in perm) if perm is not None else None
    if tgt in ("expand", "expand_as") or tgt is torch.broadcast_to:
        lead = len(out_shape) - len(in_shape)
        if lead < 0:
            return None
        return (None,) * lead + tuple(
            d if out_shape[lead + i] == in_shape[i] else None for i, d in enumerate(dims)
        )
    if tgt is operator.getitem:
        idx = node.args[1]
        items = idx if isinstance(idx, tuple) else (idx,)
        if len(out_shape) != len(in_shape) or not all(
            isinstance(i, slice)
            and not any(isinstance(x, fx.Node) for x in (i.start, i.stop, i.step))
            for i in items
        ):
            return None
        # an axis the index shortens is no longer the parameter's whole axis: not followed
        return tuple(
            d if i >= len(items) or out_shape[i] == in_shape[i] else None
            for i, d in enumerate(dims)
        )
    if in_shape == out_shape:
        return dims  # dtype/device/contiguous conversions
    # reshape / view / (un)squeeze / flatten: follow it when only size-1 axes come and go
    if [s for s in in_shape if s != 1] != [s for s in out_shape if s != 1]:
        return None
    src = iter([d for d, s in zip(dims, in_shape) if s != 1])
    return tuple(next(src) if s != 1 else None for s in out_shape)


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
