"""The repair registry: every statistics repair is one registered entry, declaring what it needs.

``FoldConfig.repair`` names an entry; the fold pipeline asks the entry, never the name, what to
do: which inputs it needs ("nothing", "synthetic" inputs it makes itself, or calibration
"data"), which clustering features go with it, whether Hugging Face families support it, and
two steps:

- ``prepare(ctx)``: before the write, on the ORIGINAL model (statistics it must measure
  before the tensors change, or new tensors added to ``ctx.state``);
- ``apply(ctx)``: after the write, under the pipeline's snapshot (a failure rolls back).

Adding a repair is one module that calls :func:`register` at import, plus its import line at
the end of this file. Decoder LLMs read the same entry (``needs``: token ids for "data",
self-generated text for "synthetic"); their fine knobs (``LLMConfig.correction`` for "ar",
``LLMConfig.refit`` for "data" / "dir") are that repair's options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..config import FoldConfig, add_repair_name
from .deep_inversion import synthesize
from .merge import TensorState, merge_matrices
from .repair import producer_stats, repair_with_batch

NEEDS = ("nothing", "synthetic", "data")


@dataclass
class RepairContext:
    """What a repair step sees.

    Attributes:
        model: the model being folded (original during ``prepare``, folded during ``apply``).
        config: the FoldConfig.
        todo: the groups that shrink.
        plans: group name -> its :class:`~netfold.fold.methods.GroupPlan` (labels, k, rule).
        state: new tensors ``{module: {tensor: value}}``; ``prepare`` may add to it.
        example_inputs: the model's example inputs (shapes).
        batch: calibration inputs (N, ...) for needs="data"; a repair that needs "synthetic"
            inputs sets it (or uses ``synthetic`` when the caller passed one).
        synthetic: an already synthesised batch from the caller, or None.
        progress: show progress bars.
        extra: repair-specific values carried from ``prepare`` to ``apply``.
    """

    model: nn.Module
    config: FoldConfig
    todo: list
    plans: dict[str, Any]
    state: TensorState
    example_inputs: tuple[torch.Tensor, ...] | None = None
    batch: torch.Tensor | None = None
    synthetic: torch.Tensor | None = None
    progress: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Repair:
    """One registered repair.

    Attributes:
        name: the value of ``FoldConfig.repair``.
        needs: "nothing", "synthetic" (it makes its own inputs) or "data" (calibration inputs).
        summary: one line for docs and errors.
        features: clustering / merge mode for traced groups: "ar" (BatchNorm-aware rescaling,
            Fold-AR) or "naive".
        prepare / apply: the steps (see the module docstring); None: nothing to do.
        requires_batchnorm: the model must have BatchNorm layers (Deep Inversion matches them).
        families: also valid for Hugging Face families (decoders / encoders).
    """

    name: str
    needs: str
    summary: str
    features: str = "naive"
    prepare: Callable[[RepairContext], None] | None = None
    apply: Callable[[RepairContext], None] | None = None
    requires_batchnorm: bool = False
    families: bool = True


_REGISTRY: dict[str, Repair] = {}


def register(repair: Repair) -> Repair:
    """Add ``repair`` to the registry (and to the names FoldConfig accepts)."""
    if repair.needs not in NEEDS:
        raise ValueError(f"repair {repair.name!r}: needs must be one of {NEEDS}")
    if repair.features not in ("ar", "naive"):
        raise ValueError(f"repair {repair.name!r}: features must be 'ar' or 'naive'")
    _REGISTRY[repair.name] = repair
    add_repair_name(repair.name)
    return repair


def get_repair(name: str) -> Repair:
    """The registered repair ``name``; ValueError naming the registered ones."""
    r = _REGISTRY.get(name)
    if r is None:
        raise ValueError(f"unknown repair {name!r}; choose from {tuple(_REGISTRY)}")
    return r


def repair_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


# ------------------------------------------------------------------------- built-in repairs
def _batch_targets(ctx: RepairContext) -> None:
    """REPAIR's targets: each merged producer channel's mean / std is the mean of its members'
    (measured on the original model with ``ctx.batch``), for producers without BatchNorm."""
    free = [(g, p) for g in ctx.todo for p in g.producers if p not in g.bn_of]
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if free:
        stats = producer_stats(ctx.model, [p for _, p in free], ctx.batch)
        for g, p in free:
            pl = ctx.plans[g.name]
            A = merge_matrices(pl.labels, pl.k, pl.rule, torch.float64)[1]
            mu, sd = stats[p]
            targets[p] = (A @ mu, A @ sd)
    ctx.extra["targets"] = targets


def _synthesize_then_targets(ctx: RepairContext) -> None:
    if ctx.synthetic is not None:
        ctx.batch = ctx.synthetic
    else:
        ctx.batch = synthesize(
            ctx.model,
            tuple(ctx.example_inputs[0].shape[1:]),
            ctx.config.deep_inversion,
            progress=ctx.progress,
        )
    _batch_targets(ctx)


def _repair_with_batch(ctx: RepairContext) -> None:
    repair_with_batch(ctx.model, ctx.batch, ctx.extra.get("targets", {}), reset_bn=True)


register(
    Repair(
        "auto",
        "nothing",
        "the measured best data-free repair for the model, resolved before planning "
        "(netfold.fold.auto)",
    )
)
register(Repair("none", "nothing", "Fold-naive: merged tensors only"))
register(
    Repair(
        "ar",
        "nothing",
        "approximate REPAIR (data-free): BatchNorm-aware rescaling of merged channels; "
        "decoders: LLMConfig.correction",
        features="ar",
    )
)
register(
    Repair(
        "dir",
        "synthetic",
        "Deep-Inversion REPAIR: BatchNorm statistics re-estimated on synthesised inputs; "
        "decoders: refit on self-generated text (LLMConfig.refit)",
        prepare=_synthesize_then_targets,
        apply=_repair_with_batch,
        requires_batchnorm=True,
    )
)
register(
    Repair(
        "data",
        "data",
        "REPAIR on calibration inputs (BatchNorm re-estimation, per-channel affine fix); "
        "decoders: refit on calibration token ids (LLMConfig.refit)",
        prepare=_batch_targets,
        apply=_repair_with_batch,
    )
)

# Repair modules that register themselves (one import line each):
from . import stats_repair  # noqa: E402, F401 - registers repair='stats'
