"""Encoders (Hugging Face BERT and ViT, timm-style blocks): channel groups, as data.

Per transformer layer two kinds of :class:`~netfold.graph.groups.ChannelGroup`:

- the MLP's intermediate channels: producer ``intermediate.dense`` (``fc1``), consumer
  ``output.dense`` (``fc2``), plus a per-channel PReLU left by LayerCollapse's prepare;
- the attention heads: producers query, key and value, consumer the output projection,
  ``head_size`` = the head dimension, so whole heads move together.

The hidden size (residual stream) is never folded. Layouts are tables of module paths relative
to a layer (:data:`netfold.families.table.ATTENTION_LAYOUTS` / ``MLP_LAYOUTS``), found by scanning module names, so
any model that nests these blocks (``BertModel``, ``BertForSequenceClassification``,
``ViTForImageClassification``, sentence-transformers' BERT) is covered without importing its
classes. :func:`fold_encoder` hands these groups and the family's hooks (head-count attributes,
config sync) to the one fold pipeline, :func:`netfold.fold.run.run`.

Folded and collapsed encoders save with :func:`netfold.save` / reload with :func:`netfold.load`:
:func:`mark_hf` records how to rebuild the model from its config, and the folded head counts
are recorded as structural edits. ``config.intermediate_size`` is updated when every layer
keeps the same MLP width; ``config.num_attention_heads`` is left alone (BERT derives the head
size from it), the per-layer head counts live on the attention modules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ..config import FoldConfig
from ..fold.run import FamilyHooks, run
from ..graph.groups import ChannelGroup, Consumer
from ..report import Report
from .table import (  # noqa: F401 - the layouts are table data, named here too
    ATTENTION_LAYOUTS,
    ENCODER_MODEL_TYPES,
    HEAD_COUNT_ATTRS,
    HEAD_WIDTH_ATTRS,
    MLP_LAYOUTS,
)

__all__ = [
    "ATTENTION_LAYOUTS",
    "MLP_LAYOUTS",
    "SUPPORTED_MODEL_TYPES",
    "AttentionBlock",
    "encoder_groups",
    "find_attention",
    "fold_encoder",
    "mark_hf",
]

#: Hugging Face ``config.model_type`` values :func:`netfold.fold` sends to :func:`fold_encoder`
#: (the family table's encoder types; each covered by a tiny-config test in tests/test_errors.py).
SUPPORTED_MODEL_TYPES = ENCODER_MODEL_TYPES


@dataclass(frozen=True)
class AttentionBlock:
    """One multi-head attention: module names and its current shape."""

    attn: str
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    head_dim: int


def _get(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def find_attention(model: nn.Module) -> list[AttentionBlock]:
    """Every multi-head attention of ``model`` matching :data:`ATTENTION_LAYOUTS`, in order."""
    out: dict[str, AttentionBlock] = {}
    for prefix, m in model.named_modules():
        for lay in ATTENTION_LAYOUTS:
            attn = _get(m, lay.attn)
            lins = [_get(m, n) for n in (lay.q, lay.k, lay.v, lay.o)]
            if attn is None or not all(isinstance(x, nn.Linear) for x in lins):
                continue
            hd = getattr(attn, lay.head_dim_attr, None)
            if not isinstance(hd, int) or hd < 1:
                continue
            q, k, v, o = lins
            width = q.out_features
            if k.out_features != width or v.out_features != width or o.in_features != width:
                continue  # grouped-query attention or a cross-attention: not this layout
            name = _join(prefix, lay.attn)
            out.setdefault(
                name,
                AttentionBlock(
                    name,
                    *(_join(prefix, n) for n in (lay.q, lay.k, lay.v, lay.o)),
                    num_heads=width // hd,
                    head_dim=hd,
                ),
            )
    return list(out.values())


def _mlp_groups(model: nn.Module) -> list[ChannelGroup]:
    groups: dict[str, ChannelGroup] = {}
    for prefix, m in model.named_modules():
        for first, act, second, between in MLP_LAYOUTS:
            f, a, s = (_get(m, p) for p in (first, act, second))
            if not (isinstance(f, nn.Linear) and isinstance(s, nn.Linear) and a is not None):
                continue
            if f.out_features != s.in_features:
                continue
            name = _join(prefix, first)
            g = ChannelGroup(name=name, size=f.out_features, producers=[name])
            if isinstance(a, nn.PReLU) and a.num_parameters == f.out_features:
                g.channel_ops.append(_join(prefix, act))
            for b in between:
                mb = _get(m, b)
                if mb is not None and not isinstance(mb, (nn.Dropout, nn.Identity)):
                    g.frozen_reasons.append(f"{type(mb).__name__} between the MLP's Linears")
            g.consumers.append(Consumer(_join(prefix, second)))
            groups.setdefault(name, g)
    return list(groups.values())


def encoder_groups(model: nn.Module) -> list[ChannelGroup]:
    """Channel groups of an encoder: MLP intermediate channels and whole attention heads.

    Args:
        model: a Hugging Face BERT / ViT model (any head) or a module of timm-style blocks.

    Returns:
        MLP groups (``head_size`` 1) and head groups (named after the attention module,
        ``head_size`` = head dimension, ``size`` = heads x head dimension), layer by layer.

    Raises:
        ValueError: nothing of either kind was found.
    """
    groups = _mlp_groups(model)
    for a in find_attention(model):
        groups.append(
            ChannelGroup(
                name=a.attn,
                size=a.num_heads * a.head_dim,
                producers=[a.q, a.k, a.v],
                consumers=[Consumer(a.o)],
                head_size=a.head_dim,
            )
        )
    if not groups:
        raise ValueError(
            f"{type(model).__name__}: no BERT/ViT-style MLP or attention block found "
            "(see netfold.families.table.MLP_LAYOUTS / ATTENTION_LAYOUTS)"
        )
    return groups


def mark_hf(model: nn.Module) -> nn.Module:
    """Record ``model``'s Hugging Face class and config so :func:`netfold.save` can save it.

    The spec names :data:`netfold.registry.HF_ENCODER`, built by
    :func:`netfold.hub.build_hf_encoder` on load.

    A no-op for models that already carry an architecture spec or have no HF config.
    """
    from ..io import ARCH_ATTR, set_arch
    from ..registry import HF_ENCODER

    cfg = getattr(model, "config", None)
    if getattr(model, ARCH_ATTR, None) is not None or not hasattr(cfg, "to_json_string"):
        return model
    d = json.loads(cfg.to_json_string(use_diff=False))
    d.pop("transformers_version", None)
    d.pop("architectures", None)
    return set_arch(
        model,
        HF_ENCODER,
        {"model_class": type(model).__name__, "config": d},
    )


def head_attributes(
    model: nn.Module, groups: list[ChannelGroup], widths: dict[str, int]
) -> dict[str, dict[str, int]]:
    """The attention attributes that follow folded head groups: head counts
    (:data:`HEAD_COUNT_ATTRS`) and widths (:data:`HEAD_WIDTH_ATTRS`) the module has."""
    out: dict[str, dict[str, int]] = {}
    for g in groups:
        if g.head_size > 1:
            m = model.get_submodule(g.name)
            k = widths[g.name]
            attrs = {a: k // g.head_size for a in HEAD_COUNT_ATTRS if hasattr(m, a)}
            attrs.update({a: k for a in HEAD_WIDTH_ATTRS if hasattr(m, a)})
            out[g.name] = attrs
    return out


def sync_config(model: nn.Module, groups: list[ChannelGroup], widths: dict[str, int]) -> None:
    """After a fold: ``config.intermediate_size`` when every MLP keeps one width, and the
    architecture spec :func:`netfold.save` needs (:func:`mark_hf`)."""
    cfg = getattr(model, "config", None)
    mlp = [g for g in groups if g.head_size == 1]
    mlp_widths = {widths.get(g.name, g.size) for g in mlp}
    if cfg is not None and hasattr(cfg, "intermediate_size") and len(mlp_widths) == 1:
        cfg.intermediate_size = mlp_widths.pop()
    mark_hf(model)


def fold_encoder(
    model: nn.Module,
    config: Any = None,
    *,
    groups: list[ChannelGroup] | None = None,
    heads: bool = True,
    mlp: bool = True,
    progress: bool = False,
) -> Report:
    """Fold an encoder's MLP channels and whole attention heads in place, through the fold
    pipeline (:func:`netfold.fold.run.run`) with this family's groups and hooks.

    Same contract as :func:`netfold.fold` (plan and validate first, write with rollback),
    with ``config.ratio`` / ``ratios`` / ``target_sparsity`` / ``skip`` applied to
    :func:`encoder_groups`. Heads are clustered as whole heads (features: the head's q/k/v
    rows and o columns) and merged with the plain rule (mean q/k/v rows, summed o columns): a
    model with duplicated heads folds exactly. MLP groups use ``config.repair`` "ar" or
    "none"; "dir" and "data" are not supported for encoders.

    Args:
        model: a Hugging Face BERT / ViT model (or timm-style blocks).
        config: a :class:`netfold.FoldConfig` (default ratio 0.5, repair "ar").
        groups: precomputed :func:`encoder_groups`.
        heads / mlp: which kinds of group to fold.
        progress: progress bar over groups.

    Returns:
        A Report (operation "fold") with one GroupReport per folded group.

    Raises:
        ValueError: unsupported repair, weights on meta or NaN/inf, nothing to fold, a
            ``ratios`` / ``skip`` pattern that matches no group.
    """
    config = config if config is not None else FoldConfig()
    groups = groups if groups is not None else encoder_groups(model)
    groups = [g for g in groups if (heads and g.head_size > 1) or (mlp and g.head_size == 1)]
    if not groups:
        raise ValueError("nothing to fold: no groups of the requested kinds")
    return run(model, config, groups=groups, progress=progress, family=ENCODERS)


#: What the fold pipeline needs from the encoder family.
ENCODERS = FamilyHooks("encoders", attributes=head_attributes, sync=sync_config)
