"""Checks every fold runs before it touches a model: materialised, finite, patterns that match."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..config import FoldConfig
from ..graph.groups import ChannelGroup
from .repair import collect_inputs


def _owner_modules(g: ChannelGroup) -> list[str]:
    return g.producers + g.channel_ops


def check_materialised(model: nn.Module) -> None:
    """Raise ValueError naming the first parameter or buffer on the meta device (no values)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise ValueError(
                f"model weights are not materialised: {name!r} is on the meta device; load "
                "real weights first (e.g. model.to_empty(device='cpu') then load_state_dict)"
            )


def check_finite(model: nn.Module) -> None:
    """Raise ValueError naming the first parameter or buffer holding NaN or inf (or on meta)."""
    check_materialised(model)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {name!r} contains NaN or inf; refusing to fold")


def check_patterns(
    groups: Sequence[ChannelGroup], config: FoldConfig, modules_of=None, foldable_only=True
) -> None:
    """Raise ValueError when a ``ratios`` / ``skip`` pattern of ``config`` matches no group.

    A pattern that matches nothing is almost always a typo or a name from another model; left
    alone it would fold (or keep) everything silently. ``ratios`` patterns must match a group
    that can fold; ``skip`` patterns any group.

    Args:
        groups: the model's channel groups (after tracing).
        config: the FoldConfig.
        modules_of: ``g -> module names`` the patterns are matched against besides ``g.name``
            (default: the group's producers and channel ops, as :func:`group_ratio` does).
        foldable_only: match ``ratios`` against foldable groups only.
    """
    if not config.ratios and not config.skip:
        return
    modules_of = modules_of or _owner_modules
    every = [[g.name, *modules_of(g)] for g in groups]
    can_fold = [[g.name, *modules_of(g)] for g in groups if g.foldable or not foldable_only]
    bad = [fp for fp in config.patterns_without_match(can_fold) if fp[0] == "ratios"]
    bad += [fp for fp in config.patterns_without_match(every) if fp[0] == "skip"]
    if bad:
        field, pattern = bad[0]
        shown = [g.name for g in groups if g.foldable] or [g.name for g in groups]
        more = f", ... ({len(shown)} in all)" if len(shown) > 6 else ""
        raise ValueError(
            f"{field} pattern {pattern!r} matches no "
            f"{'foldable ' if field == 'ratios' and foldable_only else ''}group of this model; "
            f"groups: {', '.join(shown[:6])}{more}"
        )


def _first_layer_shape(model: nn.Module) -> str:
    """What the first Linear / Conv expects, for error messages: "(N, 3, H, W)", "(N, ..., 64)"."""
    first = next(
        (m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))),
        None,
    )
    if isinstance(first, nn.Linear):
        return f"(N, ..., {first.in_features}) (first layer: Linear({first.in_features}, ...))"
    if isinstance(first, nn.modules.conv._ConvNd):
        spatial = ", ".join("HWD"[: len(first.kernel_size)])
        return f"(N, {first.in_channels}, {spatial}) (first layer: {type(first).__name__})"
    return "the model's input shape"


def check_data(
    model: nn.Module, data, example_inputs: tuple[torch.Tensor, ...] | None
) -> torch.Tensor:
    """Collect ``data`` into one (N, ...) batch and check it fits ``model``, or raise ValueError.

    Empty, NaN / inf, a dtype other than the model's, or a shape other than ``example_inputs``'
    (or, without them, one the model cannot run on: tried once in eval mode, no gradients,
    training mode restored) are refused with a message naming ``data``.

    Returns:
        The calibration batch (N, ...), at most 1024 samples.
    """
    try:
        batch = collect_inputs(data)
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise type(e)(msg if "data" in msg else f"data: {msg}") from None
    if batch.dim() == 0 or batch.shape[0] == 0 or batch.numel() == 0:
        raise ValueError(f"data is empty (shape {tuple(batch.shape)}): no calibration samples")
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    want = example_inputs[0].dtype if example_inputs else (p.dtype if p is not None else None)
    if want is not None and batch.dtype != want:
        raise ValueError(f"data must have dtype {want} (the model's inputs), got {batch.dtype}")
    if batch.is_floating_point() and not bool(torch.isfinite(batch).all()):
        raise ValueError("data contains NaN or inf; calibration inputs must be finite")
    if example_inputs:
        ex = example_inputs[0]
        if tuple(batch.shape[1:]) != tuple(ex.shape[1:]):
            raise ValueError(
                f"data must have shape (N, {', '.join(map(str, ex.shape[1:]))}) like "
                f"example_inputs, got {tuple(batch.shape)}"
            )
        return batch
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(batch[:2])
    except Exception as e:  # noqa: BLE001 - any failure here means the data does not fit
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"data of shape {tuple(batch.shape)} does not fit the model, which expects "
            f"{_first_layer_shape(model)}: {reason}"
        ) from None
    finally:
        model.train(was)
    return batch
