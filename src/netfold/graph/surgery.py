"""Module surgery: rebuild layers at new widths without leaving stale shapes behind.

All rewrites go through :func:`set_tensor` (new ``nn.Parameter`` / buffer objects, never
``.data`` swaps) and :func:`sync_attributes` (``in_features``, ``out_channels``, ``groups``,
``num_features`` ...), so a module's attributes always agree with its tensors. A
:class:`Snapshot` keeps references to the original tensors and attributes of every touched
module so a failed operation can put the model back exactly as it was.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .groups import ChannelGroup, Consumer

SHAPE_ATTRS = (
    "in_features",
    "out_features",
    "in_channels",
    "out_channels",
    "groups",
    "num_features",
    "num_parameters",
    "normalized_shape",
    "num_channels",
    "num_groups",
)


def get_module(root: nn.Module, name: str) -> nn.Module:
    """``root.get_submodule(name)`` with a clear error."""
    try:
        return root.get_submodule(name)
    except AttributeError as e:
        raise KeyError(f"module {name!r} not found in {type(root).__name__}") from e


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``module`` with a new object holding ``value``."""
    if name in module._parameters:
        old = module._parameters[name]
        requires_grad = old.requires_grad if old is not None else True
        module._parameters[name] = nn.Parameter(
            value.detach().clone(memory_format=torch.contiguous_format), requires_grad=requires_grad
        )
    elif name in module._buffers:
        module._buffers[name] = value.detach().clone(memory_format=torch.contiguous_format)
    else:
        raise KeyError(f"{type(module).__name__} has no parameter or buffer {name!r}")


def sync_attributes(module: nn.Module) -> None:
    """Make a layer's width attributes agree with its (already rewritten) tensors."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight
        if module.transposed:
            raise TypeError(f"transposed convolutions are not supported ({type(module).__name__})")
        out_c, in_per_group = w.shape[0], w.shape[1]
        if (
            module.groups > 1
            and in_per_group == 1
            and module.groups == module.in_channels == module.out_channels
        ):
            module.groups = out_c  # depthwise stays depthwise
            module.in_channels = out_c
        else:
            module.in_channels = in_per_group * module.groups
        module.out_channels = out_c
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        ref = module.weight if module.weight is not None else module.running_mean
        module.num_features = ref.shape[0]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.shape[0]
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.GroupNorm):
        if module.weight is not None:
            module.num_channels = module.weight.shape[0]


def consumer_columns(w: torch.Tensor, group: ChannelGroup, cons: Consumer) -> torch.Tensor:
    """The consumer weight entries that read the group's channels, one row per channel: (n, d).

    Args:
        w: the consumer's original weight (out, in_columns, *kernel), or for a grouped conv
            (out, n / groups, *kernel).
        group: the group (n = ``group.size`` channels).
        cons: how the consumer reads them (``repeat`` columns per channel from column
            ``offset * repeat``; a grouped conv reads channel block j with its output block j).
    """
    n = group.size
    out = w.shape[0]
    rest = math.prod(w.shape[2:])
    if cons.groups > 1:
        g = cons.groups
        return w.reshape(g, out // g, n // g, rest).permute(0, 2, 1, 3).reshape(n, -1)
    lo = cons.offset * cons.repeat
    cols = w.reshape(out, -1, rest)[:, lo : lo + n * cons.repeat]
    return cols.reshape(out, n, cons.repeat, rest).permute(1, 0, 2, 3).reshape(n, -1)


def copy_channels(model: nn.Module, group: ChannelGroup, src: torch.Tensor) -> None:
    """Make channel i of ``group`` a copy of channel ``src[i]`` in every tensor it indexes.

    Producer rows and per-channel tensors (channel ops, per-channel parameters) and the
    consumer columns are copied, so channels with the same source are exact duplicates that
    folding merges without error (tests and benchmarks plant them this way). A grouped-conv
    consumer reads only its own conv group's channels: a source in another conv group has no
    column there, and that column is left as it is.

    Args:
        model: the model owning the group's modules; changed in place.
        group: the channel group (n = ``group.size`` channels).
        src: (n,) source channel of every channel.

    Raises:
        ValueError: ``src`` is not n indices in [0, n).
    """
    n = group.size
    src = torch.as_tensor(src, dtype=torch.long)
    if src.shape != (n,) or bool(((src < 0) | (src >= n)).any()):
        raise ValueError(f"src must hold {n} channel indices in [0, {n}), got {tuple(src.shape)}")
    with torch.no_grad():
        for name in group.producers + group.channel_ops:
            m = get_module(model, name)
            for t in list(m._parameters.values()) + list(m._buffers.values()):
                if t is not None and t.dim() >= 1 and t.shape[0] == n:
                    t.copy_(t[src])
        for cp in group.channel_params:
            t = getattr(get_module(model, cp.module), cp.tensor)
            t.copy_(t.index_select(cp.axis, src))
        for c in group.consumers:
            w = get_module(model, c.module).weight
            out = w.shape[0]
            if c.groups > 1:
                per = n // c.groups
                v = w.view(c.groups, out // c.groups, per, -1)
                for j in range(c.groups):
                    local = src[j * per : (j + 1) * per] - j * per
                    inside = (local >= 0) & (local < per)
                    v[j][:, torch.arange(per)[inside]] = v[j][:, local[inside]]
                continue
            lo = c.offset * c.repeat
            seg = w.view(out, w.shape[1], -1)[:, lo : lo + n * c.repeat].view(out, n, c.repeat, -1)
            seg.copy_(seg[:, src])


class Snapshot:
    """References to the tensors and width attributes of some modules, for exact rollback."""

    def __init__(self, root: nn.Module, names: list[str]) -> None:
        self.root = root
        self.saved: dict[str, tuple[dict, dict, dict]] = {}
        for n in names:
            m = get_module(root, n)
            attrs = {a: getattr(m, a) for a in SHAPE_ATTRS if hasattr(m, a)}
            for extra in ("momentum", "training"):
                if hasattr(m, extra):
                    attrs[extra] = getattr(m, extra)
            self.saved[n] = (dict(m._parameters), dict(m._buffers), attrs)

    def restore(self) -> None:
        for n, (params, buffers, attrs) in self.saved.items():
            m = get_module(self.root, n)
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
            for a, v in attrs.items():
                setattr(m, a, v)


def apply_tensors(root: nn.Module, new: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write ``{module: {tensor_name: value}}`` into ``root`` and sync width attributes.

    Shapes are checked for internal consistency per module type before anything is written.
    """
    for mname, tensors in new.items():
        m = get_module(root, mname)
        for tname in tensors:
            if tname not in m._parameters and tname not in m._buffers:
                raise KeyError(f"{mname} has no tensor {tname!r}")
    for mname, tensors in new.items():
        m = get_module(root, mname)
        for tname, value in tensors.items():
            set_tensor(m, tname, value)
        sync_attributes(m)
