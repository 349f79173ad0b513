"""The per-layer algebra of exact fusion, in one place.

Each function takes the current modules, checks shapes, and returns *new* modules; nothing is
modified in place, so a failed build leaves the model untouched and a rollback is a module swap.
All arithmetic is done in float64 and cast back to the parameters' dtype, so the fused weights are
as close to the exact product as the storage dtype allows.

Notation: a BatchNorm in eval mode is the per-channel affine map ``y = s * x + t`` with
``s = gamma / sqrt(running_var + eps)`` (shape ``(C,)``) and ``t = beta - running_mean * s``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "bn_affine",
    "fold_bn_into_producer",
    "fold_bn_into_consumer",
    "compose_linear_chain",
    "fold_norm_into_linears",
    "unit_norm",
    "clone_with",
]


def clone_with(module: nn.Module, **params: torch.Tensor | None) -> nn.Module:
    """A copy of ``module`` whose parameters named in ``params`` are new tensors.

    The copy shares nothing with the original (other parameters and buffers are deep-copied),
    except the parameters being replaced, which are never copied (saves memory for big weights).

    Args:
        module: module to copy; its class and every attribute are kept (e.g. a Conv2d subclass
            with static padding stays that subclass).
        **params: parameter name -> new value (``None`` removes an optional parameter such as
            ``bias``).

    Returns:
        The new module.
    """
    memo: dict[int, object] = {}
    for name in params:
        old = module._parameters.get(name)
        if old is not None:
            memo[id(old)] = None  # placeholder: the copy never duplicates it
    new = copy.deepcopy(module, memo)
    for name, value in params.items():
        if name not in new._parameters:
            raise KeyError(f"{type(module).__name__} has no parameter slot {name!r}")
        old = module._parameters[name]
        if value is None:
            new._parameters[name] = None
        else:
            requires_grad = old.requires_grad if old is not None else True
            new._parameters[name] = nn.Parameter(
                value.detach().clone(), requires_grad=requires_grad
            )
    return new


def _dtype_of(module: nn.Module) -> torch.dtype:
    return module.weight.dtype


def bn_affine(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and shift of an eval-mode BatchNorm, in float64.

    Args:
        bn: BatchNorm1d/2d/3d with running statistics.

    Returns:
        ``(s, t)``, each of shape ``(C,)``, with ``bn(x) == s * x + t`` along the channel dim.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics normalises with batch statistics")
    mean = bn.running_mean.detach().double()
    var = bn.running_var.detach().double()
    s = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.detach().double()
    t = -mean * s
    if bn.bias is not None:
        t = t + bn.bias.detach().double()
    return s, t


def fold_bn_into_producer(layer: nn.Module, bn: _BatchNorm) -> nn.Module:
    """``bn(layer(x))`` as one layer: scale each output channel's weights, shift its bias.

    Args:
        layer: Conv1d/2d/3d (weight ``(C_out, C_in / groups, *k)``) or Linear (weight
            ``(C_out, C_in)``).
        bn: the BatchNorm that normalises ``layer``'s output channels (``num_features == C_out``).

    Returns:
        A copy of ``layer`` (same class) with ``W' = s[:, None, ...] * W`` and ``b' = s * b + t``.
    """
    w = layer.weight
    c_out = w.shape[0]
    if bn.num_features != c_out:
        raise ValueError(f"BatchNorm has {bn.num_features} channels, layer has {c_out} outputs")
    s, t = bn_affine(bn)
    w64 = w.detach().double() * s.view(-1, *([1] * (w.dim() - 1)))
    b64 = t if layer.bias is None else layer.bias.detach().double() * s + t
    dtype = _dtype_of(layer)
    return clone_with(layer, weight=w64.to(dtype), bias=b64.to(dtype))


def fold_bn_into_consumer(bn: _BatchNorm, layer: nn.Module) -> nn.Module:
    """``layer(bn(x))`` as one layer: scale each input channel's weights, add ``W @ t`` to the bias.

    Exactness with padding is the caller's business: a zero-padded conv sees zeros where the
    original saw ``bn(0) = t``, so this is exact only for unpadded convs, non-constant padding
    modes, or ``t == 0``.

    Args:
        bn: BatchNorm over the layer's input channels (``num_features == C_in``).
        layer: Conv1d/2d/3d (weight ``(C_out, C_in / groups, *k)``) or Linear (``(C_out, C_in)``).

    Returns:
        A copy of ``layer`` (same class) with the folded weight and bias.
    """
    w = layer.weight.detach().double()
    s, t = bn_affine(bn)
    groups = getattr(layer, "groups", 1)
    c_out, c_in_g = w.shape[0], w.shape[1]
    if bn.num_features != c_in_g * groups:
        raise ValueError(
            f"BatchNorm has {bn.num_features} channels, layer takes {c_in_g * groups} inputs"
        )
    # Input channel g * c_in_g + j feeds output channels of group g through w[o, j].
    out_per_group = c_out // groups
    group_of_out = torch.arange(c_out) // out_per_group  # (C_out,)
    s_in = s.view(groups, c_in_g)[group_of_out]  # (C_out, C_in / groups)
    t_in = t.view(groups, c_in_g)[group_of_out]
    extra = [1] * (w.dim() - 2)
    w_new = w * s_in.view(c_out, c_in_g, *extra)
    shift = (w * t_in.view(c_out, c_in_g, *extra)).flatten(1).sum(1)  # (C_out,)
    b_new = shift if layer.bias is None else layer.bias.detach().double() + shift
    dtype = _dtype_of(layer)
    return clone_with(layer, weight=w_new.to(dtype), bias=b_new.to(dtype))


def compose_linear_chain(chain: list[nn.Module]) -> nn.Linear:
    """One Linear equal to a chain of Linear / BatchNorm1d / identity-at-eval modules.

    Args:
        chain: modules in dataflow order; the first and last are ``nn.Linear``; BatchNorm1d
            entries act on 2-D activations ``(N, C)``; anything else must be the identity at eval
            (Identity, Dropout) and is skipped.

    Returns:
        ``nn.Linear(in_features of the first, out_features of the last)`` with
        ``W = W_n ... diag(s) ... W_1`` (shape ``(out, in)``) and the matching bias.
    """
    first = chain[0]
    if not isinstance(first, nn.Linear):
        raise TypeError("a linear chain starts with nn.Linear")
    w = first.weight.detach().double()  # (d1, d0)
    b = (
        first.bias.detach().double()
        if first.bias is not None
        else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    )
    for m in chain[1:]:
        if isinstance(m, nn.Linear):
            if m.in_features != w.shape[0]:
                raise ValueError(f"chain width mismatch: {w.shape[0]} -> Linear({m.in_features})")
            w2 = m.weight.detach().double()
            b = w2 @ b
            if m.bias is not None:
                b = b + m.bias.detach().double()
            w = w2 @ w
        elif isinstance(m, _BatchNorm):
            if m.num_features != w.shape[0]:
                raise ValueError(
                    f"chain width mismatch: {w.shape[0]} -> BatchNorm({m.num_features})"
                )
            s, t = bn_affine(m)
            w = s[:, None] * w
            b = s * b + t
    dtype = first.weight.dtype
    out_f, in_f = w.shape
    new = nn.Linear(in_f, out_f, bias=True, device="meta", dtype=dtype)
    new.weight = nn.Parameter(w.to(dtype), requires_grad=first.weight.requires_grad)
    new.bias = nn.Parameter(b.to(dtype), requires_grad=first.weight.requires_grad)
    return new


def fold_norm_into_linears(
    norm: nn.Module, linears: list[nn.Module]
) -> tuple[nn.Module, list[nn.Module]]:
    """Move a norm's elementwise affine ``y = n(x) * w + beta`` into the Linears that read ``y``.

    Args:
        norm: LayerNorm / RMSNorm-like module with a ``weight`` of shape ``(H,)`` and an optional
            ``bias`` of shape ``(H,)``.
        linears: Linear modules whose input is exactly the norm's output (weights ``(O_i, H)``).

    Returns:
        ``(unit_norm, new_linears)``: the norm with weight 1 (and bias 0), and copies of the
        linears with ``W' = W * w[None, :]`` and ``b' = b + W @ beta``.
    """
    g = norm.weight.detach().double()
    beta = getattr(norm, "bias", None)
    beta = beta.detach().double() if isinstance(beta, torch.Tensor) else None
    if beta is not None and not bool(beta.any()):
        beta = None
    new_linears = []
    for lin in linears:
        if lin.weight.dim() != 2 or lin.weight.shape[1] != g.shape[0]:
            raise ValueError(
                f"Linear weight {tuple(lin.weight.shape)} does not read the norm's {g.shape[0]} features"
            )
        w = lin.weight.detach().double()
        dtype = lin.weight.dtype
        new_w = (w * g[None, :]).to(dtype)
        if beta is None:
            new_linears.append(clone_with(lin, weight=new_w))
            continue
        b = w @ beta
        if lin.bias is not None:
            b = b + lin.bias.detach().double()
        new_linears.append(clone_with(lin, weight=new_w, bias=b.to(dtype)))
    return unit_norm(norm), new_linears


def unit_norm(norm: nn.Module) -> nn.Module:
    """A copy of a norm module with weight 1 and (if present) bias 0."""
    params: dict[str, torch.Tensor] = {"weight": torch.ones_like(norm.weight.detach())}
    if isinstance(getattr(norm, "bias", None), torch.Tensor):
        params["bias"] = torch.zeros_like(norm.bias.detach())
    return clone_with(norm, **params)
