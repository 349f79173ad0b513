"""Structured magnitude pruning on folding's channel groups (so residual streams stay whole).

Keeps the ``k`` channels whose coupled weights have the largest L1 / L2 magnitude; the plan is
labels holding each kept channel's new index and -1 for a pruned channel (merge rule "prune").
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..graph.groups import ChannelGroup
from ..graph.surgery import consumer_columns, get_module


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def coupled_slices(model: nn.Module, group: ChannelGroup) -> list[torch.Tensor]:
    """Every weight slice indexed by the group's channels, each as (n, d_i) float64.

    Producer rows (weights), per-channel parameters (BatchNorm affine weight, depthwise
    kernels) and consumer columns; BatchNorm running statistics are data, not weights.
    """
    n = group.size
    out: list[torch.Tensor] = []
    for p in group.producers:
        m = get_module(model, p)
        out.append(m.weight.detach().reshape(n, -1).double())
    for c in group.channel_ops:
        m = get_module(model, c)
        if _is_bn(m):
            if m.weight is not None:
                out.append(m.weight.detach().double()[:, None])
        elif getattr(m, "weight", None) is not None:
            out.append(m.weight.detach().reshape(n, -1).double())
    for cons in group.consumers:
        w = get_module(model, cons.module).weight.detach()
        out.append(consumer_columns(w, group, cons).double())
    return out


def magnitude_scores(model: nn.Module, group: ChannelGroup, p: int) -> torch.Tensor:
    """Group magnitude importance of each channel, (n,) float64.

    For every coupled slice the per-channel sum of |w|^p is divided by its mean over channels
    (so a wide consumer does not drown a narrow producer), then the slices are summed; the same
    "group importance, mean-normalised" recipe as Torch-Pruning's GroupMagnitudeImportance.
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    score = torch.zeros(group.size, dtype=torch.float64)
    for s in coupled_slices(model, group):
        local = s.abs().pow(p).sum(1)
        score += local / local.mean().clamp_min(1e-30)
    return score


def top_k_labels(scores: torch.Tensor, k: int, head_size: int = 1) -> torch.Tensor:
    """Keep the ``k`` highest-scoring channels (whole heads when ``head_size`` > 1).

    Args:
        scores: (n,) importance per channel.
        k: channels to keep (a multiple of ``head_size``).

    Returns:
        labels (n,) int64: the kept channels' new indices 0..k-1 in their original order, and
        -1 for pruned channels. Ties break towards the lower index (deterministic).
    """
    n = scores.shape[0]
    if not 1 <= k <= n or k % head_size or n % head_size:
        raise ValueError(f"cannot keep {k} of {n} channels in blocks of {head_size}")
    block = scores.reshape(n // head_size, head_size).sum(1)
    # stable sort on -score keeps the lower index first among equal scores
    order = torch.sort(-block, stable=True).indices[: k // head_size]
    keep_blocks = torch.sort(order).values
    keep = (keep_blocks[:, None] * head_size + torch.arange(head_size)[None, :]).reshape(-1)
    labels = torch.full((n,), -1, dtype=torch.long)
    labels[keep] = torch.arange(k)
    return labels


def magnitude_keep(
    X: torch.Tensor, k: int, p: int = 2, protect: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices (sorted, (k,)) of the k rows of X (n, d) with the largest L_p norm.

    ``protect``: row indices always kept (scored +inf). Decoder MLP channels and head units
    are pruned with this; traced groups with :func:`magnitude_scores` / :func:`top_k_labels`.
    """
    score = X.abs().sum(1) if p == 1 else (X * X).sum(1)
    if protect is not None and protect.numel():
        score[protect] = math.inf
    return torch.sort(torch.topk(score, k).indices).values
