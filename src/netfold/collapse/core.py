"""LayerCollapse (Shabgahi et al., 2023) as three library steps.

1. :func:`prepare` replaces the activation between two Linears by a PReLU with learnable slope
   alpha (alpha = 1 is the identity);
2. :func:`collapse_regularizer` (``lc * sum (1 - alpha)^2``) and :func:`distillation_loss`
   drive the slopes toward 1 while the network keeps the original model's outputs (use them in
   your own loop, or :func:`netfold.collapse.finetune`);
3. :func:`collapse_layers` replaces ``Linear(W1, b1) -> PReLU -> [BatchNorm1d] -> Linear(W2, b2)``
   by one ``Linear(W2 W1, W2 b1 + b2)`` (BatchNorm folded in) where ``|1 - alpha| <= tol`` and
   the pair has more parameters than the product, last layers first.

With alpha exactly 1 the collapse is exact; otherwise the error is of order ``(1 - alpha)``
times the negative part of the pre-activations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..eval.cost import count_flops, count_params
from ..fuse.ops import compose_linear_chain
from ..graph.edits import EDITS_ATTR, get_edits, replace_module
from ..graph.surgery import get_module
from ..report import Report
from .config import CollapseConfig
from .pairs import LinearPair, find_pairs

__all__ = [
    "collapse_layers",
    "collapse_regularizer",
    "distillation_loss",
    "prepare",
    "prepared_activations",
]


def _check_finite(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {name!r} contains NaN or inf; refusing to collapse")


def _n(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def prepare(model: nn.Module, config: CollapseConfig | None = None) -> Report:
    """Replace the activation of every collapsible pair by a PReLU, in place.

    Activations that already are PReLUs are kept (their slopes too). A ReLU becomes a PReLU
    with slope ``config.init_slope`` (0 by default: the same function); any other activation
    (GELU, SiLU, ...) changes the function, which the report warns about.

    Args:
        model: any module with ``Linear -> activation -> Linear`` pairs (see
            :func:`netfold.collapse.find_pairs`).
        config: ``init_slope``, ``per_channel`` and ``targets`` are used.

    Returns:
        A Report (operation "prepare") whose ``log`` lists each changed activation:
        ``{"pair", "activation", "was", "now"}``.

    Raises:
        ValueError: no pair matches, or the model holds NaN/inf.
    """
    t0 = time.perf_counter()
    config = config or CollapseConfig()
    if not isinstance(config, CollapseConfig):
        raise TypeError(f"config must be a CollapseConfig, got {type(config).__name__}")
    _check_finite(model)
    pairs = find_pairs(model, config.targets)
    if not pairs:
        raise ValueError(
            f"no collapsible Linear -> activation -> Linear pair found in {type(model).__name__}"
            + (f" matching {list(config.targets)}" if config.targets else "")
        )
    before = count_params(model)
    report = Report(operation="prepare", params_before=before, params_after=before)
    report.config = config.to_dict()
    for p in pairs:
        act = get_module(model, p.act)
        if isinstance(act, nn.PReLU):
            continue
        first = get_module(model, p.first)
        n = first.out_features if config.per_channel else 1
        new = nn.PReLU(n, init=config.init_slope).to(
            device=first.weight.device, dtype=first.weight.dtype
        )
        replace_module(model, p.act, new)
        was = type(act).__name__
        report.log.append({"pair": p.name, "activation": p.act, "was": was, "now": f"PReLU({n})"})
        if not isinstance(act, nn.ReLU) or config.init_slope != 0.0:
            report.warnings.append(
                f"{p.act}: {was} replaced by PReLU(init={config.init_slope}); the model's "
                "function changed, fine-tune (with distillation) before collapsing"
            )
    report.params_after = count_params(model)
    report.extra["pairs"] = len(pairs)
    report.seconds = time.perf_counter() - t0
    return report


def prepared_activations(model: nn.Module, targets: Sequence[str] = ()) -> dict[str, nn.PReLU]:
    """The PReLU activations of the model's collapsible pairs, by module name."""
    out = {}
    for p in find_pairs(model, tuple(targets)):
        act = get_module(model, p.act)
        if isinstance(act, nn.PReLU):
            out[p.act] = act
    return out


def collapse_regularizer(
    model_or_acts: nn.Module | dict[str, nn.PReLU] | Sequence[nn.PReLU], lc: float = 1.0
) -> torch.Tensor:
    """``lc * sum (1 - alpha)^2`` over the prepared PReLU slopes (a scalar tensor).

    Its gradient ``-2 lc (1 - alpha)`` pushes every slope toward 1, where the activation is the
    identity and the pair can collapse exactly.

    Args:
        model_or_acts: a prepared model, or its PReLUs (pass them to avoid a module scan per
            step).
        lc: regularisation strength.
    """
    if isinstance(model_or_acts, nn.Module):
        acts = list(prepared_activations(model_or_acts).values())
    elif isinstance(model_or_acts, dict):
        acts = list(model_or_acts.values())
    else:
        acts = list(model_or_acts)
    if not acts:
        return torch.zeros(())
    return lc * sum(((1.0 - a.weight) ** 2).sum() for a in acts)


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    ce_weight: float = 0.5,
    kd_weight: float = 0.5,
    temperature: float = 1.0,
    kind: str = "kl",
) -> torch.Tensor:
    """Cross-entropy with labels (when given) plus distillation to the teacher's outputs.

    ``kind="kl"`` is the LayerCollapse loss as coded by its authors: ``ce_weight * CE(student,
    labels) + kd_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (batchmean).
    ``"mse"`` and ``"cosine"`` (``1 - cos`` along the last dim) compare embeddings instead of
    logits. With only one of labels / teacher, that term is returned alone (unweighted).

    Args:
        student: ``(N, C)`` logits or ``(N, ..., D)`` embeddings.
        teacher: same shape as ``student`` (no gradient needed), or None.
        labels: ``(N,)`` class indices, or None.
        ce_weight / kd_weight / temperature / kind: see above.

    Returns:
        A scalar tensor.
    """
    if teacher is None and labels is None:
        raise ValueError("distillation_loss needs labels, a teacher output, or both")
    ce = F.cross_entropy(student, labels) if labels is not None else None
    kd = None
    if teacher is not None:
        teacher = teacher.detach()
        if teacher.shape != student.shape:
            raise ValueError(
                f"student output {tuple(student.shape)} != teacher output {tuple(teacher.shape)}"
            )
        if kind == "kl":
            t = temperature
            kd = F.kl_div(
                F.log_softmax(student / t, dim=-1),
                F.log_softmax(teacher / t, dim=-1),
                reduction="batchmean",
                log_target=True,
            ) * (t * t)
        elif kind == "mse":
            kd = F.mse_loss(student, teacher)
        elif kind == "cosine":
            kd = (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
        else:
            raise ValueError(f"unknown distillation kind {kind!r}; use 'kl', 'mse' or 'cosine'")
    if ce is None:
        return kd
    if kd is None:
        return ce
    return ce_weight * ce + kd_weight * kd


def _first_sample(x):
    """The first sample of an input batch (Tensor, tuple of Tensors, or dict of Tensors)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return (x[:1],)
    if isinstance(x, dict):
        return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    return tuple(t[:1] if isinstance(t, torch.Tensor) else t for t in x)


def _pair_cost(model: nn.Module, p: LinearPair) -> tuple[int, int]:
    """(parameters of the pair's modules, parameters of the collapsed Linear)."""
    first, second = get_module(model, p.first), get_module(model, p.second)
    before = sum(_n(get_module(model, m)) for m in p.modules)
    after = first.in_features * second.out_features + second.out_features
    return before, after


def _alpha_stats(act: nn.Module) -> tuple[float, float]:
    """(max |1 - alpha|, mean alpha) of a PReLU; (0, 1) for an identity."""
    if isinstance(act, nn.Identity):
        return 0.0, 1.0
    a = act.weight.detach().double()
    return float((1.0 - a).abs().max()), float(a.mean())


def _refit(
    model: nn.Module,
    p: LinearPair,
    data: Iterable[Any],
    forward: Callable[[nn.Module, Any], torch.Tensor] | None,
    ridge: float,
) -> tuple[nn.Linear, float]:
    """Least-squares Linear from the pair's input (of ``first``) to its output (of ``second``).

    Normal equations are accumulated in float64 over all calibration rows: X (rows, in),
    Y (rows, out); returns the Linear and the relative residual ||Y - X W^T - b|| / ||Y||.
    """
    from .finetune import default_forward, split_batch

    forward = forward or default_forward
    first, second = get_module(model, p.first), get_module(model, p.second)
    d_in, d_out = first.in_features, second.out_features
    xtx = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64)
    xty = torch.zeros(d_in + 1, d_out, dtype=torch.float64)
    yty = torch.zeros((), dtype=torch.float64)
    rec: dict[str, torch.Tensor] = {}
    h1 = first.register_forward_hook(lambda m, i, o: rec.__setitem__("x", i[0].detach()))
    h2 = second.register_forward_hook(lambda m, i, o: rec.__setitem__("y", o.detach()))
    dev = first.weight.device
    try:
        with torch.no_grad():
            for batch in data:
                inputs, _ = split_batch(batch)
                if isinstance(inputs, dict):
                    inputs = {
                        k: v.to(dev) if isinstance(v, torch.Tensor) else v
                        for k, v in inputs.items()
                    }
                elif isinstance(inputs, torch.Tensor):
                    inputs = inputs.to(dev)
                forward(model, inputs)
                x, y = rec["x"], rec["y"]
                mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
                if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                    keep = mask.reshape(-1).bool()
                else:
                    keep = None
                x = x.reshape(-1, d_in).double().cpu()
                y = y.reshape(-1, d_out).double().cpu()
                if keep is not None:
                    x, y = x[keep.cpu()], y[keep.cpu()]
                xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
                xtx += xa.T @ xa
                xty += xa.T @ y
                yty += (y * y).sum()
    finally:
        h1.remove()
        h2.remove()
    if not rec:
        raise ValueError("refit: the calibration data never reached the pair " + p.name)
    lam = ridge * float(xtx.diagonal()[:-1].mean())
    reg = torch.eye(d_in + 1, dtype=torch.float64) * lam
    reg[-1, -1] = 0.0  # the bias is not shrunk
    beta = torch.linalg.solve(xtx + reg, xty)  # (in + 1, out)
    # ||Y - X beta||^2 = Y'Y - 2 beta' X'Y + beta' X'X beta
    res = yty - 2 * (beta * xty).sum() + (beta * (xtx @ beta)).sum()
    err = float(torch.sqrt(res.clamp_min(0) / yty.clamp_min(1e-30)))
    dtype = first.weight.dtype
    new = nn.Linear(d_in, d_out, device=dev, dtype=dtype)
    with torch.no_grad():
        new.weight.copy_(beta[:-1].T.to(dtype))
        new.bias.copy_(beta[-1].to(dtype))
    return new, err


def _refusal(model: nn.Module, p: LinearPair, tol: float) -> str | None:
    act = get_module(model, p.act)
    if not isinstance(act, (nn.PReLU, nn.Identity)):
        return f"activation {p.act} is {type(act).__name__}, not a prepared PReLU"
    for b in p.between:
        m = get_module(model, b)
        if isinstance(m, nn.BatchNorm1d) and (m.running_mean is None or m.running_var is None):
            return f"BatchNorm {b} has no running statistics"
    dev, _ = _alpha_stats(act)
    if not dev <= tol:
        return f"max |1 - alpha| = {dev:.4g} > tol {tol:g}"
    before, after = _pair_cost(model, p)
    if after >= before:
        return f"collapsing adds parameters ({before:,} -> {after:,})"
    return None


def collapse_layers(
    model: nn.Module,
    config: CollapseConfig | None = None,
    *,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | dict | None = None,
    data: Iterable[Any] | None = None,
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> Report:
    """Collapse every prepared pair whose slopes are within ``tol`` of 1, last layers first.

    With ``config.refit`` the collapsed Linear is instead the least-squares fit (ridge
    ``refit_ridge``) of the pair's outputs on its inputs over ``data``, recorded with the current
    model; any activation is then accepted (no prepare or slope check needed) and the log
    records the fit's relative residual ``fit_rel_error``. This is the best linear replacement
    of the block on that data, not the algebraic product; it equals the product when the pair
    is already linear. Refits go first to last, so each one sees the inputs that the pairs
    collapsed before it produce.

    A pair is refused (and logged with the reason) when its activation is not a PReLU, its
    slopes are outside ``tol``, or the collapsed Linear would not have fewer parameters than
    the pair (bottleneck MLPs). After each collapse the pairs are searched again, so a chain
    ``Linear -> act -> Linear -> act -> Linear`` collapses progressively into one Linear.
    The collapsed weights are computed in float64 from the eval-mode BatchNorm statistics.

    Args:
        model: a prepared (and usually fine-tuned) model; changed in place.
        config: ``tol``, ``targets`` and ``max_pairs`` are used.
        example_inputs: an input batch (Tensor, tuple, or dict of keyword Tensors) for
            per-sample FLOP counts (optional).
        data: calibration batches for ``refit`` (Tensors, ``(x, y)`` pairs or dicts; a dict's
            ``attention_mask`` excludes padding tokens from the fit).
        forward: ``forward(model, inputs)`` for the calibration passes (default: call it).

    Returns:
        A Report (operation "collapse"); ``log`` has one entry per pair considered:
        ``{"pair", "status": "collapsed" | "refused", "alpha_mean", "max_dev", "params_before",
        "params_after", "reason"}``; refused pairs are also in ``skipped``.

    Raises:
        ValueError: the model has no collapsible pair, or holds NaN/inf (model unchanged).
    """
    t0 = time.perf_counter()
    config = config or CollapseConfig()
    if not isinstance(config, CollapseConfig):
        raise TypeError(f"config must be a CollapseConfig, got {type(config).__name__}")
    _check_finite(model)
    if not find_pairs(model, config.targets):
        raise ValueError(
            f"no collapsible Linear -> activation -> Linear pair found in {type(model).__name__}"
        )
    if config.refit and data is None:
        raise ValueError("refit=True fits the collapsed layers on data: pass data=...")
    one = _first_sample(example_inputs)
    was_training = model.training
    model.eval()
    flops_before = count_flops(model, one) if one is not None else None
    report = Report(operation="collapse", params_before=count_params(model), params_after=0)
    report.config = config.to_dict()
    report.flops_before = flops_before

    journal: list[tuple[str, nn.Module]] = []
    edits_before = get_edits(model)
    decided: set[tuple[str, str]] = set()
    collapsed = 0
    try:
        while True:
            found = find_pairs(model, config.targets)
            # The weight product goes last pair first (the paper's order); a refit goes first
            # to last so each fit sees the inputs the already collapsed pairs produce.
            todo = [
                p
                for p in (found if config.refit else reversed(found))
                if (p.first, p.act) not in decided
            ]
            if not todo:
                break
            p = todo[0]
            decided.add((p.first, p.act))
            act = get_module(model, p.act)
            dev, mean_alpha = (
                _alpha_stats(act) if isinstance(act, (nn.PReLU, nn.Identity)) else (math.nan,) * 2
            )
            before, after = _pair_cost(model, p)
            entry = {
                "pair": p.name,
                "modules": list(p.modules),
                "alpha_mean": mean_alpha,
                "max_dev": dev,
                "params_before": before,
                "params_after": after,
            }
            reason = _refusal(model, p, config.tol) if not config.refit else None
            if config.refit:
                before, after = _pair_cost(model, p)
                if after >= before:
                    reason = f"collapsing adds parameters ({before:,} -> {after:,})"
            if reason is None and config.max_pairs is not None and collapsed >= config.max_pairs:
                reason = f"max_pairs={config.max_pairs} reached"
            if reason is not None:
                entry.update(status="refused", reason=reason, params_after=before)
                report.log.append(entry)
                report.skipped.append((p.name, reason))
                continue
            if config.refit:
                new, err = _refit(model, p, data, forward, config.refit_ridge)
                entry["fit_rel_error"] = err
            else:
                chain = [get_module(model, m) for m in (p.first, *p.between, p.second)]
                new = compose_linear_chain(chain)
            new.train(False)
            journal.append((p.first, replace_module(model, p.first, new)))
            for m in (p.act, *p.between, p.second):
                journal.append((m, replace_module(model, m, nn.Identity())))
            collapsed += 1
            entry.update(status="collapsed", reason="")
            report.log.append(entry)
        _check_finite(model)
    except BaseException:
        for name, old in reversed(journal):
            replace_module(model, name, old, record=False)
        setattr(model, EDITS_ATTR, edits_before)
        model.train(was_training)
        raise
    report.params_after = count_params(model)
    if one is not None:
        report.flops_after = count_flops(model, one) if collapsed else flops_before
    report.extra.update(collapsed=collapsed, refused=len(report.skipped))
    model.train(was_training)
    report.seconds = time.perf_counter() - t0
    return report
