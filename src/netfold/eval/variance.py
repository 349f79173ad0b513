"""Variance ratio between an original and a compressed network (paper Definition 3.1).

For a layer l with n original and k folded channels, the ratio is the mean per-channel variance
of the folded activation over the mean per-channel variance of the original one:

    VR_l = ( (1/k) sum_c Var(x^_{l,c}) ) / ( (1/n) sum_i Var(x_{l,i}) )

Staying near 1 means no variance collapse (< 1) and no overshoot (> 1).
"""

from __future__ import annotations

import torch
import torch.nn as nn

CLASSIFIER_INPUT = "<classifier input>"


def _channel_var(t: torch.Tensor, conv_like: bool) -> torch.Tensor:
    t = t.detach().to(torch.float64)
    if t.dim() == 1:
        t = t[:, None]
    axis = 1 if conv_like else t.dim() - 1
    dims = [d for d in range(t.dim()) if d != axis]
    return t.var(dims, unbiased=False)


@torch.no_grad()
def activation_variances(
    model: nn.Module, inputs: torch.Tensor, layers: list[str] | None = None
) -> dict[str, float]:
    """Mean per-channel variance of each layer's output (and of the last Linear's input).

    Args:
        model: network in any mode (evaluated in eval mode, mode restored).
        inputs: (N, ...) batch.
        layers: module names; default every BatchNorm, Conv and Linear.
    """
    names = layers
    if names is None:
        names = [
            n
            for n, m in model.named_modules()
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Conv2d, nn.Conv1d, nn.Linear))
        ]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    out: dict[str, float] = {}
    handles = []
    for n in names:
        m = model.get_submodule(n)
        conv_like = not isinstance(m, nn.Linear)
        handles.append(
            m.register_forward_hook(
                lambda mod, i, o, n=n, c=conv_like: out.__setitem__(
                    n, float(_channel_var(o, c).mean())
                )
            )
        )
    if linears:
        last = model.get_submodule(linears[-1])
        handles.append(
            last.register_forward_pre_hook(
                lambda mod, i: out.__setitem__(
                    CLASSIFIER_INPUT, float(_channel_var(i[0], False).mean())
                )
            )
        )
    was = model.training
    model.eval()
    try:
        model(inputs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return out


def variance_ratio(
    original: nn.Module, folded: nn.Module, inputs: torch.Tensor, layers: list[str] | None = None
) -> dict[str, float]:
    """Per-layer variance ratio folded / original on ``inputs`` (see module docstring).

    Returns a dict layer name -> ratio, including ``"<classifier input>"`` (the input of the
    last Linear layer, the paper's "last layer").
    """
    a = activation_variances(original, inputs, layers)
    b = activation_variances(folded, inputs, layers)
    return {k: b[k] / a[k] for k in a if k in b and a[k] > 0}


def bn_stats(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Running mean and variance (C,) of every BatchNorm, float64 copies, by module name."""
    return {
        n: (m.running_mean.detach().double().clone(), m.running_var.detach().double().clone())
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def bn_distance(
    a: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ref: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> float:
    """Mean over BatchNorms of mean_c |log(var/var_ref)| + |mean - mean_ref| / std_ref."""
    total = 0.0
    for name, (mr, vr) in ref.items():
        m, v = a[name]
        vr = vr.clamp_min(1e-12)
        total += float((v.clamp_min(1e-12).log() - vr.log()).abs().mean())
        total += float(((m - mr).abs() / vr.sqrt()).mean())
    return total / max(1, len(ref))
