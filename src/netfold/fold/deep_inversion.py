"""Deep Inversion (Yin et al., 2020): synthesise inputs from a network's BatchNorm statistics.

Noise images are optimised so that, at every BatchNorm layer of the ORIGINAL network, the batch
mean/variance of the layer's input match the stored running statistics, together with a class
loss towards random target labels and L2 / total-variation image priors:

    R(x) = w_cls CE(f(x), t) + w_bn sum_l (||mu_l(x) - mu_l||_2 + ||var_l(x) - var_l||_2)
           + w_l2 ||x||_2^2 + w_tv TV(x)

with random jitter (a roll of up to ``jitter`` pixels) each step. Fold-DIR uses one such batch
to re-estimate the folded network's BatchNorm statistics without any real data.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import DeepInversionConfig


def _tv(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of a (B, C, H, W) batch (mean over pixels)."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
    return dh + dw


def synthesize(
    model: nn.Module,
    input_shape: tuple[int, ...],
    config: DeepInversionConfig | None = None,
    *,
    progress: bool = True,
) -> torch.Tensor:
    """Synthesise ``config.batch_size`` inputs of shape ``input_shape`` (C, H, W) from ``model``.

    The model is not modified (a copy is optimised against, in eval mode).

    Returns:
        (batch_size, C, H, W) tensor, detached.

    Raises:
        ValueError: the model has no BatchNorm layer to invert.
    """
    config = config or DeepInversionConfig()
    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    bns = [
        m
        for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns:
        raise ValueError(
            "repair='dir' needs BatchNorm layers (Deep Inversion matches their statistics); "
            "use repair='ar' or repair='data' for this model"
        )
    losses: list[torch.Tensor] = []

    def hook(mod, inp, out):
        x = inp[0]
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        losses.append(torch.norm(mean - mod.running_mean, 2) + torch.norm(var - mod.running_var, 2))

    handles = [bn.register_forward_hook(hook) for bn in bns]
    gen = torch.Generator().manual_seed(config.seed)
    p0 = next(model.parameters())
    x = torch.randn((config.batch_size,) + tuple(input_shape), generator=gen, dtype=p0.dtype).to(
        p0.device
    )
    x.requires_grad_(True)
    with torch.no_grad():
        n_classes = config.num_classes or int(net(x[:2]).shape[-1])
    targets = torch.randint(0, n_classes, (config.batch_size,), generator=gen).to(p0.device)
    opt = torch.optim.Adam([x], lr=config.lr, betas=(0.5, 0.9), eps=1e-8)
    spatial = x.dim() - 2
    try:
        for _ in tqdm(
            range(config.steps), desc="deep inversion", disable=not progress, leave=False
        ):
            if config.jitter > 0 and spatial >= 1:
                shifts = tuple(
                    int(s)
                    for s in torch.randint(
                        -config.jitter, config.jitter + 1, (spatial,), generator=gen
                    )
                )
                xin = torch.roll(x, shifts=shifts, dims=tuple(range(2, x.dim())))
            else:
                xin = x
            losses.clear()
            out = net(xin)
            loss = config.class_weight * F.cross_entropy(out, targets)
            loss = loss + config.bn_weight * torch.stack(losses).sum()
            loss = loss + config.l2_weight * (xin * xin).mean()
            if spatial == 2:
                loss = loss + config.tv_weight * _tv(xin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for h in handles:
            h.remove()
    return x.detach()
