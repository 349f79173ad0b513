"""Linear views of fused and transposed projections, and the write-back that re-fuses them.

The fold math reads ``nn.Linear``-shaped weights (out, in) by module name. Some models store
a projection otherwise: several projections fused into one module's output rows (Phi-3's
``gate_up_proj`` = [gate | up], ``qkv_proj`` = [q | k | v]) or the weight transposed (GPT-2's
``Conv1D``, (in, out)). A :class:`Split` describes one such module; :class:`Overlay` presents
every part as an ``nn.Linear`` under its own name (copies, the model is not touched), so the
math runs unchanged; :func:`write_back` turns new tensors of the parts into new tensors of the
real modules (rows concatenated in order, transposed back).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

TensorState = dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Split:
    """One stored module seen as Linear parts.

    Attributes:
        module: the real module (weight (out, in), or (in, out) when ``transposed``).
        parts: the names the parts are seen under, in row order.
        sizes: output rows of each part (summing to the module's output features).
        transposed: the weight is stored (in, out) (a GPT-2 ``Conv1D``).
    """

    module: str
    parts: tuple[str, ...]
    sizes: tuple[int, ...]
    transposed: bool = False


def _linear_weight(m: nn.Module, transposed: bool) -> torch.Tensor:
    w = m.weight.detach()
    return w.t() if transposed else w


class Overlay(nn.Module):
    """``model`` with :class:`Split` parts visible as ``nn.Linear`` modules by name.

    Only :meth:`get_submodule` is meant to be used (the fold math's module lookup); every name
    that is not a part resolves in ``model``.
    """

    def __init__(self, model: nn.Module, splits: list[Split]) -> None:
        super().__init__()
        object.__setattr__(self, "_base", model)  # not a child: no parameters are duplicated
        self._parts: dict[str, nn.Linear] = {}
        for s in splits:
            m = model.get_submodule(s.module)
            w = _linear_weight(m, s.transposed)
            if sum(s.sizes) != w.shape[0]:
                raise ValueError(f"{s.module}: parts {s.sizes} do not add up to {w.shape[0]} rows")
            b = getattr(m, "bias", None)
            lo = 0
            for name, n in zip(s.parts, s.sizes):
                lin = nn.Linear(w.shape[1], n, bias=b is not None, dtype=w.dtype)
                lin.weight = nn.Parameter(w[lo : lo + n].clone(), requires_grad=False)
                if b is not None:
                    lin.bias = nn.Parameter(b.detach()[lo : lo + n].clone(), requires_grad=False)
                self._parts[name] = lin
                lo += n

    def get_submodule(self, target: str) -> nn.Module:
        part = self._parts.get(target)
        return part if part is not None else self._base.get_submodule(target)


def write_back(state: TensorState, overlay: Overlay, splits: list[Split]) -> TensorState:
    """New tensors of the real modules from new tensors of the parts (others pass through).

    Args:
        state: ``{name: {"weight": (out, in), "bias": (out,)}}`` keyed by part or module name,
            in Linear orientation for parts.
        overlay: the :class:`Overlay` the state was computed on (for untouched parts).
        splits: the splits.

    Returns:
        A state keyed by real module names, weights in the modules' own orientation.
    """
    out: TensorState = {}
    part_names = {p for s in splits for p in s.parts}
    for name, tensors in state.items():
        if name not in part_names:
            out[name] = dict(tensors)
    for s in splits:
        if not any(p in state for p in s.parts):
            continue
        new: dict[str, torch.Tensor] = {}
        for tname in ("weight", "bias"):
            blocks = []
            for p in s.parts:
                t = state.get(p, {}).get(tname)
                if t is None:
                    cur = getattr(overlay._parts[p], tname)
                    t = None if cur is None else cur.detach()
                blocks.append(t)
            if any(b is None for b in blocks):
                continue
            # a consumer-side change (columns) of one part must agree across parts
            cols = {b.shape[1] for b in blocks} if tname == "weight" else set()
            if len(cols) > 1:
                raise ValueError(f"{s.module}: fused parts disagree on input width {sorted(cols)}")
            t = torch.cat(blocks, 0)
            new[tname] = t.t().contiguous() if (tname == "weight" and s.transposed) else t
        out[s.module] = new
    return out
