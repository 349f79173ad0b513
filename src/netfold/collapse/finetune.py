"""A small fine-tuning loop for LayerCollapse: distillation + ``lc * sum (1 - alpha)^2``.

Use it as is, or copy its three lines into your own loop::

    out = model(x)
    loss = distillation_loss(out, teacher(x), y) + collapse_regularizer(acts, config.lc)
    loss.backward()
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .config import CollapseConfig
from .core import collapse_regularizer, distillation_loss, prepared_activations

__all__ = ["default_forward", "finetune", "split_batch"]

Batch = Any
Forward = Callable[[nn.Module, Any], torch.Tensor]


def split_batch(batch: Batch) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels or None)`` from a Tensor, an ``(x, y)`` pair or a dict of inputs.

    A dict's ``"labels"`` entry is taken out as the labels; the rest are keyword inputs.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        inputs = dict(batch)
        return inputs, inputs.pop("labels", None)
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, (list, tuple)) and len(batch) == 1:
        return batch[0], None
    raise TypeError(
        f"cannot read a batch of type {type(batch).__name__}: use a Tensor, (x, y) or a dict"
    )


def default_forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    """``model(inputs)`` (or ``model(**inputs)``); Hugging Face outputs give ``logits`` when
    present, else ``last_hidden_state``."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if v is not None:
            return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}: pass forward=...")


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def finetune(
    model: nn.Module,
    data: Iterable[Batch],
    config: CollapseConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    forward: Forward | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Fine-tune a prepared model so its PReLU slopes approach 1 while it keeps its outputs.

    With ``lc=0`` any model can be fine-tuned (plain distillation, e.g. after folding).

    Loss per batch: :func:`distillation_loss` (labels when the batch has them, the teacher's
    outputs when a teacher is given) plus :func:`collapse_regularizer` with ``config.lc``. The
    slopes get their own learning rate (``alpha_lr``) and no weight decay.

    Args:
        model: a model after :func:`netfold.collapse.prepare`; trained in place.
        data: re-iterable batches (list, DataLoader): Tensors ``(N, ...)``, ``(x, y)`` pairs, or
            dicts of keyword inputs (optionally with ``"labels"``).
        config: epochs, max_steps, optimizer, schedule, lr, alpha_lr, loss weights, lc,
            grad_clip, seed.
        teacher: the original model (kept frozen, eval mode); None trains on labels only.
        forward: ``forward(model, inputs) -> Tensor`` (e.g. mean-pooled sentence embeddings);
            default :func:`default_forward`.
        progress: show a tqdm bar (stderr).
        device: where to train (default: the model's device).

    Returns:
        History: ``{"steps", "seconds", "epochs": [{"loss", "task", "reg", "alpha_min",
        "alpha_max"}], "alphas": {activation: mean slope}}``.

    Raises:
        ValueError: no prepared activation, no labels and no teacher, or a non-finite loss.
    """
    config = config or CollapseConfig()
    forward = forward or default_forward
    acts = prepared_activations(model, config.targets)
    if not acts and config.lc > 0:
        raise ValueError(
            "the model has no prepared PReLU activations: call prepare() first "
            "(or use lc=0 for plain distillation fine-tuning)"
        )
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    if teacher is not None:
        teacher.to(dev).eval()  # its outputs are computed under no_grad
    alpha_ids = {id(a.weight) for a in acts.values()}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in alpha_ids]
    alphas = [a.weight for a in acts.values()]
    alpha_lr = config.alpha_lr if config.alpha_lr is not None else config.lr
    decay = [p for p in weights if p.ndim > 1]
    no_decay = [p for p in weights if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "lr": config.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": config.lr},
        {"params": alphas, "weight_decay": 0.0, "lr": alpha_lr},
    ]
    if config.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups)
    else:
        opt = torch.optim.SGD(groups, momentum=0.9)

    total = config.max_steps
    if hasattr(data, "__len__"):
        per_run = config.epochs * len(data)  # type: ignore[arg-type]
        total = min(total, per_run) if total is not None else per_run
    if config.schedule == "cosine" and total:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
    else:
        sched = None
    torch.manual_seed(config.seed)
    history: dict[str, Any] = {"steps": 0, "epochs": []}
    t0 = time.perf_counter()
    was_training = model.training
    model.train()
    step = 0
    try:
        for epoch in range(config.epochs):
            sums = {"loss": 0.0, "task": 0.0, "reg": 0.0}
            n = 0
            bar = tqdm(
                data, desc=f"collapse fine-tune {epoch + 1}/{config.epochs}", disable=not progress
            )
            for batch in bar:
                if config.max_steps is not None and step >= config.max_steps:
                    break
                inputs, labels = split_batch(batch)
                inputs, labels = _to(inputs, dev), _to(labels, dev)
                if labels is None and teacher is None:
                    raise ValueError("batches carry no labels and no teacher was given")
                target = None
                if teacher is not None:
                    with torch.no_grad():
                        target = forward(teacher, inputs)
                out = forward(model, inputs)
                task = distillation_loss(
                    out,
                    target,
                    labels,
                    ce_weight=config.ce_weight,
                    kd_weight=config.kd_weight,
                    temperature=config.temperature,
                    kind=config.distill,
                )
                reg = collapse_regularizer(acts, config.lc)
                loss = task + reg
                if not bool(torch.isfinite(loss)):
                    raise ValueError(f"non-finite loss at step {step}: {float(loss)}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(weights + alphas, config.grad_clip)
                opt.step()
                if sched is not None:
                    sched.step()
                step += 1
                n += 1
                sums["loss"] += float(loss.detach())
                sums["task"] += float(task.detach())
                sums["reg"] += float(reg.detach())
                if progress and alphas:
                    a = torch.cat([x.detach().flatten() for x in alphas])
                    bar.set_postfix(
                        loss=f"{float(loss.detach()):.4f}", alpha_min=f"{float(a.min()):.3f}"
                    )
            bar.close()
            a = torch.cat([x.detach().flatten() for x in alphas]) if alphas else None
            history["epochs"].append(
                {
                    **{k: (v / n if n else math.nan) for k, v in sums.items()},
                    "steps": n,
                    "alpha_min": float(a.min()) if a is not None else None,
                    "alpha_max": float(a.max()) if a is not None else None,
                }
            )
            if config.max_steps is not None and step >= config.max_steps:
                break
    finally:
        model.train(was_training)
    history["steps"] = step
    history["seconds"] = round(time.perf_counter() - t0, 2)
    history["alphas"] = {k: float(v.weight.detach().mean()) for k, v in acts.items()}
    return history
