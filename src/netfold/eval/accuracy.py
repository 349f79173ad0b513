"""Top-1 accuracy of a classifier on in-memory tensors."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["evaluate_accuracy"]


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def evaluate_accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> float:
    """Top-1 accuracy of ``model`` on ``(images, labels)``.

    Runs in eval mode under ``torch.no_grad()`` on the model's device, batch by batch, and
    restores the model's previous training flag (also if the forward raises).

    Args:
        model: a classifier mapping ``(B, ...)`` inputs to ``(B, num_classes)`` logits.
        images: ``(N, ...)`` inputs.
        labels: ``(N,)`` integer class labels.
        batch_size: evaluation batch size.

    Returns:
        The fraction of correct arg-max predictions, in ``[0, 1]`` (0.0 for ``N == 0``).
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = labels.shape[0]
    if n == 0:
        return 0.0
    device = _model_device(model)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
                x = images[i : i + batch_size].to(device, non_blocking=True)
                y = labels[i : i + batch_size].to(device, non_blocking=True)
                logits = model(x)
                correct += int((logits.argmax(dim=1) == y).sum().item())
    finally:
        model.train(was_training)
    return correct / n
