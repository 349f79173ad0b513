"""``netfold.collapse``: prepare, fine-tune (when data is given) and collapse in one call."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from ..families.encoders import mark_hf
from ..report import Report
from .config import CollapseConfig
from .core import collapse_layers, prepare
from .finetune import Forward, finetune

__all__ = ["collapse"]


def collapse(
    model: nn.Module,
    config: CollapseConfig | None = None,
    *,
    data: Iterable[Any] | None = None,
    teacher: nn.Module | None = None,
    forward: Forward | None = None,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | dict | None = None,
    progress: bool = False,
) -> Report:
    """LayerCollapse in place: PReLU activations, fine-tuning toward alpha = 1, collapse.

    Args:
        model: a trained model with ``Linear -> activation -> Linear`` pairs (MLPs, VGG
            classifiers, BERT / ViT / Mixer MLP blocks).
        config: see :class:`CollapseConfig` (default: lc 1, tol 0.05, one epoch).
        data: fine-tuning batches (Tensors, ``(x, y)`` pairs or dicts of keyword inputs); None
            skips fine-tuning, so only pairs whose slopes already are within ``tol`` collapse.
        teacher: the model to distil from; default: a frozen copy of ``model`` taken before
            anything changes (when data is given and ``kd_weight > 0``).
        forward: ``forward(model, inputs) -> Tensor`` for models whose output is not a tensor
            or logits (e.g. mean-pooled sentence embeddings).
        example_inputs: a batch for per-sample FLOP counts.
        progress: show the fine-tuning progress bar.

    Returns:
        A Report (operation "collapse"): parameters before preparation and after the collapse,
        the prepared activations and every collapsed / refused pair in ``log``, the fine-tuning
        history in ``extra["finetune"]``.

    Raises:
        ValueError: no collapsible pair, NaN/inf weights (the model is unchanged).
    """
    t0 = time.perf_counter()
    config = config or CollapseConfig()
    if not isinstance(config, CollapseConfig):
        raise TypeError(f"config must be a netfold.CollapseConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config.refit and data is None:
        raise ValueError("refit=True fits the collapsed layers on data: pass data=...")
    if teacher is None and data is not None and config.kd_weight > 0 and config.epochs > 0:
        teacher = copy.deepcopy(model).eval()
    prep = prepare(model, config)
    history = None
    if data is not None and config.epochs > 0:
        history = finetune(model, data, config, teacher=teacher, forward=forward, progress=progress)
    report = collapse_layers(
        model, config, example_inputs=example_inputs, data=data, forward=forward
    )
    mark_hf(model)  # Hugging Face models: record how netfold.load rebuilds them
    report.params_before = prep.params_before
    report.log = [{"status": "prepared", **e} for e in prep.log] + report.log
    report.warnings = prep.warnings + report.warnings
    if data is None and config.epochs > 0:
        report.warnings.append("no data given: collapsed without fine-tuning")
    if history is not None:
        report.extra["finetune"] = history
    report.seconds = time.perf_counter() - t0
    return report
