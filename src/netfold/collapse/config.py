"""CollapseConfig: the frozen, JSON round-trippable settings of LayerCollapse."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..config import _JSONMixin

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine")
DISTILL_KINDS = ("kl", "mse", "cosine")

__all__ = ["DISTILL_KINDS", "OPTIMIZERS", "SCHEDULES", "CollapseConfig"]


def _finite(name: str, value: Any, *, lo: float | None = None, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and (value <= lo if strict else value < lo):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {lo}, got {value}")


@dataclass(frozen=True)
class CollapseConfig(_JSONMixin):
    """LayerCollapse: linearise the activation between two Linears, fine-tune, collapse.

    Args:
        lc: strength of the regulariser ``lc * sum (1 - alpha)^2`` over prepared activations.
        init_slope: initial PReLU slope alpha (0 reproduces ReLU exactly).
        per_channel: one slope per hidden channel instead of one per activation.
        tol: a pair collapses when ``max |1 - alpha| <= tol``.
        epochs: fine-tuning epochs over the data given to :func:`netfold.collapse`.
        max_steps: stop fine-tuning after this many optimiser steps in total.
        optimizer: "adamw" or "sgd" (momentum 0.9).
        schedule: "cosine" decays every learning rate to 0 over the run (the slopes settle
            instead of oscillating around their equilibrium), or "constant".
        lr: learning rate of the network's weights.
        alpha_lr: learning rate of the PReLU slopes (None: ``lr``); slopes never get weight decay.
        weight_decay: weight decay of the network's weights.
        ce_weight / kd_weight: weights of the label cross-entropy and of the distillation term
            (as coded by the LayerCollapse authors: 0.5 / 0.5); without labels only the
            distillation term is used.
        temperature: softmax temperature of the KL distillation.
        distill: "kl" (logits), "mse" or "cosine" (embeddings) between student and teacher.
        grad_clip: clip the global gradient norm (None: no clipping).
        targets: fnmatch patterns; only pairs whose name or modules match are prepared and
            collapsed (empty: every pair found).
        max_pairs: collapse at most this many pairs, last layers first (None: all that pass).
        refit: fit each collapsed Linear by least squares to the pair's outputs on calibration
            data instead of multiplying the weights (any activation; see
            :func:`netfold.collapse.collapse_layers`).
        refit_ridge: ridge strength of the fit, relative to the mean input energy.
        seed: seeds the fine-tuning (dropout).
    """

    lc: float = 1.0
    init_slope: float = 0.0
    per_channel: bool = False
    tol: float = 0.05
    epochs: int = 1
    max_steps: int | None = None
    optimizer: str = "adamw"
    schedule: str = "cosine"
    lr: float = 1e-4
    alpha_lr: float | None = 1e-2
    weight_decay: float = 0.0
    ce_weight: float = 0.5
    kd_weight: float = 0.5
    temperature: float = 1.0
    distill: str = "kl"
    grad_clip: float | None = 1.0
    targets: tuple[str, ...] = ()
    max_pairs: int | None = None
    refit: bool = False
    refit_ridge: float = 1e-6
    seed: int = 0

    def __post_init__(self) -> None:
        _finite("lc", self.lc, lo=0.0)
        _finite("init_slope", self.init_slope)
        if not isinstance(self.per_channel, bool):
            raise TypeError(f"per_channel must be a bool, got {self.per_channel!r}")
        _finite("tol", self.tol, lo=0.0)
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {self.epochs!r}")
        if self.max_steps is not None and (
            not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise ValueError(f"max_steps must be None or an int >= 1, got {self.max_steps!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {SCHEDULES}")
        _finite("lr", self.lr, lo=0.0, strict=True)
        if self.alpha_lr is not None:
            _finite("alpha_lr", self.alpha_lr, lo=0.0, strict=True)
        _finite("weight_decay", self.weight_decay, lo=0.0)
        _finite("ce_weight", self.ce_weight, lo=0.0)
        _finite("kd_weight", self.kd_weight, lo=0.0)
        _finite("temperature", self.temperature, lo=0.0, strict=True)
        if self.distill not in DISTILL_KINDS:
            raise ValueError(f"unknown distill {self.distill!r}; choose from {DISTILL_KINDS}")
        if self.grad_clip is not None:
            _finite("grad_clip", self.grad_clip, lo=0.0, strict=True)
        if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
            raise TypeError("targets must be a sequence of fnmatch patterns (strings)")
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.max_pairs is not None and (
            not isinstance(self.max_pairs, int) or self.max_pairs < 0
        ):
            raise ValueError(f"max_pairs must be None or an int >= 0, got {self.max_pairs!r}")
        if not isinstance(self.refit, bool):
            raise TypeError(f"refit must be a bool, got {self.refit!r}")
        _finite("refit_ridge", self.refit_ridge, lo=0.0)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["targets"] = list(self.targets)
        return d
