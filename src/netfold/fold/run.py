"""The fold pipeline: validate -> plan widths -> features -> cluster -> merge -> write
(snapshot / rollback) -> repair -> Report.

:func:`run` folds any model whose channel groups are given (or traced): traced CNNs / MLPs,
and encoders, whose family hands over its groups and :class:`FamilyHooks` (the module
attributes that follow the folded widths, the config fields to sync). :func:`write` is the
write step every fold shares (traced models, encoders, decoders): new tensors go in under a
snapshot, the repair and the checks run, and any failure puts every touched tensor, attribute
and config back. The pipeline never imports a model family: Hugging Face models reach it
through :mod:`netfold.api` and :mod:`netfold.families`, which hand over groups and hooks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..config import PRUNE_METHODS, FoldConfig
from ..eval.cost import count_flops, count_params
from ..graph.edits import EDITS_ATTR, get_edits, set_attributes
from ..graph.groups import ChannelGroup
from ..graph.surgery import Snapshot, apply_tensors, get_module
from ..graph.trace import find_groups, infer_example_inputs
from ..report import Report
from . import auto
from .checks import check_data, check_finite, check_patterns
from .merge import ColumnShifts, TensorState, merge_group
from .methods import GroupPlan, plan_group
from .plan import plan_widths
from .repairs import RepairContext, get_repair, repair_names

#: {module name: {attribute: value}}: plain int attributes a fold sets after the write.
Attributes = dict[str, dict[str, int]]


@dataclass(frozen=True)
class FamilyHooks:
    """What a model family adds to :func:`run` (supplied by :mod:`netfold.families`).

    Attributes:
        name: the family, for messages ("encoders").
        attributes: ``(model, folded groups, widths) -> Attributes``: the attributes that
            follow the new widths (attention head counts); set after the write, recorded as
            structural edits, restored with everything else on failure.
        sync: ``(model, groups, widths) -> None``: runs once the fold succeeded (config fields,
            the architecture spec a save needs).
    """

    name: str
    attributes: Callable[[nn.Module, list[ChannelGroup], dict[str, int]], Attributes]
    sync: Callable[[nn.Module, list[ChannelGroup], dict[str, int]], None]


class AttrSnapshot:
    """Plain attributes of some modules and the model's recorded edits, for rollback."""

    def __init__(self, model: nn.Module, attrs: Attributes) -> None:
        self.model = model
        self.edits = get_edits(model)
        self.saved = {
            n: {a: getattr(get_module(model, n), a) for a in names} for n, names in attrs.items()
        }

    def restore(self) -> None:
        for n, saved in self.saved.items():
            m = get_module(self.model, n)
            for a, v in saved.items():
                setattr(m, a, v)
        setattr(self.model, EDITS_ATTR, self.edits)


def write(
    model: nn.Module,
    state: TensorState,
    touched: Sequence[str],
    *,
    then: Callable[[], Any] | None = None,
    restore: Sequence[Any] = (),
) -> Any:
    """Write ``state`` into ``model`` under a snapshot, run ``then`` and the finiteness check.

    Args:
        state: ``{module: {tensor: value}}``.
        touched: every module whose tensors or width attributes may change (snapshotted).
        then: runs after the write (repair, attribute / config sync, report); its result is
            returned.
        restore: further snapshots (objects with ``restore()``: attributes, config) put back
            on failure.

    Raises:
        Whatever the write, ``then`` or the check raised, after restoring everything.
    """
    snap = Snapshot(model, list(touched))
    try:
        apply_tensors(model, state)
        out = then() if then is not None else None
        check_finite(model)
        return out
    except BaseException:
        snap.restore()
        for s in restore:
            s.restore()
        raise


def run(
    model: nn.Module,
    config: FoldConfig,
    *,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    data: Any = None,
    synthetic: torch.Tensor | None = None,
    groups: list[ChannelGroup] | None = None,
    progress: bool = False,
    t0: float | None = None,
    family: FamilyHooks | None = None,
) -> Report:
    """Fold a traced model (CNN / MLP / timm-style) or a family's groups in place; see
    :func:`netfold.fold`.

    The repair is the registry entry ``config.repair`` (:mod:`netfold.fold.repairs`): what it
    needs is checked first, its ``prepare`` runs on the original model, its ``apply`` after
    the write under the snapshot. Groups with ``head_size`` > 1 fold whole heads, merged
    plainly (the AR rescaling is per channel). "auto" repair / allocation are resolved first
    (:func:`netfold.fold.auto.resolve`); when "auto" chose ``repair="stats"`` and the moment
    propagation does not support one of the model's operations, the fold runs with
    :data:`~netfold.fold.auto.STATS_FALLBACK` instead and the Report warns.

    With ``family`` (encoders): ``groups`` are required, nothing is traced and FLOPs are not
    measured, the repair must be data-free, and the family's attributes and config follow.
    """
    t0 = time.perf_counter() if t0 is None else t0
    if not isinstance(config, FoldConfig):
        raise TypeError(f"config must be a netfold.FoldConfig, got {type(config).__name__}")
    chose = config.repair == "auto"
    kind = "encoder" if family is not None else "traced"
    config, why = auto.resolve(model, config, kind, has_data=data is not None)
    kw = dict(
        example_inputs=example_inputs, data=data, synthetic=synthetic, groups=groups, family=family
    )
    try:
        report = _run(model, config, progress=progress, auto_stats=chose, **kw)
    except _StatsUnsupported as e:
        config = dataclasses.replace(config, repair=auto.STATS_FALLBACK)
        why = f"{why}; stats unsupported here, fell back to {auto.STATS_FALLBACK!r}"
        report = _run(model, config, progress=progress, **kw)
        report.warnings.append(
            f"repair='auto' chose 'stats', which cannot propagate through this model ({e}); "
            f"used repair={auto.STATS_FALLBACK!r} instead"
        )
    auto.record(report, config, why)
    report.seconds = time.perf_counter() - t0
    return report


class _StatsUnsupported(Exception):
    """repair="stats", chosen by "auto", cannot handle the model (before anything changed)."""


def _run(
    model: nn.Module,
    config: FoldConfig,
    *,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None,
    data: Any,
    synthetic: torch.Tensor | None,
    groups: list[ChannelGroup] | None,
    progress: bool,
    family: FamilyHooks | None = None,
    auto_stats: bool = False,
) -> Report:
    """:func:`run` with a concrete config (no "auto")."""
    repair = get_repair(config.repair)
    if family is not None and (repair.needs != "nothing" or not repair.families):
        ok = [
            r for r in repair_names() if get_repair(r).needs == "nothing" and get_repair(r).families
        ]
        raise ValueError(f"folding {family.name} supports repair {ok}, not {config.repair!r}")
    if family is not None and groups is None:
        raise ValueError(f"folding {family.name} needs the family's groups")
    check_finite(model)
    if repair.needs == "data" and data is None:
        raise ValueError(
            f"repair={config.repair!r} needs calibration inputs: pass data=... "
            "(a Tensor, batches or a DataLoader)"
        )
    if data is not None and repair.needs != "data":
        why = "synthesises its own inputs" if repair.needs == "synthetic" else "is data-free"
        raise ValueError(
            f"data= is only used by repair='data'; repair={config.repair!r} {why} and would "
            "ignore it (pass repair='data' to calibrate on it, or drop data=)"
        )
    if repair.requires_batchnorm and not auto.has_batchnorm(model):
        raise ValueError(
            f"repair={config.repair!r} needs BatchNorm layers (Deep Inversion matches their "
            "statistics)"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if example_inputs is not None:
        example_inputs = tuple(example_inputs)
        if not example_inputs or not all(isinstance(t, torch.Tensor) for t in example_inputs):
            raise TypeError("example_inputs must be a Tensor or a non-empty sequence of Tensors")
    calib = check_data(model, data, example_inputs) if data is not None else None
    if example_inputs is None and family is None:
        # Calibration data already showed which shape the model runs on; no need to guess.
        example_inputs = (calib[:2],) if calib is not None else infer_example_inputs(model)
    if groups is None:
        groups = find_groups(model, example_inputs)
    check_patterns(groups, config)
    mode = repair.features
    widths = plan_widths(model, groups, config, mode=mode, progress=progress)
    params_before = count_params(model)
    # FLOPs are reported per input sample (not measured for a family's groups: no inputs)
    one = tuple(t[:1] for t in example_inputs) if example_inputs is not None else None
    flops_before = count_flops(model, one) if one is not None else None

    todo = [g for g in groups if g.foldable and widths.get(g.name, g.size) < g.size]
    state: TensorState = {}
    plans: dict[str, GroupPlan] = {}
    for g in tqdm(todo, desc="clustering", disable=not progress, leave=False):
        plans[g.name] = plan_group(model, g, widths[g.name], config, _mode(g, mode))
    shifts: ColumnShifts = {}  # consumers of torch.cat read several groups side by side
    for g in todo:
        pl = plans[g.name]
        merge_group(state, model, g, pl.labels, pl.k, _mode(g, mode), pl.rule, shifts=shifts)

    # Everything that needs the ORIGINAL model happens before the write.
    ctx = RepairContext(
        model=model,
        config=config,
        todo=todo,
        plans=plans,
        state=state,
        example_inputs=example_inputs,
        batch=calib,
        synthetic=synthetic,
        progress=progress,
    )
    if todo and repair.prepare is not None:
        try:
            repair.prepare(ctx)
        except ValueError as e:
            if auto_stats and config.repair == "stats":
                raise _StatsUnsupported(str(e)) from e
            raise

    touched = sorted(
        ctx.state.keys()
        | {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    )
    attrs = family.attributes(model, todo, widths) if family is not None else {}
    restore = [AttrSnapshot(model, {n: list(a) for n, a in attrs.items()})] if attrs else []

    def then() -> Report:
        for name, a in attrs.items():
            set_attributes(model, name, a)
        if todo and repair.apply is not None:
            repair.apply(ctx)
        check_finite(model)
        report = Report(
            operation="prune" if config.method in PRUNE_METHODS else "fold",
            params_before=params_before,
            params_after=count_params(model),
            flops_before=flops_before,
            flops_after=count_flops(model, one) if todo and one is not None else flops_before,
            config=config.to_dict(),
        )
        report.add_groups(
            groups,
            widths,
            {n: p.cost for n, p in plans.items()},
            {n: p.labels for n, p in plans.items()},
        )
        return report

    # Everything from the first write on runs under the snapshot: a failure in the write, the
    # repair, the checks or the report puts every touched tensor and attribute back.
    report = write(model, ctx.state, touched, then=then, restore=restore)
    if family is not None:
        family.sync(model, groups, widths)
    return report


def _mode(g: ChannelGroup, mode: str) -> str:
    """Feature / merge mode of a group: whole heads merge plainly ("naive")."""
    return "naive" if g.head_size > 1 else mode
