"""Checks every fold runs before it touches a model: materialised, finite, patterns that match."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..config import FoldConfig
from ..graph.groups import ChannelGroup


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
