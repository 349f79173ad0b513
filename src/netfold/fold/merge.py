"""Features for clustering a channel group, and the fold itself (producers: mean, consumers: sum).

Notation follows the paper: W_l (n x m) are the producer rows, W_{l+1} reads the n channels
through its input columns, U (n x k) is the one-hot cluster matrix. Producer rows and every
per-channel parameter become the cluster mean (U^T U)^-1 U^T W_l; consumer columns become the
cluster sum W_{l+1} U. Everything here is functional: new tensors go into a ``TensorState`` and
the model is untouched until the caller applies the state.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..graph.groups import ChannelGroup, ChannelParam
from ..graph.surgery import consumer_columns, get_module

TensorState = dict[str, dict[str, torch.Tensor]]
# (consumer module) -> [(original channel offset, width before, width after)] of the column
# segments already merged in the state: a later segment at a larger offset has moved left.
ColumnShifts = dict[str, list[tuple[int, int, int]]]


def check_aligned(labels: torch.Tensor, k: int, align: int) -> None:
    """Raise ValueError unless ``labels`` (n,) keep clusters inside ``align`` equal blocks.

    Each block must own exactly ``k / align`` consecutive cluster ids (block b: ids
    ``b * k / align ...``), so a grouped conv keeps equal group sizes. Pruning labels (-1 for a
    pruned channel) follow the same rule for the kept channels.
    """
    if align == 1:
        return
    n = labels.shape[0]
    if n % align or k % align:
        raise ValueError(f"{n} channels / width {k} do not split into {align} conv groups")
    bs, kb = n // align, k // align
    for b in range(align):
        lb = labels[b * bs : (b + 1) * bs]
        lb = lb[lb >= 0]
        ids = torch.unique(lb)
        if ids.numel() != kb or not torch.equal(ids, torch.arange(b * kb, (b + 1) * kb)):
            raise ValueError(
                f"labels must keep {kb} clusters inside each of the {align} conv groups "
                f"(group {b} has ids {ids.tolist()})"
            )


def _get(state: TensorState, model: nn.Module, mname: str, tname: str) -> torch.Tensor | None:
    if mname in state and tname in state[mname]:
        return state[mname][tname]
    t = getattr(get_module(model, mname), tname, None)
    return None if t is None else t.detach()


def _put(state: TensorState, mname: str, tname: str, value: torch.Tensor) -> None:
    state.setdefault(mname, {})[tname] = value


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def _channel_param(model: nn.Module, cp: ChannelParam) -> torch.Tensor:
    t = getattr(get_module(model, cp.module), cp.tensor)
    return t.detach()


def _bn_sigma(bn: nn.Module) -> torch.Tensor:
    return torch.sqrt(bn.running_var.detach() + bn.eps)


def group_features(model: nn.Module, group: ChannelGroup, mode: str) -> torch.Tensor:
    """Coupled feature matrix W_tot of a group, one row per channel: (n, d) float32/64.

    ``mode`` "ar" uses the paper's Fold-AR decomposition [W_{l+1}^T | Sigma_n W_l | diag(Sigma_s)];
    any other mode the DI/naive one [W_{l+1}^T | W_l | diag(Sigma_s) | diag(Sigma_n)].
    Biases and BatchNorm shifts are appended as columns (the paper drops them for notation only).
    """
    n = group.size
    cols: list[torch.Tensor] = []
    bn_paired = set(group.bn_of.values()) if mode == "ar" else set()
    for p in group.producers:
        m = get_module(model, p)
        w = m.weight.detach().reshape(n, -1)
        b = m.bias.detach() if m.bias is not None else None
        if mode == "ar" and p in group.bn_of:
            sigma = _bn_sigma(get_module(model, group.bn_of[p]))
            w = w / sigma[:, None]
            b = b / sigma if b is not None else None
        cols.append(w)
        if b is not None:
            cols.append(b[:, None])
    for c in group.channel_ops:
        m = get_module(model, c)
        if _is_bn(m):
            if m.weight is not None:
                cols.append(m.weight.detach()[:, None])
                cols.append(m.bias.detach()[:, None])
            if c not in bn_paired:
                cols.append((1.0 / _bn_sigma(m))[:, None])
        else:  # depthwise conv / PReLU: one row of parameters per channel
            cols.append(m.weight.detach().reshape(n, -1))
            if getattr(m, "bias", None) is not None:
                cols.append(m.bias.detach()[:, None])
    for cp in group.channel_params:
        cols.append(_channel_param(model, cp).movedim(cp.axis, 0).reshape(n, -1))
    for cons in group.consumers:
        cols.append(consumer_columns(get_module(model, cons.module).weight.detach(), group, cons))
    dtype = cols[0].dtype
    for c in cols[1:]:
        dtype = torch.promote_types(dtype, c.dtype)
    return torch.cat([c.to(dtype) for c in cols], dim=1)


def cluster_matrices(
    labels: torch.Tensor, k: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot U (n, k) and the averaging matrix A = (U^T U)^-1 U^T (k, n)."""
    n = labels.shape[0]
    U = torch.zeros(n, k, dtype=dtype, device=labels.device)
    U[torch.arange(n, device=labels.device), labels] = 1.0
    counts = U.sum(0)
    if bool((counts == 0).any()):
        raise ValueError("clustering left an empty cluster")
    return U, U.t() / counts[:, None]


MERGE_RULES = ("fold", "ifm", "prune")


def merge_matrices(
    labels: torch.Tensor, k: int, rule: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The linear maps of one merge: (P_prod (k, n), P_chan (k, n), C (n, k), members (n, k)).

    New producer rows are ``P_prod @ W_l``, new per-channel parameters ``P_chan @ p``, new
    consumer columns ``W_{l+1} @ C``; ``members`` is the one-hot cluster membership.

    - "fold": producers and per-channel parameters take the cluster mean, consumers the sum.
    - "ifm": IFM's rule as its authors coded it: producer rows are SUMMED, per-channel
      parameters averaged and consumer columns averaged (weighted by merge counts). Exact for
      a positively homogeneous activation without normalisation, biased with BatchNorm.
    - "prune": ``labels`` holds each kept channel's new index and -1 for pruned ones;
      everything is a selection.
    """
    n = labels.shape[0]
    if rule == "prune":
        kept = (labels >= 0).nonzero().flatten()
        if kept.numel() != k or not torch.equal(labels[kept].sort().values, torch.arange(k)):
            raise ValueError(f"prune labels must keep exactly {k} channels with ids 0..{k - 1}")
        S = torch.zeros(k, n, dtype=dtype)
        S[labels[kept], kept] = 1.0
        return S, S, S.t(), S.t()
    U, A = cluster_matrices(labels, k, dtype)
    if rule == "fold":
        return A, A, U, U
    if rule == "ifm":
        return U.t(), A, A.t(), U
    raise ValueError(f"unknown merge rule {rule!r}; choose from {MERGE_RULES}")


def _mean_rows(A: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    shape = t.shape
    return (A.to(t.dtype) @ t.reshape(shape[0], -1)).reshape((A.shape[0],) + tuple(shape[1:]))


def _cluster_cosine(rows: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of the rows inside each cluster: (k,), 1 for singletons."""
    r = rows.reshape(rows.shape[0], -1).to(U.dtype)
    rn = r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
    s = U.t() @ rn  # (k, d) sum of unit rows per cluster
    N = U.sum(0)
    pair_sum = (s * s).sum(1) - N  # sum over ordered pairs i != j of cos(i, j)
    cbar = pair_sum / (N * (N - 1)).clamp_min(1.0)
    return torch.where(N > 1, cbar, torch.ones_like(cbar))


def ar_scale(rows: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Fold-AR factor per cluster: sqrt(N / (1 + (N - 1) E[c])), E[c] from weight cosines, (k,).

    E[c] is clamped to [0, 1], i.e. the factor lies in [1, sqrt(N)]: without data a negative
    mean correlation is more likely an artefact than a reason to amplify beyond sqrt(N).
    """
    N = U.sum(0)
    cbar = _cluster_cosine(rows, U).clamp(0.0, 1.0)
    return torch.sqrt(N / (1.0 + (N - 1.0) * cbar))


def merge_group(
    state: TensorState,
    model: nn.Module,
    group: ChannelGroup,
    labels: torch.Tensor,
    k: int,
    mode: str,
    rule: str = "fold",
    *,
    shifts: ColumnShifts | None = None,
) -> None:
    """Fold ``group`` to ``k`` channels according to ``labels`` (n,), writing into ``state``.

    ``shifts`` records which column segments of each consumer earlier merges into the same
    ``state`` already shrank (consumers of ``torch.cat`` read several groups side by side);
    pass one dict for all groups merged into one state. With ``group.align`` > 1 the labels
    must keep clusters inside the conv groups (:func:`check_aligned`).

    ``rule`` picks the linear maps (:func:`merge_matrices`): "fold" (default), "ifm" or
    "prune" (``labels`` then marks kept channels, -1 for pruned).

    ``mode`` "ar" applies approximate REPAIR: BatchNorm normalisation is folded into the
    producer first, and each merged channel's BN scale (or, without BN, its weight row) is
    multiplied by :func:`ar_scale`. Other modes merge plainly (Fold-naive); "dir" and "data"
    re-estimate statistics afterwards.
    """
    dtype = torch.float64
    check_aligned(labels, k, group.align)
    if shifts is None:
        shifts = {}
    P, A, C, U = merge_matrices(labels, k, rule, dtype)
    bn_paired = group.bn_of if mode == "ar" else {}
    paired_bns = set(bn_paired.values())

    for p in group.producers:
        m = get_module(model, p)
        w = _get(state, model, p, "weight")
        b = _get(state, model, p, "bias")
        orig_rows = m.weight.detach()
        if p in bn_paired:
            bn = get_module(model, bn_paired[p])
            sigma = _bn_sigma(bn).to(w.dtype)
            w = w / sigma.reshape((-1,) + (1,) * (w.dim() - 1))
            b = b / sigma if b is not None else None
        w_new = _mean_rows(P, w.to(dtype))
        if mode == "ar" and p not in bn_paired:
            # No BatchNorm to carry the correction: rescale the merged rows so that, for white
            # inputs, each merged channel keeps the mean variance ||w_i||^2 of its members.
            flat = orig_rows.reshape(orig_rows.shape[0], -1).to(dtype)
            num = A @ (flat * flat).sum(1)
            den = (w_new.reshape(k, -1) ** 2).sum(1).clamp_min(1e-30)
            N = U.sum(0)
            f = torch.sqrt(num / den).clamp(1.0, None)
            f = torch.minimum(f, torch.sqrt(N))
            w_new = w_new * f.reshape((-1,) + (1,) * (w_new.dim() - 1))
        _put(state, p, "weight", w_new.to(m.weight.dtype))
        if b is not None:
            _put(state, p, "bias", (P @ b.to(dtype)).to(m.weight.dtype))

    for c in group.channel_ops:
        m = get_module(model, c)
        if _is_bn(m):
            mu = m.running_mean.detach().to(dtype)
            var = m.running_var.detach().to(dtype)
            sigma = torch.sqrt(var + m.eps)
            if c in paired_bns:
                new_mu = A @ (mu / sigma)
                new_var = torch.full((k,), 1.0 - m.eps, dtype=dtype)
                if m.eps > 1.0:  # no valid variance gives sigma = 1; eps = 1 still does (var 0)
                    new_var = torch.ones(k, dtype=dtype)
            else:
                new_mu = A @ mu
                inv = A @ (1.0 / sigma)  # mean of the normalisation diagonal
                new_var = (1.0 / inv) ** 2 - m.eps
            _put(state, c, "running_mean", new_mu.to(m.running_mean.dtype))
            _put(state, c, "running_var", new_var.to(m.running_var.dtype))
            if m.weight is not None:
                gamma = A @ m.weight.detach().to(dtype)
                if c in paired_bns:
                    prod = next(p for p, bnn in bn_paired.items() if bnn == c)
                    # cosine is invariant to the per-row BN scaling: use the original rows
                    gamma = gamma * ar_scale(get_module(model, prod).weight.detach(), U)
                _put(state, c, "weight", gamma.to(m.weight.dtype))
                _put(state, c, "bias", (A @ m.bias.detach().to(dtype)).to(m.bias.dtype))
        else:
            _put(state, c, "weight", _mean_rows(A, m.weight.detach().to(dtype)).to(m.weight.dtype))
            if getattr(m, "bias", None) is not None:
                _put(state, c, "bias", (A @ m.bias.detach().to(dtype)).to(m.bias.dtype))

    for cp in group.channel_params:
        # (..., n, ...) on cp.axis -> (..., k, ...): the cluster mean, like any per-channel entry
        t = _channel_param(model, cp)
        moved = t.movedim(cp.axis, 0).to(dtype)
        merged = _mean_rows(A, moved).movedim(0, cp.axis)
        _put(state, cp.module, cp.tensor, merged.to(t.dtype))

    n = group.size
    for cons in group.consumers:
        m = get_module(model, cons.module)
        w = _get(state, model, cons.module, "weight")
        out = w.shape[0]
        rest = tuple(w.shape[2:])
        s = math.prod(rest) if rest else 1
        if cons.groups > 1:
            # grouped conv: output block j reads input block j; C is block diagonal
            g = cons.groups
            bs, kb = n // g, k // g
            blocks = torch.stack(
                [C[j * bs : (j + 1) * bs, j * kb : (j + 1) * kb] for j in range(g)]
            )
            w5 = w.to(dtype).reshape(g, out // g, bs, s)
            w_new = torch.einsum("gobs,gbk->goks", w5, blocks).reshape((out, kb) + rest)
            _put(state, cons.module, "weight", w_new.to(m.weight.dtype))
            continue
        led = shifts.setdefault(cons.module, [])
        cur = cons.offset - sum(n0 - k0 for o, n0, k0 in led if o < cons.offset)
        r = cons.repeat
        W = w.reshape(out, -1, s)
        lo, hi = cur * r, (cur + n) * r
        seg = W[:, lo:hi].to(dtype).reshape(out, n, r, s)
        merged = torch.einsum("onrs,nk->okrs", seg, C).reshape(out, k * r, s).to(W.dtype)
        w_new = torch.cat([W[:, :lo], merged, W[:, hi:]], dim=1)
        _put(state, cons.module, "weight", w_new.reshape((out, -1) + rest).to(m.weight.dtype))
        led.append((cons.offset, n, k))
