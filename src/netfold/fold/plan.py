"""Width planning shared by every fold: how many units a group keeps at a ratio."""

from __future__ import annotations

from ..config import FoldConfig


def width_for(n: int, ratio: float, config: FoldConfig, head_size: int = 1) -> int:
    """k = round(n * (1 - ratio)), at least ``min_channels`` (and one head), at most n.

    With ``config.round_to`` > 1 a channel group's k is rounded to the nearest multiple of it
    (at least one multiple; a group narrower than ``round_to`` keeps its width); a ratio of 0
    stays the identity.
    """
    if head_size > 1:
        heads = n // head_size
        kh = max(1, int(round(heads * (1.0 - ratio))))
        return min(heads, kh) * head_size
    k = max(min(n, config.min_channels), min(n, int(round(n * (1.0 - ratio)))))
    q = config.round_to
    if q > 1 and k < n:
        k = max(q, int(round(k / q)) * q)
        if k < config.min_channels:
            k = -(-config.min_channels // q) * q
        k = min(n, k)
    return k
