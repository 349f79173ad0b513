"""netfold.fold: cluster similar channels, merge them, repair the statistics, in place.

The whole plan (groups, widths, clusterings, new tensors) is computed and validated before the
model is touched; the write itself is rolled back if anything fails after it started.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn as nn

from .config import FoldConfig
from .fold.checks import (  # noqa: F401 - kept importable from netfold.api
    check_data,
    check_finite,
    check_materialised,
    check_patterns,
)
from .fold.plan import (  # noqa: F401 - the planner's public names, kept importable here
    group_ratio,
    params_after,
    plan_widths,
    width_for,
)
from .fold.repairs import get_repair, repair_names
from .fold.run import run
from .graph.groups import ChannelGroup
from .report import Report


def _fold_decoder(model: nn.Module, config: FoldConfig, **kw) -> Report:
    from .families.llama import fold_decoder

    return fold_decoder(model, config, **kw)


def _fold_encoder(
    model: nn.Module,
    config: FoldConfig,
    *,
    data=None,
    widths: dict[str, int] | None = None,
    groups: list[ChannelGroup] | None = None,
    progress: bool = False,
) -> Report:
    from .families.encoders import fold_encoder

    if data is not None:
        raise ValueError(
            f"data= is not used when folding encoders ({type(model).__name__}): their repair "
            "is data-free ('ar' or 'none'); drop data="
        )
    if widths is not None:
        raise ValueError("widths= is supported for decoder LLMs only; use ratios= patterns")
    return fold_encoder(model, config, groups=groups, progress=progress)


def hf_families() -> dict[str, object]:
    """Hugging Face ``model_type`` -> fold function, from the family table
    (:mod:`netfold.families.table`: one row per decoder family, plus the encoder types)."""
    from .families.table import DECODERS, ENCODER_MODEL_TYPES

    return {
        **{t: _fold_decoder for f in DECODERS for t in f.model_types},
        **{t: _fold_encoder for t in ENCODER_MODEL_TYPES},
    }


def model_family(model: nn.Module):
    """The fold function for a Hugging Face ``model`` (None for models the tracer handles).

    Raises:
        ValueError: a Hugging Face model whose ``config.model_type`` no family supports.
    """
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(mt, str):
        return None
    families = hf_families()
    if mt not in families:
        raise ValueError(
            f"unsupported architecture {type(model).__name__} (Hugging Face model_type={mt!r}); "
            f"netfold folds model types {sorted(families)}"
        )
    return families[mt]


def fold(
    model: nn.Module,
    config: FoldConfig | None = None,
    *,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    data=None,
    synthetic: torch.Tensor | None = None,
    groups: list[ChannelGroup] | None = None,
    progress: bool = False,
    widths: dict[str, int] | None = None,
) -> Report:
    """Fold ``model`` in place: cluster each channel group, merge, repair.

    Hugging Face models are dispatched on ``config.model_type`` through the family table
    (:mod:`netfold.families.table`): decoders (Llama, Mistral, Qwen2/3, Gemma/2/3, Phi-3,
    GPT-2, OPT) to :func:`netfold.fold.decoder.fold_decoder` (MLP channels and whole attention
    heads), encoders (BERT, RoBERTa, DistilBERT, ViT) to
    :func:`netfold.families.encoders.fold_encoder`.
    Any other model is traced with torch.fx.

    Args:
        model: a CNN / MLP (traced with torch.fx) in eval or train mode; its mode is kept.
        config: what to fold and how (default ``FoldConfig()``: ratio 0.5, k-means, repair
            "auto": the measured best data-free repair for the model, see
            :mod:`netfold.fold.auto`).
        example_inputs: an input batch, e.g. (N, C, H, W), for tracing and FLOP counts;
            inferred from the first layer when None.
        data: calibration inputs for ``repair="data"``: a Tensor (N, ...) of the model's input
            shape and dtype, a list of Tensors or (x, y) pairs, or a DataLoader (at most 1024
            samples are used). Refused with any other repair (it would be ignored). Decoder
            LLMs: token ids (n, seqlen), see :func:`netfold.families.llama.fold_decoder`.
        synthetic: an already synthesised Deep-Inversion batch for ``repair="dir"`` (synthesis
            depends only on the original model, so sweeps can reuse one batch; other repairs
            ignore it, which lets a sweep pass the same arguments to every run).
        groups: precomputed channel groups (from :func:`netfold.graph.find_groups` on this same
            model), to skip tracing.
        progress: show progress bars.
        widths: decoder LLMs only: explicit widths ``{group name: channels or query heads}``.

    Returns:
        A :class:`Report` (parameters, FLOPs, widths per group, skipped groups, time).

    Raises:
        TypeError: config / model / example_inputs of the wrong type, or a model torch.fx
            cannot trace.
        ValueError: weights on the meta device or NaN/inf; missing ``data`` for
            repair="data", or ``data`` a repair would ignore; empty / non-finite ``data`` or
            ``data`` of another shape or dtype than the model's inputs; a ``ratios`` / ``skip``
            pattern that matches no group; an unsupported Hugging Face model type; an
            unreachable target. All raised before the model changes.
    """
    t0 = time.perf_counter()
    if config is None:
        config = FoldConfig()
    if not isinstance(config, FoldConfig):
        raise TypeError(f"config must be a netfold.FoldConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_materialised(model)
    repair = get_repair(config.repair)
    family = model_family(model)
    if family is not None and not repair.families:
        raise ValueError(
            f"repair={config.repair!r} supports traced CNNs / MLPs, not {type(model).__name__}; "
            f"use one of {[r for r in repair_names() if get_repair(r).families]}"
        )
    if family is not None:
        return family(model, config, data=data, widths=widths, groups=groups, progress=progress)
    if widths is not None:
        raise ValueError("widths= is supported for decoder LLMs only; use ratios= patterns")
    return run(
        model,
        config,
        example_inputs=example_inputs,
        data=data,
        synthetic=synthetic,
        groups=groups,
        progress=progress,
        t0=t0,
    )
