"""Hugging Face decoders from the family table: groups, widths, attribute and config sync.

Everything here reads a :class:`~netfold.families.table.DecoderFamily` row; nothing here is
math. Per decoder layer ``<layers>.i``:

- MLP channels: gate/up rows (or fc1 rows) and down (fc2) columns, one
  :class:`~netfold.graph.groups.ChannelGroup` named ``<layers>.i.mlp`` whose input norm is the
  row's ``mlp_norm`` and whose activation is the row's ``act`` module;
- attention heads: q/k/v rows per head and o columns per head, one
  :class:`~netfold.graph.groups.HeadGroup` named ``<layers>.i.self_attn`` (GQA-aware), frozen
  with the row's reason where a family cannot express folded heads.

Fused or transposed projections are seen through :class:`~netfold.fold.views.Split` parts
named ``<module>[q]``, ``<module>[gate]``, ... (see :func:`splits`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from ..fold.views import Split
from ..graph.groups import ChannelGroup, Consumer, HeadGroup
from .table import DecoderFamily, decoder_family, supported_model_types

LAYER_WIDTHS_KEY = "netfold_layer_widths"
STOCK_ATTR = "_netfold_stock_widths"
WIDTH_FIELDS = ("intermediate_size", "num_attention_heads", "num_key_value_heads")


def family_of(model: nn.Module) -> DecoderFamily:
    """The table row of a Hugging Face decoder, or ValueError naming its model_type."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    fam = decoder_family(mt)
    if fam is None:
        raise ValueError(
            f"unsupported architecture {type(model).__name__} (model_type={mt!r}): netfold folds "
            f"Hugging Face model types {sorted(supported_model_types())}"
        )
    return fam


def is_hf_decoder(model: nn.Module) -> bool:
    """True for a Hugging Face model whose ``model_type`` has a decoder row in the table."""
    return decoder_family(getattr(getattr(model, "config", None), "model_type", None)) is not None


def layers_of(model: nn.Module, fam: DecoderFamily | None = None) -> nn.ModuleList:
    """The decoder layers (``fam.layers``)."""
    fam = fam or family_of(model)
    try:
        layers = model.get_submodule(fam.layers)
    except AttributeError:
        layers = None
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no {fam.layers}: not a {fam.name} decoder")
    return layers


def _is_transposed_linear(m: nn.Module) -> bool:
    # GPT-2's Conv1D: weight (in, out), bias (out,), width attributes nf / nx
    return (
        hasattr(m, "nf")
        and hasattr(m, "nx")
        and isinstance(getattr(m, "weight", None), nn.Parameter)
    )


def _projection_paths(fam: DecoderFamily) -> list[str]:
    a, p = fam.attention, fam.mlp
    paths = [x for x in (a.q, a.k, a.v, a.qkv, a.o) if x]
    return paths + [x for x in (p.gate, p.up, p.gate_up, p.down) if x]


def check_supported(model: nn.Module) -> DecoderFamily:
    """The family row, after checking every projection the row names is there and linear.

    Raises:
        ValueError: unknown model_type (named, with the supported ones) or a module that is
            missing or not a Linear (a ``Conv1D`` for transposed families).
    """
    fam = family_of(model)
    for i, layer in enumerate(layers_of(model, fam)):
        for path in _projection_paths(fam):
            try:
                m = layer.get_submodule(path)
            except AttributeError:
                raise ValueError(f"layer {i}: {fam.name} module {path} is missing") from None
            ok = _is_transposed_linear(m) if fam.transposed else isinstance(m, nn.Linear)
            if not ok:
                kind = "a Conv1D" if fam.transposed else "an nn.Linear"
                raise ValueError(f"layer {i}: {path} is not {kind} ({type(m).__name__})")
    return fam


def _out_features(m: nn.Module, transposed: bool) -> int:
    return m.weight.shape[1] if transposed else m.weight.shape[0]


def head_dim_of(layer: nn.Module, fam: DecoderFamily) -> int:
    return int(getattr(layer.get_submodule(fam.attention.module), fam.attention.head_dim_attr))


def layer_widths(model: nn.Module) -> list[dict[str, int]]:
    """Per decoder layer, from the tensors: intermediate_size, num_attention_heads,
    num_key_value_heads."""
    fam = family_of(model)
    a, p, t = fam.attention, fam.mlp, fam.transposed
    out = []
    for layer in layers_of(model, fam):
        hd = head_dim_of(layer, fam)
        if p.gate_up:
            inter = _out_features(layer.get_submodule(p.gate_up), t) // 2
        else:
            inter = _out_features(layer.get_submodule(p.up), t)
        nh = _in_features(layer.get_submodule(a.o), t) // hd
        if a.qkv:
            nkv = (_out_features(layer.get_submodule(a.qkv), t) // hd - nh) // 2
        else:
            nkv = _out_features(layer.get_submodule(a.k), t) // hd
        out.append(
            {"intermediate_size": inter, "num_attention_heads": nh, "num_key_value_heads": nkv}
        )
    return out


def _in_features(m: nn.Module, transposed: bool) -> int:
    return m.weight.shape[0] if transposed else m.weight.shape[1]


def _names(fam: DecoderFamily, prefix: str) -> dict[str, str]:
    """Names the fold math uses for this layer's projections (split parts for fused ones)."""
    a, p = fam.attention, fam.mlp
    n = {"o": f"{prefix}.{a.o}", "down": f"{prefix}.{p.down}"}
    if a.qkv:
        n.update({x: f"{prefix}.{a.qkv}[{x}]" for x in ("q", "k", "v")})
    else:
        n.update({"q": f"{prefix}.{a.q}", "k": f"{prefix}.{a.k}", "v": f"{prefix}.{a.v}"})
    if p.gate_up:
        n.update({x: f"{prefix}.{p.gate_up}[{x}]" for x in ("gate", "up")})
    else:
        n["up"] = f"{prefix}.{p.up}"
        if p.gate:
            n["gate"] = f"{prefix}.{p.gate}"
    return n


def splits(model: nn.Module) -> list[Split]:
    """The :class:`Split` views the fold math needs (fused projections, transposed weights)."""
    fam = family_of(model)
    a, p, t = fam.attention, fam.mlp, fam.transposed
    out: list[Split] = []
    for i, (layer, w) in enumerate(zip(layers_of(model, fam), layer_widths(model))):
        prefix = f"{fam.layers}.{i}"
        n = _names(fam, prefix)
        hd = head_dim_of(layer, fam)
        nh, nkv, inter = w["num_attention_heads"], w["num_key_value_heads"], w["intermediate_size"]
        if a.qkv:
            out.append(
                Split(
                    f"{prefix}.{a.qkv}", (n["q"], n["k"], n["v"]), (nh * hd, nkv * hd, nkv * hd), t
                )
            )
        if p.gate_up:
            out.append(Split(f"{prefix}.{p.gate_up}", (n["gate"], n["up"]), (inter, inter), t))
        if t:
            hidden = _in_features(layer.get_submodule(p.up or p.gate_up), t)
            if not p.gate_up:
                for x in ("gate", "up"):
                    if x in n:
                        out.append(Split(n[x], (n[x],), (inter,), True))
            out.append(Split(n["down"], (n["down"],), (hidden,), True))
            out.append(Split(n["o"], (n["o"],), (hidden,), True))
            if not a.qkv:
                for x in ("q", "k", "v"):
                    rows = (nh if x == "q" else nkv) * hd
                    out.append(Split(n[x], (n[x],), (rows,), True))
    return out


def find_llm_groups(model: nn.Module, heads: str = "query") -> list[ChannelGroup | HeadGroup]:
    """The foldable groups of every decoder layer: attention heads, then MLP channels."""
    fam = check_supported(model)
    groups: list[ChannelGroup | HeadGroup] = []
    for i, (layer, w) in enumerate(zip(layers_of(model, fam), layer_widths(model))):
        prefix = f"{fam.layers}.{i}"
        n = _names(fam, prefix)
        hg = HeadGroup(
            name=f"{prefix}.self_attn",
            q=n["q"],
            k=n["k"],
            v=n["v"],
            o=n["o"],
            num_heads=w["num_attention_heads"],
            num_kv_heads=w["num_key_value_heads"],
            head_dim=head_dim_of(layer, fam),
            unit=heads,
            input_norm=f"{prefix}.{fam.attn_norm}",
            norm_offset=fam.norm_offset,
        )
        if fam.attention.frozen:
            hg.frozen_reasons.append(fam.attention.frozen)
        groups.append(hg)
        producers = [n["gate"], n["up"]] if "gate" in n else [n["up"]]
        groups.append(
            ChannelGroup(
                name=f"{prefix}.mlp",
                size=w["intermediate_size"],
                producers=producers,
                consumers=[Consumer(n["down"])],
                input_norm=f"{prefix}.{fam.mlp_norm}",
                norm_offset=fam.norm_offset,
                activation=f"{prefix}.{fam.mlp.act}",
            )
        )
    return groups


def mlp_norms(model: nn.Module) -> dict[str, nn.Module]:
    """{MLP group name: the norm module whose output the MLP reads}."""
    fam = family_of(model)
    return {
        f"{fam.layers}.{i}.mlp": layer.get_submodule(fam.mlp_norm)
        for i, layer in enumerate(layers_of(model, fam))
    }


# ---------------------------------------------------------------------------------- sync
def _set_attr_widths(layer: nn.Module, fam: DecoderFamily, w: dict[str, int]) -> None:
    a, p = fam.attention, fam.mlp
    attn = layer.get_submodule(a.module)
    nh, nkv = w["num_attention_heads"], w["num_key_value_heads"]
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = nh // nkv
    for attr in a.heads_attrs:
        if hasattr(attn, attr):
            setattr(attn, attr, nh)
    for attr in a.kv_heads_attrs:
        if hasattr(attn, attr):
            setattr(attn, attr, nkv)
    hd = int(getattr(attn, a.head_dim_attr))
    for attr in a.width_attrs:
        if hasattr(attn, attr):
            setattr(attn, attr, nh * hd)
    if p.module and p.size_attr and hasattr(layer.get_submodule(p.module), p.size_attr):
        setattr(layer.get_submodule(p.module), p.size_attr, w["intermediate_size"])
    if fam.transposed:
        for path in _projection_paths(fam):
            m = layer.get_submodule(path)
            m.nx, m.nf = m.weight.shape


def sync_decoder(model: nn.Module) -> None:
    """Make attention/MLP attributes and the config agree with the (rewritten) tensors.

    Uniform widths go into the family's stock config fields; per-layer widths (or folded head
    counts of a family whose config has no ``head_dim``) go to ``config.netfold_layer_widths``.
    """
    fam = family_of(model)
    widths = layer_widths(model)
    layers = layers_of(model, fam)
    for layer, w in zip(layers, widths):
        _set_attr_widths(layer, fam, w)
    cfg = model.config
    if fam.head_dim_in_config:
        cfg.head_dim = head_dim_of(layers[0], fam)
    first = widths[0]
    fields = {k: fam.config_field(k) for k in WIDTH_FIELDS}
    if not hasattr(model, STOCK_ATTR):
        # the head counts the config had before the first fold: a save falls back to them
        # when transformers refuses the folded ones
        setattr(
            model,
            STOCK_ATTR,
            {k: getattr(cfg, f) for k, f in fields.items() if k != "intermediate_size" and f},
        )
    stock = getattr(model, STOCK_ATTR)
    heads_stock = all(
        w["num_attention_heads"] == stock.get("num_attention_heads", w["num_attention_heads"])
        and w["num_key_value_heads"] == stock.get("num_key_value_heads", w["num_key_value_heads"])
        for w in widths
    )
    uniform = all(w == first for w in widths)
    if uniform and (fam.head_dim_in_config or heads_stock):
        for k, v in first.items():
            if fields[k]:
                setattr(cfg, fields[k], v)
        if hasattr(cfg, LAYER_WIDTHS_KEY):
            delattr(cfg, LAYER_WIDTHS_KEY)
    else:
        if uniform and fields["intermediate_size"]:
            setattr(cfg, fields["intermediate_size"], first["intermediate_size"])
        setattr(cfg, LAYER_WIDTHS_KEY, widths)


class AttrSnapshot:
    """Attention/MLP attributes and the config, for rollback beside the tensor Snapshot."""

    KEEP = (
        "num_heads",
        "num_key_value_heads",
        "num_key_value_groups",
        "intermediate_size",
        "nf",
        "nx",
    )

    def __init__(self, model: nn.Module) -> None:
        fam = family_of(model)
        self.model = model
        self.cfg = copy.deepcopy(model.config.__dict__)
        self.attrs: list[tuple[nn.Module, dict[str, Any]]] = []
        for layer in layers_of(model, fam):
            mods = [layer.get_submodule(fam.attention.module)]
            if fam.mlp.module:
                mods.append(layer.get_submodule(fam.mlp.module))
            mods += [layer.get_submodule(p) for p in _projection_paths(fam)]
            for m in mods:
                self.attrs.append((m, {a: getattr(m, a) for a in self.KEEP if hasattr(m, a)}))

    def restore(self) -> None:
        self.model.config.__dict__.clear()
        self.model.config.__dict__.update(self.cfg)
        for m, attrs in self.attrs:
            for a, v in attrs.items():
                setattr(m, a, v)


def _reshape(m: nn.Module, out_f: int | None, in_f: int | None, transposed: bool) -> None:
    """Give projection ``m`` empty tensors of (out_f, in_f) (None: keep), before loading."""
    w = m.weight
    o0, i0 = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
    o, i = out_f or o0, in_f or i0
    shape = (i, o) if transposed else (o, i)
    m.weight = nn.Parameter(torch.empty(shape, dtype=w.dtype))
    if getattr(m, "bias", None) is not None:
        m.bias = nn.Parameter(torch.empty(o, dtype=m.bias.dtype))
    if transposed:
        m.nx, m.nf = i, o
    else:
        m.out_features, m.in_features = o, i


def resize_layers(model: nn.Module, per_layer: list[dict[str, int]]) -> None:
    """Shape every decoder layer's projections for ``per_layer`` widths (weights uninitialised;
    the caller loads them), then sync attributes and config."""
    fam = family_of(model)
    a, p, t = fam.attention, fam.mlp, fam.transposed
    for layer, w in zip(layers_of(model, fam), per_layer):
        hd = head_dim_of(layer, fam)
        nh, nkv, inter = w["num_attention_heads"], w["num_key_value_heads"], w["intermediate_size"]
        shapes: list[tuple[str, int | None, int | None]] = [(a.o, None, nh * hd)]
        if a.qkv:
            shapes.append((a.qkv, (nh + 2 * nkv) * hd, None))
        else:
            shapes += [(a.q, nh * hd, None), (a.k, nkv * hd, None), (a.v, nkv * hd, None)]
        if p.gate_up:
            shapes.append((p.gate_up, 2 * inter, None))
        else:
            shapes += [(x, inter, None) for x in (p.gate, p.up) if x]
        shapes.append((p.down, None, inter))
        for path, o, i in shapes:
            _reshape(layer.get_submodule(path), o, i, t)
