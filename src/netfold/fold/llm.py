"""Folding math for decoder LLMs: MLP channels (gated or plain) and whole attention heads.

Notation as in :mod:`netfold.fold.merge`: a cluster's producer rows (gate_proj / up_proj, or
q/k/v rows of a head) become their mean, the consumer columns (down_proj, o_proj) their sum.
Everything is functional: new tensors go into a ``TensorState``; the model is not touched.

The merged SwiGLU channel ``silu(g_bar x) * (u_bar x)`` is not the mean of its members'
outputs (the product is not linear in the rows). Corrections:

- "scale": each merged gate/up row (and each merged query head) is rescaled to the mean norm
  of its members (Fold-AR's idea without BatchNorm), clamped to [1, sqrt(N)].
- "lsq": the merged channel's down_proj column is ``sum_i a_i d_i`` with
  ``a_i = E[h_i h_c] / E[h_c^2]``: the least-squares weight of member i's output h_i on the
  merged output h_c, the expectation taken over synthetic inputs z ~ N(0, I) fed through the
  RMSNorm weight (data-free); duplicates get a_i = 1, i.e. the plain sum.
- ``repair="data"``: the whole down_proj is refit by ridge least squares on real inputs:
  ``D' = D C_om (C_mm + lambda I)^-1`` with C the (original, merged) activation covariances.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..graph.groups import ChannelGroup, HeadGroup
from ..graph.surgery import get_module
from .merge import TensorState, _get, _put, cluster_matrices

DT = torch.float64


def _w(model: nn.Module, name: str) -> torch.Tensor:
    return get_module(model, name).weight.detach()


def _b(model: nn.Module, name: str) -> torch.Tensor | None:
    b = getattr(get_module(model, name), "bias", None)
    return None if b is None else b.detach()


def input_scale(
    model: nn.Module, norm: str | None, hidden: int, offset: float = 0.0
) -> torch.Tensor:
    """The norm's per-feature scale in front of a group's producers, (hidden,) float64.

    ``offset + weight`` (Gemma's RMSNorm multiplies by 1 + w); ones when there is no norm.
    """
    if norm is None:
        return torch.ones(hidden, dtype=DT)
    w = getattr(get_module(model, norm), "weight", None)
    return torch.ones(hidden, dtype=DT) if w is None else w.detach().to(DT) + offset


def activation(model: nn.Module, g: ChannelGroup) -> Callable[[torch.Tensor], torch.Tensor]:
    """The group's activation: the model's own module (``g.activation``), SiLU if none named."""
    return get_module(model, g.activation) if g.activation else F.silu


def _scale(model: nn.Module, g: ChannelGroup | HeadGroup, hidden: int) -> torch.Tensor:
    return input_scale(model, g.input_norm, hidden, g.norm_offset)


# MLP groups of at least this many channels (a 7B-size MLP: 11008) compute their features,
# gains and merges in float32: the float64 copies of one such layer's weights (2 GB and more)
# would dominate the memory of a layer-by-layer fold. Smaller groups keep float64.
LARGE_GROUP = 4096


def work_dtype(g: ChannelGroup) -> torch.dtype:
    """The dtype the MLP math of group ``g`` runs in (float64; float32 for large groups)."""
    return torch.float32 if g.size >= LARGE_GROUP else DT


def _rows(model: nn.Module, g: ChannelGroup, dt: torch.dtype = DT) -> tuple[torch.Tensor, ...]:
    """Producer weights of an MLP group in ``dt``: (gate, up) for a gated MLP, (fc1,) plain."""
    return tuple(_w(model, p).to(dt) for p in g.producers)


def _biases(
    model: nn.Module, g: ChannelGroup, dt: torch.dtype = DT
) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if (b := _b(model, p)) is None else b.to(dt) for p in g.producers)


def mlp_hidden(
    z: torch.Tensor,
    rows: tuple[torch.Tensor, ...],
    act: Callable[[torch.Tensor], torch.Tensor],
    biases: tuple[torch.Tensor | None, ...] | None = None,
) -> torch.Tensor:
    """Channel outputs of an MLP on inputs z (S, h): (S, n).

    Gated (``rows`` = (gate, up), (n, h) each): ``act(z gate^T + b_g) * (z up^T + b_u)``;
    plain (``rows`` = (fc1,)): ``act(z fc1^T + b)``.
    """
    biases = biases or (None,) * len(rows)
    pre = [z @ r.t() + (0 if b is None else b) for r, b in zip(rows, biases)]
    return act(pre[0]) * pre[1] if len(pre) == 2 else act(pre[0])


# ----------------------------------------------------------------------------------- MLP
def mlp_features(model: nn.Module, g: ChannelGroup) -> torch.Tensor:
    """Channel features of an MLP group: [producer rows * s | biases | down cols], (I, d).

    Gated: [gate * s | up * s | down], (I, 3h); plain: [fc1 * s | fc1 bias | down]. ``s`` is
    the norm scale in front of the MLP: rows are compared as they act on the normalised stream.
    Float64, or float32 for groups of :data:`LARGE_GROUP` channels and more.
    """
    dt = work_dtype(g)
    rows = _rows(model, g, dt)
    s = _scale(model, g, rows[0].shape[1]).to(dt)
    cols = [r * s for r in rows]
    cols += [b[:, None] for b in _biases(model, g, dt) if b is not None]
    for c in g.consumers:
        cols.append(_w(model, c.module).to(dt).t())
    return torch.cat(cols, 1)


def mlp_projected_features(model: nn.Module, g: ChannelGroup, p: int, seed: int) -> torch.Tensor:
    """``mlp_features(model, g) @ R / sqrt(p)``, (I, p), without forming the (I, d) features.

    ``R`` (d, p) is standard normal, drawn block by block (producer rows, biases, consumer
    columns, in feature order) from a generator seeded with ``seed``. Each block is applied to
    the weight it multiplies (``(r * s) @ R_r = r @ (s R_r)``), so the memory is (I, p) plus
    one (h, p) block: a 7B-size MLP needs 11 MB instead of the 541 MB feature matrix.
    """
    dt = work_dtype(g)
    gen = torch.Generator().manual_seed(seed)
    rows = _rows(model, g, dt)
    s = _scale(model, g, rows[0].shape[1]).to(dt)
    out = torch.zeros(g.size, p, dtype=dt)
    for r in rows:
        out += r @ (s[:, None] * torch.randn(r.shape[1], p, generator=gen, dtype=dt))
    for b in _biases(model, g, dt):
        if b is not None:
            out += b[:, None] * torch.randn(1, p, generator=gen, dtype=dt)
    for c in g.consumers:
        down = _w(model, c.module).to(dt)  # (h, I)
        out += (torch.randn(down.shape[0], p, generator=gen, dtype=dt).t() @ down).t()
    return out / p**0.5


def mlp_folding_cost(model: nn.Module, g: ChannelGroup, labels: torch.Tensor, k: int) -> float:
    """Exact folding cost J of ``labels`` on :func:`mlp_features`, block by block.

    J = sum over feature blocks B of ||B||^2 - sum_c ||sum of cluster c's rows of B||^2 / |c|,
    computed with index sums, never forming the whole (I, d) matrix.
    """
    dt = work_dtype(g)
    counts = torch.bincount(labels, minlength=k).to(torch.float64).clamp_min(1.0)
    rows = _rows(model, g, dt)
    s = _scale(model, g, rows[0].shape[1]).to(dt)
    blocks = [lambda r=r: r * s for r in rows]
    blocks += [lambda b=b: b[:, None] for b in _biases(model, g, dt) if b is not None]
    blocks += [lambda c=c: _w(model, c.module).to(dt).t() for c in g.consumers]
    total = 0.0
    for make in blocks:
        B = make()
        sums = torch.zeros(k, B.shape[1], dtype=B.dtype).index_add_(0, labels, B)
        # squares in the block's dtype, sums accumulated in float64 (no float64 copies)
        total += float((B * B).sum(dtype=torch.float64)) - float(
            ((sums * sums).sum(1, dtype=torch.float64) / counts).sum()
        )
    return max(total, 0.0)


def mlp_activation_features(
    x: torch.Tensor,
    rows: tuple[torch.Tensor, ...],
    act: Callable[[torch.Tensor], torch.Tensor],
    biases: tuple[torch.Tensor | None, ...] | None = None,
) -> torch.Tensor:
    """Channel features from token activations: each channel's output ``h_i(x)``, (I, S).

    Args:
        x: (S, h) normalised MLP inputs (token rows).
        rows: (I, h) producer rows: (gate, up) or (fc1,).
        act: the MLP's activation.
        biases: the producers' biases (I,) or None.

    Channels whose outputs agree on these tokens merge with little error whatever their
    down_proj columns (the merged column is their sum; identical outputs merge exactly).
    Weight-space features compare every input direction alike, including ones the model never
    sees. On SmolLM2-135M, scaling the rows by ||down_i|| or its square root measured no better
    (benchmarks/results/llm_features.json).
    """
    rows = tuple(r.to(DT) for r in rows)
    biases = None if biases is None else tuple(None if b is None else b.to(DT) for b in biases)
    return mlp_hidden(x.to(DT), rows, act, biases).t().contiguous()


def channel_gain(model: nn.Module, g: ChannelGroup) -> torch.Tensor:
    """Weight-only gain of each MLP channel: ||d_i|| times ||r_i * s|| of every producer, (I,).

    A few channels ("super weights") have gains tens of times the median; they create the
    massive activations that attention sinks rely on, and merging them breaks the model.
    """
    dt = work_dtype(g)
    rows = _rows(model, g, dt)
    down = _w(model, g.consumers[0].module).to(dt)
    s = _scale(model, g, rows[0].shape[1]).to(dt)
    gain = down.norm(dim=0)
    for r in rows:
        gain = gain * (r * s).norm(dim=1)
    return gain


def protected_channels(gain: torch.Tensor, factor: float) -> torch.Tensor:
    """Indices (sorted) of channels whose gain exceeds ``factor`` times the median (0: none)."""
    if factor <= 0:
        return torch.zeros(0, dtype=torch.long)
    return (gain > factor * gain.median()).nonzero().flatten()


def gaussian_inputs(hidden: int, n: int, seed: int) -> torch.Tensor:
    """(n, hidden) standard normal samples (the normalised residual stream, data-free)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, hidden, generator=g, dtype=DT)


# n * k above which a clustering is applied with index ops instead of dense one-hot matrices:
# a Llama-2-7B MLP folded to 80% (11008 x 8806) would need two 775 MB float64 matrices and
# 8e11-flop matmuls per projection. Below it the dense form is kept (same results as before).
DENSE_MAP_MAX = 1 << 24


class ClusterMap:
    """A clustering of ``n`` channels into ``k`` as the maps the merges apply.

    ``mean(r)`` is ``A @ r`` (each cluster's mean row), ``sum_cols(d, w)`` is ``d @ (U * w)``
    (each cluster's weighted column sum), ``sizes`` is ``U.sum(0)``; dense matrices for small
    ``n * k``, ``index_add_`` (O(n) work instead of O(n k)) above :data:`DENSE_MAP_MAX`.
    """

    def __init__(self, labels: torch.Tensor, k: int, dtype: torch.dtype = DT) -> None:
        self.labels, self.k = labels, k
        self.dense = labels.numel() * k <= DENSE_MAP_MAX
        if self.dense:
            self.U, self.A = cluster_matrices(labels, k, dtype)
            self.sizes = self.U.sum(0)
        else:
            self.sizes = torch.bincount(labels, minlength=k).to(dtype)
            if bool((self.sizes == 0).any()):
                raise ValueError("clustering left an empty cluster")

    def mean(self, r: torch.Tensor) -> torch.Tensor:
        """(n, ...) rows -> (k, ...) cluster means."""
        if self.dense:
            return self.A @ r
        out = torch.zeros((self.k, *r.shape[1:]), dtype=r.dtype).index_add_(0, self.labels, r)
        return out / self.sizes.to(r.dtype).view(-1, *([1] * (r.dim() - 1)))

    def sum_cols(self, d: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """(h, n) columns (times per-column weights ``w`` (n,)) -> (h, k) cluster sums."""
        if self.dense:
            return d @ (self.U if w is None else self.U * w[:, None])
        dd = d if w is None else d * w[None, :]
        return torch.zeros(d.shape[0], self.k, dtype=d.dtype).index_add_(1, self.labels, dd)


def merge_mlp(
    state: TensorState,
    model: nn.Module,
    g: ChannelGroup,
    labels: torch.Tensor,
    k: int,
    correction: str = "none",
    inputs: torch.Tensor | None = None,
    ridge: float = 1e-3,
) -> None:
    """Fold an MLP group to ``k`` channels: producer rows (and biases) mean, down columns
    (weighted) sum. Gated (gate/up) and plain (fc1) MLPs alike.

    Args:
        labels: (I,) cluster of each intermediate channel.
        correction: "none", "scale", "lsq" (needs ``inputs``: Gaussian samples, (S, hidden),
            already multiplied by the norm scale) or "data" (``inputs``: real normalised
            MLP inputs (S, hidden); refits down_proj by ridge least squares).
    """
    down_n = g.consumers[0].module
    wdt = work_dtype(g)
    cmap = ClusterMap(labels, k, wdt)
    rows = _rows(model, g, wdt)
    biases = _biases(model, g, wdt)
    down = _get(state, model, down_n, "weight").to(wdt)  # (h, I)
    new = [cmap.mean(r) for r in rows]
    new_b = tuple(None if b is None else cmap.mean(b) for b in biases)
    N = cmap.sizes
    if correction == "scale":
        for i, r in enumerate(rows):
            f = torch.sqrt((cmap.mean((r * r).sum(1))) / (new[i] * new[i]).sum(1).clamp_min(1e-30))
            f = torch.minimum(f.clamp_min(1.0), N.sqrt())
            new[i] = new[i] * f[:, None]
    if correction in ("lsq", "data"):
        if inputs is None:
            raise ValueError(f"correction {correction!r} needs inputs")
        act = activation(model, g)
        # the per-member weights need no float64 (and cost most of a fold in it)
        wt = torch.float32 if correction == "lsq" else DT

        def cast(ts):
            return tuple(None if t is None else t.to(wt) for t in ts)

        z = inputs.to(wt)
        h_m = mlp_hidden(z, cast(new), act, cast(new_b)).to(DT)  # (S, k)
        h_o = mlp_hidden(z, cast(rows), act, cast(biases)).to(DT)  # (S, I)
        if correction == "lsq":
            num = (h_o * h_m[:, labels]).sum(0)  # (I,)
            den = (h_m * h_m).sum(0)[labels].clamp_min(1e-30)
            a = torch.where(den > 1e-20, num / den, torch.ones_like(num))
            d_new = cmap.sum_cols(down, a.to(wdt))
        else:
            c_mm = h_m.t() @ h_m
            c_om = h_o.t() @ h_m
            lam = ridge * float(torch.diagonal(c_mm).mean().clamp_min(1e-30))
            rhs = (down.to(DT) @ c_om).t()
            d_new = torch.linalg.solve(c_mm + lam * torch.eye(k, dtype=DT), rhs).t()
    else:
        d_new = cmap.sum_cols(down)
    dt = _w(model, g.producers[0]).dtype
    for p, w, b in zip(g.producers, new, new_b):
        _put(state, p, "weight", w.to(dt))
        if b is not None:
            _put(state, p, "bias", b.to(_b(model, p).dtype))
    _put(state, down_n, "weight", d_new.to(dt))


def prune_mlp(state: TensorState, model: nn.Module, g: ChannelGroup, keep: torch.Tensor) -> None:
    """Keep only channels ``keep`` (sorted (k,) indices) of a SwiGLU group."""
    for p in g.producers:
        _put(state, p, "weight", _w(model, p)[keep].clone())
        b = _b(model, p)
        if b is not None:
            _put(state, p, "bias", b[keep].clone())
    for c in g.consumers:
        _put(state, c.module, "weight", _get(state, model, c.module, "weight")[:, keep].clone())


# --------------------------------------------------------------------------------- heads
def _heads(w: torch.Tensor, n: int, hd: int) -> torch.Tensor:
    """(n * hd, h) rows -> (n, hd, h)."""
    return w.reshape(n, hd, -1)


def head_features(model: nn.Module, hg: HeadGroup) -> list[torch.Tensor]:
    """Features of the clustering units, one (units, d) matrix per independent block.

    "query" units: one block per KV group, rows [q rows of the head * s | o_proj columns];
    "kv" units: one block, rows [k rows | v rows | q rows of its query heads | o columns].
    """
    nh, nkv, hd, gs = hg.num_heads, hg.num_kv_heads, hg.head_dim, hg.group_size
    s = _scale(model, hg, _w(model, hg.q).shape[1])
    q = _heads(_w(model, hg.q).to(DT) * s, nh, hd)  # (nh, hd, h)
    o = _w(model, hg.o).to(DT).reshape(-1, nh, hd).permute(1, 2, 0)  # (nh, hd, h)
    qo = torch.cat([q.reshape(nh, -1), o.reshape(nh, -1)], 1)  # (nh, 2 hd h)
    if hg.effective_unit == "query":
        return [qo[j * gs : (j + 1) * gs] for j in range(nkv)]
    k = _heads(_w(model, hg.k).to(DT) * s, nkv, hd).reshape(nkv, -1)
    v = _heads(_w(model, hg.v).to(DT) * s, nkv, hd).reshape(nkv, -1)
    return [torch.cat([k, v, qo.reshape(nkv, -1)], 1)]


def head_maps(hg: HeadGroup, block_labels: list[torch.Tensor], k_units: int):
    """Query-head and KV-head cluster matrices from per-block unit labels.

    Returns:
        (U_q (nh, nh'), A_q (nh', nh), U_kv (nkv, nkv'), A_kv (nkv', nkv)).
    """
    nh, nkv, gs = hg.num_heads, hg.num_kv_heads, hg.group_size
    if hg.effective_unit == "query":
        q_labels = torch.cat([j * k_units + lab for j, lab in enumerate(block_labels)])
        U_q, A_q = cluster_matrices(q_labels, nkv * k_units, DT)
        U_kv, A_kv = cluster_matrices(torch.arange(nkv), nkv, DT)
    else:
        kv_labels = block_labels[0]
        U_kv, A_kv = cluster_matrices(kv_labels, k_units, DT)
        q_labels = (kv_labels[:, None] * gs + torch.arange(gs)[None, :]).reshape(nh)
        U_q, A_q = cluster_matrices(q_labels, k_units * gs, DT)
    return U_q, A_q, U_kv, A_kv


def _merge_rows(A: torch.Tensor, w: torch.Tensor, hd: int) -> torch.Tensor:
    n = A.shape[1]
    return torch.einsum("mn,ndh->mdh", A, _heads(w.to(DT), n, hd)).reshape(A.shape[0] * hd, -1)


def _norm_fix(A: torch.Tensor, w: torch.Tensor, new: torch.Tensor, hd: int) -> torch.Tensor:
    """Scale each merged head (all its dims alike, so RoPE is kept) to its members' mean norm."""
    n, m = A.shape[1], A.shape[0]
    old_sq = (_heads(w.to(DT), n, hd) ** 2).sum((1, 2))
    new_sq = (_heads(new, m, hd) ** 2).sum((1, 2)).clamp_min(1e-30)
    f = torch.sqrt((A @ old_sq) / new_sq)
    N = (A > 0).sum(1).to(DT)
    f = torch.minimum(f.clamp_min(1.0), N.sqrt())
    return (_heads(new, m, hd) * f[:, None, None]).reshape(m * hd, -1)


def merge_heads(
    state: TensorState,
    model: nn.Module,
    hg: HeadGroup,
    block_labels: list[torch.Tensor],
    k_units: int,
    correction: str = "none",
) -> None:
    """Fold whole heads: q/k/v rows of a cluster's heads -> mean, o_proj columns -> sum."""
    hd = hg.head_dim
    U_q, A_q, U_kv, A_kv = head_maps(hg, block_labels, k_units)
    dt = _w(model, hg.q).dtype
    for name, A in ((hg.q, A_q), (hg.k, A_kv), (hg.v, A_kv)):
        if A.shape[0] == A.shape[1] and name != hg.q:
            continue  # query-head folding leaves K/V untouched
        w = _w(model, name)
        new = _merge_rows(A, w, hd)
        if correction in ("scale", "lsq") and name in (hg.q, hg.k):
            new = _norm_fix(A, w, new, hd)
        _put(state, name, "weight", new.to(dt))
        b = _b(model, name)
        if b is not None:
            _put(state, name, "bias", (A @ b.to(DT).reshape(-1, hd)).reshape(-1).to(b.dtype))
    o = _get(state, model, hg.o, "weight").to(DT)
    h = o.shape[0]
    o_new = torch.einsum("onh,nm->omh", o.reshape(h, hg.num_heads, hd), U_q).reshape(h, -1)
    _put(state, hg.o, "weight", o_new.to(dt))


def prune_heads(
    state: TensorState, model: nn.Module, hg: HeadGroup, keep_blocks: list[torch.Tensor]
) -> None:
    """Keep the units ``keep_blocks`` (sorted indices per block) of a head group."""
    hd, gs = hg.head_dim, hg.group_size
    if hg.effective_unit == "query":
        q_heads = torch.cat([j * gs + kb for j, kb in enumerate(keep_blocks)])
        kv_heads = torch.arange(hg.num_kv_heads)
    else:
        kv_heads = keep_blocks[0]
        q_heads = (kv_heads[:, None] * gs + torch.arange(gs)[None, :]).reshape(-1)

    def rows(heads: torch.Tensor) -> torch.Tensor:
        return (heads[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)

    for name, heads in ((hg.q, q_heads), (hg.k, kv_heads), (hg.v, kv_heads)):
        r = rows(heads)
        _put(state, name, "weight", _w(model, name)[r].clone())
        b = _b(model, name)
        if b is not None:
            _put(state, name, "bias", b[r].clone())
    _put(state, hg.o, "weight", _get(state, model, hg.o, "weight")[:, rows(q_heads)].clone())
