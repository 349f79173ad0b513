"""netfold.fuse: plan -> apply -> verify -> roll back, round by round, with a decision log."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

import torch
from torch import nn

from netfold.eval.cost import count_flops, count_params
from netfold.fuse.config import FuseConfig
from netfold.fuse.plan import Fusion, Rejection, plan_dropout_removal, plan_fusions
from netfold.fuse.record import call_model, record_forward
from netfold.fuse.verify import (
    Equivalence,
    compare_outputs,
    flat_outputs,
    require_finite,
    run_float64,
)
from netfold.graph.edits import record_swaps
from netfold.report import Report

CL = torch.channels_last

__all__ = ["fuse", "format_decision_log"]


@dataclass
class _Applied:
    fusion: Fusion
    journal: list[tuple[nn.Module, str, nn.Module]]  # (parent, attribute, old module)
    params_delta: int


def _paths(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute) under which it is registered."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None:
                out.setdefault(id(child), []).append((parent, attr))
    return out


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _swap_in(model: nn.Module, fusion: Fusion) -> _Applied:
    """Build the new modules (pure), then swap them in; on any error nothing stays changed."""
    replacements = fusion.build(model.get_submodule)
    paths = _paths(model)
    journal: list[tuple[nn.Module, str, nn.Module]] = []
    delta = 0
    try:
        for name, new in replacements:
            old = model.get_submodule(name)
            delta += _n_params(new) - _n_params(old)
            for parent, attr in paths.get(id(old), []):
                setattr(parent, attr, new)
                journal.append((parent, attr, old))
    except BaseException:
        _rollback(journal)
        raise
    return _Applied(fusion, journal, delta)


def _rollback(journal: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, attr, old in reversed(journal):
        setattr(parent, attr, old)


def _is_float64(model: nn.Module) -> bool:
    return {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float64}


class _Checker:
    """Compares the model with reference outputs computed before any change.

    Two checks: the model as it is (its own dtype, ``rtol``/``atol``) and a float64 twin that
    receives the same rewrites computed from float64 weights (``rtol_float64``/``atol_float64``).
    The first bounds what the user gets; the second proves each rewrite exact up to float64
    rounding, which the working dtype cannot show: a fused float32 weight ``s * W`` is itself
    rounded to float32.
    """

    def __init__(self, model: nn.Module, inputs: Any, config: FuseConfig, report: Report) -> None:
        self.model, self.inputs, self.config = model, inputs, config
        self.already64 = _is_float64(model)
        with torch.no_grad():
            self.ref = flat_outputs(call_model(model, inputs))
        require_finite(self.ref, "fuse")  # NaN == NaN would "verify" any rewrite
        self.twin: nn.Module | None = None
        self.ref64: list[torch.Tensor] | None = None
        if config.float64 and not self.already64:
            try:
                self.twin = copy.deepcopy(model).to(torch.float64).eval()
                self.ref64 = run_float64(self.twin, inputs)
            except Exception as e:  # noqa: BLE001 - any failure just disables the float64 check
                self.twin = self.ref64 = None
                report.warnings.append(
                    f"float64 verification unavailable ({type(e).__name__}: {e})"
                )

    def check(self, float64: bool = True) -> tuple[Equivalence, Equivalence | None]:
        """Compare now; ``float64=False`` skips the twin (for changes it does not receive)."""
        c = self.config
        with torch.no_grad():
            out = flat_outputs(call_model(self.model, self.inputs))
        if self.already64:
            return compare_outputs(self.ref, out, rtol=c.rtol_float64, atol=c.atol_float64), None
        e = compare_outputs(self.ref, out, rtol=c.rtol, atol=c.atol)
        e64 = None
        if float64 and self.twin is not None:
            out64 = run_float64(self.twin, self.inputs)
            e64 = compare_outputs(self.ref64, out64, rtol=c.rtol_float64, atol=c.atol_float64)
        return e, e64


class _Pair:
    """A fusion applied to the model and (when verifying in float64) to its float64 twin."""

    def __init__(self, main: _Applied, twin: _Applied | None) -> None:
        self.main, self.twin = main, twin
        self.fusion = main.fusion
        self.params_delta = main.params_delta

    def undo(self) -> None:
        if self.twin is not None:
            _rollback(self.twin.journal)
        _rollback(self.main.journal)


def _entry(f: Fusion | Rejection, status: str, reason: str = "", **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"kind": f.kind, "modules": list(f.modules), "status": status}
    if isinstance(f, Fusion) and f.detail:
        d["detail"] = f.detail
    if reason:
        d["reason"] = reason
    d.update(extra)
    return d


def _why(e: Equivalence, e64: Equivalence | None) -> str:
    parts = []
    if not e.ok:
        parts.append(f"working dtype: {e.reason}")
    if e64 is not None and not e64.ok:
        parts.append(f"float64: {e64.reason}")
    return "; ".join(parts)


def fuse(
    model: nn.Module,
    config: FuseConfig | None = None,
    *,
    example_inputs: Any,
) -> Report:
    """Fuse consecutive operations of ``model`` exactly, in place, for inference (eval mode).

    Each round records one forward pass on ``example_inputs`` (hooks + a TorchFunctionMode, so
    models torch.fx cannot trace work too), plans independent fusions from the recording,
    applies them, and verifies the whole model against outputs computed before any change. If
    the check fails, the round's fusions are rolled back and re-applied one at a time, keeping
    only those that pass; the rest are logged as "rolled_back". An exception at any point puts
    every module back as it was and is re-raised.

    Args:
        model: any ``nn.Module`` (torchvision, plain PyTorch, Hugging Face ...). Set to eval.
        config: which fusions and tolerances; ``FuseConfig()`` if None.
        example_inputs: a Tensor ``(N, ...)``, a tuple of positional args, or a dict of keyword
            args (e.g. ``{"input_ids": ids}``). They decide which dataflow is proven, so they
            should exercise the path used at inference.

    Returns:
        A :class:`~netfold.report.Report` with ``operation="fuse"``; ``log`` holds one entry per
        decision (status "applied", "rejected" or "rolled_back", with the reason), ``skipped``
        the rejected/rolled-back candidates, and ``extra`` the measured errors
        (``max_abs_err``, ``max_rel_err`` in the model's dtype; ``*_float64`` in float64).
    """
    if example_inputs is None:
        raise ValueError("fuse needs example_inputs to prove which op consumes which output")
    config = FuseConfig() if config is None else config
    if not isinstance(config, FuseConfig):
        raise TypeError(f"config must be a FuseConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    model.eval()
    report = Report(operation="fuse", params_before=count_params(model), params_after=0)
    report.config = config.to_dict()
    try:
        report.flops_before = count_flops(model, example_inputs)
    except Exception as e:  # noqa: BLE001 - FLOPs are informative only
        report.warnings.append(f"FLOP count failed ({type(e).__name__}: {e})")

    checker = _Checker(model, example_inputs, config, report) if config.verify else None
    modules_before = dict(model.named_modules())
    live: list[_Pair] = []  # every swap currently in the model, oldest first
    decisions: list[dict[str, Any]] = []
    rejected: dict[tuple[str, tuple[str, ...]], Rejection] = {}
    blocked: set[tuple[str, tuple[str, ...]]] = set()
    last: tuple[Equivalence, Equivalence | None] | None = None
    rounds = 0

    def apply(f: Fusion) -> _Pair:
        main = _swap_in(model, f)
        try:
            tw = (
                _swap_in(checker.twin, f)
                if checker is not None and checker.twin is not None
                else None
            )
        except BaseException:
            _rollback(main.journal)
            raise
        a = _Pair(main, tw)
        live.append(a)
        return a

    def undo(a: _Pair) -> None:
        a.undo()
        live.remove(a)

    try:
        for rnd in range(config.max_rounds):
            # Dropouts are identity at eval; swap them first so the recording sees plain dataflow.
            round_applied = [
                apply(f) for f in (plan_dropout_removal(model, config) if rnd == 0 else [])
            ]
            rec = record_forward(model, example_inputs)
            planned, rejections, deferred = plan_fusions(model, rec, config, blocked)
            del rec
            for r in rejections:
                rejected[r.key] = r
            round_applied += [apply(f) for f in planned]
            if not round_applied:
                break
            rounds += 1
            kept = round_applied
            if checker is not None:
                e, e64 = checker.check()
                if e.ok and (e64 is None or e64.ok):
                    last = (e, e64)
                else:
                    # Something is off: undo the round, then re-apply one fusion at a time.
                    for a in reversed(round_applied):
                        undo(a)
                    kept = []
                    for a in round_applied:
                        again = apply(a.fusion)
                        e1, e64_1 = checker.check()
                        if e1.ok and (e64_1 is None or e64_1.ok):
                            kept.append(again)
                            last = (e1, e64_1)
                            continue
                        undo(again)
                        blocked.add(a.fusion.key)
                        decisions.append(
                            _entry(
                                a.fusion,
                                "rolled_back",
                                _why(e1, e64_1),
                                max_abs_err=e1.max_abs_err,
                                max_abs_err_float64=None if e64_1 is None else e64_1.max_abs_err,
                            )
                        )
            for a in kept:
                decisions.append(_entry(a.fusion, "applied", params_delta=a.params_delta))
            # Another round only helps if a candidate waited for a claimed module or a rollback
            # freed modules for a different fusion.
            if not planned or not (deferred or len(kept) < len(round_applied)):
                break
        if config.channels_last:
            last = _channels_last(model, config, checker, decisions, last)
    except BaseException:
        for a in reversed(list(live)):
            undo(a)
        raise

    try:
        record_swaps(model, modules_before)  # so netfold.save / netfold.load rebuild it
    except TypeError as e:
        report.warnings.append(
            f"netfold.save cannot describe this fused model ({e}); use torch.save or ONNX"
        )
    del modules_before
    applied_keys = {(d["kind"], tuple(d["modules"])) for d in decisions}
    for key, r in rejected.items():
        if key in applied_keys:
            continue
        decisions.append(_entry(r, "rejected", r.reason))
    report.log = decisions
    report.skipped = [
        (" -> ".join(d["modules"]), f"{d['kind']} {d['status']}: {d.get('reason', '')}")
        for d in decisions
        if d["status"] != "applied"
    ]
    report.params_after = count_params(model)
    if report.flops_before is not None:
        try:
            report.flops_after = count_flops(model, example_inputs)
        except Exception as e:  # noqa: BLE001
            report.warnings.append(f"FLOP count failed after fusion ({type(e).__name__}: {e})")
    n_applied = sum(d["status"] == "applied" for d in decisions)
    report.extra.update(
        {
            "fusions_applied": n_applied,
            "candidates_rejected": sum(d["status"] == "rejected" for d in decisions),
            "rolled_back": sum(d["status"] == "rolled_back" for d in decisions),
            "rounds": rounds,
            "verified": checker is not None,
        }
    )
    if checker is not None:
        if last is None:  # nothing kept: the model is the original
            report.extra.update({"max_abs_err": 0.0, "max_rel_err": 0.0})
            if checker.twin is not None:
                report.extra.update({"max_abs_err_float64": 0.0, "max_rel_err_float64": 0.0})
        else:
            e, e64 = last
            report.extra.update({"max_abs_err": e.max_abs_err, "max_rel_err": e.max_rel_err})
            if e64 is not None:
                report.extra.update(
                    {"max_abs_err_float64": e64.max_abs_err, "max_rel_err_float64": e64.max_rel_err}
                )
        checker.twin = None  # free the float64 copy before returning
    elif n_applied:
        report.warnings.append("verify=False: the fused model was not compared with the original")
    report.seconds = time.perf_counter() - t0
    return report


def _channels_last(
    model: nn.Module,
    config: FuseConfig,
    checker: _Checker | None,
    decisions: list[dict[str, Any]],
    last: tuple[Equivalence, Equivalence | None] | None,
) -> tuple[Equivalence, Equivalence | None] | None:
    """Store Conv2d weights channels-last; verified like a fusion, undone on failure."""
    convs = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and not any(fnmatch(n, p) for p in config.skip)
    ]
    convs = [(n, m) for n, m in convs if not m.weight.is_contiguous(memory_format=CL)]
    if not convs:
        return last
    old = [(m, m.weight.data) for _, m in convs]
    entry = {"kind": "channels_last", "modules": [n for n, _ in convs]}
    try:
        for m, w in old:
            m.weight.data = w.contiguous(memory_format=CL)
        if checker is not None:
            # a layout change: the float64 twin would run the same values in the same layout
            e, _ = checker.check(float64=False)
            if not e.ok:
                for m, w in old:
                    m.weight.data = w
                decisions.append(dict(entry, status="rolled_back", reason=_why(e, None)))
                return last
            last = (e, last[1] if last is not None else None)
    except BaseException:
        for m, w in old:
            m.weight.data = w
        raise
    detail = f"{len(convs)} Conv2d weights stored channels-last (NHWC)"
    decisions.append(dict(entry, status="applied", detail=detail))
    return last


def format_decision_log(report: Report) -> str:
    """The decision log of a fuse Report as a fixed-width table (one line per decision)."""
    if not report.log:
        return "no fusion candidates"
    rows = []
    for d in report.log:
        what = " -> ".join(d["modules"])
        note = d.get("detail", "") if d["status"] == "applied" else d.get("reason", "")
        if d["status"] == "applied" and d.get("params_delta"):
            note += f" (params {d['params_delta']:+,})"
        rows.append((d["status"], d["kind"], what, note))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = min(max(len(r[2]) for r in rows), 70)
    lines = [f"{'status':<{w0}}  {'kind':<{w1}}  {'modules':<{w2}}  note"]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c:<{w2}}  {d}" for a, b, c, d in rows]
    return "\n".join(lines)
