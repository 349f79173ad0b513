"""Statistics repair with a batch of inputs (real calibration data or Deep-Inversion samples).

After folding, merged channels no longer have the statistics the next layers expect (variance
collapse). Given inputs, two corrections run in one forward pass of the folded model, so each
layer sees the already-corrected layers before it:

- every BatchNorm forgets its running statistics and re-estimates them (momentum=None, i.e. a
  cumulative average) from the batch (Fold-DIR / Fold-R);
- every folded producer *without* BatchNorm gets REPAIR's per-channel affine correction: its
  merged channel c is rescaled and shifted so its mean/std match the mean of the original
  members' means/stds, and the affine map is fused into the producer's weight and bias.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from ..graph.surgery import get_module, set_tensor


def collect_inputs(data, max_samples: int = 1024) -> torch.Tensor:
    """Stack model inputs from a Tensor, a list/iterable of Tensors or of (x, y) pairs, or a
    DataLoader into one (N, ...) tensor of at most ``max_samples`` rows."""
    if data is None:
        raise ValueError("no data given")
    if isinstance(data, torch.Tensor):
        return data[:max_samples]
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
    ):
        if data[0].dim() > 1 and data[1].dim() == 1 and data[0].shape[0] == data[1].shape[0]:
            return data[0][:max_samples]  # a single (x, y) batch
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a Tensor, a list of batches or a DataLoader, got {type(data).__name__}"
        )
    chunks: list[torch.Tensor] = []
    total = 0
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"data batches must be Tensors or (Tensor, labels) pairs, got {type(x).__name__}"
            )
        chunks.append(x)
        total += x.shape[0]
        if total >= max_samples:
            break
    if not chunks:
        raise ValueError("data is empty")
    return torch.cat(chunks)[:max_samples]


def _channel_dims(module: nn.Module, out: torch.Tensor) -> tuple[int, list[int]]:
    axis = 1 if isinstance(module, nn.modules.conv._ConvNd) else out.dim() - 1
    return axis, [d for d in range(out.dim()) if d != axis]


@torch.no_grad()
def producer_stats(
    model: nn.Module, producers: list[str], inputs: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, std) of each producer's output on ``inputs``, model in eval mode."""
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def make_hook(name):
        def hook(mod, inp, out):
            axis, dims = _channel_dims(mod, out)
            o = out.detach().to(torch.float64)
            stats[name] = (o.mean(dims), o.std(dims, unbiased=False))

        return hook

    for p in producers:
        handles.append(get_module(model, p).register_forward_hook(make_hook(p)))
    was = model.training
    model.eval()
    try:
        model(inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return stats


@torch.no_grad()
def repair_with_batch(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    reset_bn: bool = True,
) -> dict[str, float]:
    """Re-estimate BatchNorm statistics and apply REPAIR affine corrections in one pass.

    Args:
        model: the folded model (modified in place).
        inputs: (N, ...) batch.
        targets: producer name -> (target mean (k,), target std (k,)) for its merged channels.
        reset_bn: re-estimate every BatchNorm's running statistics.

    Returns:
        producer name -> mean absolute log-scale of its correction (diagnostic).
    """
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    training = {m: m.training for m in model.modules()}
    saved_momentum = {bn: bn.momentum for bn in bns}
    corrections: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def make_hook(name, tmean, tstd):
        def hook(mod, inp, out):
            axis, dims = _channel_dims(mod, out)
            o = out.to(torch.float64)
            mu, sd = o.mean(dims), o.std(dims, unbiased=False)
            scale = tstd.to(o.dtype) / sd.clamp_min(1e-12)
            shift = tmean.to(o.dtype) - mu * scale
            corrections[name] = (scale, shift)
            shape = [1] * out.dim()
            shape[axis] = -1
            return (o * scale.reshape(shape) + shift.reshape(shape)).to(out.dtype)

        return hook

    for name, (tm, ts) in targets.items():
        handles.append(get_module(model, name).register_forward_hook(make_hook(name, tm, ts)))
    try:
        model.eval()
        if reset_bn:
            for bn in bns:
                # fresh buffers: the caller's snapshot keeps referencing the old ones
                set_tensor(bn, "running_mean", torch.zeros_like(bn.running_mean))
                set_tensor(bn, "running_var", torch.ones_like(bn.running_var))
                if bn.num_batches_tracked is not None:
                    set_tensor(bn, "num_batches_tracked", torch.zeros_like(bn.num_batches_tracked))
                bn.momentum = None
                bn.train()
        model(inputs)
    finally:
        for h in handles:
            h.remove()
        for m, t in training.items():
            m.train(t)
        for bn, mom in saved_momentum.items():
            bn.momentum = mom

    report: dict[str, float] = {}
    for name, (scale, shift) in corrections.items():
        m = get_module(model, name)
        w = m.weight.detach()
        w_new = w.to(torch.float64) * scale.reshape((-1,) + (1,) * (w.dim() - 1))
        b = m.bias.detach().to(torch.float64) if m.bias is not None else torch.zeros_like(scale)
        set_tensor(m, "weight", w_new.to(w.dtype))
        set_tensor(m, "bias", (b * scale + shift).to(w.dtype))
        report[name] = float(scale.abs().clamp_min(1e-12).log().abs().mean())
    return report
