"""Model cost: parameter count (shared tensors once) and forward FLOPs on an example input."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["call_model", "count_flops", "count_params"]


def count_params(model: nn.Module) -> int:
    """Number of parameter elements; a tensor shared by several modules (tied weights) counts once.

    Two Parameter objects viewing the same storage region (same data pointer, shape and stride)
    also count once.

    Args:
        model: any module.

    Returns:
        Total elements over distinct parameters.
    """
    seen: set[tuple[Any, ...]] = set()
    total = 0
    for p in model.parameters():  # already unique by object
        key: tuple[Any, ...]
        if p.device.type == "meta":
            key = ("obj", id(p))
        else:
            key = (p.device.type, p.data_ptr(), tuple(p.shape), tuple(p.stride()), p.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += p.numel()
    return total


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on example inputs: a Tensor, a tuple/list of positional args or a kwargs dict."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    raise TypeError(
        "example_inputs must be a Tensor, a tuple of positional arguments or a dict of keyword "
        f"arguments, got {type(inputs).__name__}"
    )


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """Forward FLOPs of ``model`` on ``example_inputs``, from ``torch.utils.flop_counter``.

    Counts the ops FlopCounterMode knows (matmul, linear, convolution, attention ...; a
    multiply-add is 2 FLOPs). Elementwise ops (BatchNorm, activations) are not counted.

    Args:
        model: any module (run once in eval mode under ``torch.no_grad``; its train/eval
            flags are restored afterwards).
        example_inputs: a Tensor, a tuple of positional args, or a dict of keyword args.

    Returns:
        Total FLOPs for that input (so they scale with batch size / sequence length).
    """
    # Run in eval mode so the count has no side effects (BatchNorm running stats, dropout RNG).
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            call_model(model, example_inputs)
    finally:
        for m, training in modes:
            m.training = training
    return int(counter.get_total_flops())
