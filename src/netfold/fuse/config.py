"""FuseConfig: which exact fusions :func:`netfold.fuse` may apply and how it verifies them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from netfold.config import _JSONMixin

__all__ = ["FuseConfig"]


def _check_tol(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class FuseConfig(_JSONMixin):
    """Exact, inference-time fusions and their verification.

    Every fusion is exact in real arithmetic; the verification measures what rounding leaves.

    Args:
        conv_bn: fold an eval-mode BatchNorm into the Conv1d/2d/3d that feeds it.
        linear_bn: fold a BatchNorm1d into the Linear that feeds it (2-D activations only).
        bn_forward: fold a BatchNorm into the Conv/Linear it feeds (only where exact: a zero-padded
            conv is exact only if the BatchNorm shift is zero, because padding inserts zeros
            *after* the normalisation).
        linear_chain: multiply out Linear -> [BatchNorm1d | Identity | eval Dropout]* -> Linear
            chains with nothing nonlinear between them.
        allow_growth: merge a Linear chain even when the merged layer has more parameters or
            FLOPs than the chain (e.g. a bottleneck 512 -> 16 -> 512). Off by default.
        norm_into_linear: fold the elementwise weight (and bias) of an RMSNorm / LayerNorm into
            the Linear layers that consume its output (HF q/k/v and gate/up projections); the norm
            keeps a unit weight (and zero bias).
        pad_conv: fold a symmetric zero-padding module (``nn.ZeroPad2d``, ``nn.ConstantPad2d(0)``,
            e.g. TF-style "same" convs) into the Conv's own padding; the pad becomes Identity.
        remove_dropout: replace Dropout modules with ``nn.Identity`` (exact at eval).
        channels_last: after the fusions, store every Conv2d weight in channels-last (NHWC)
            memory format, so oneDNN / cuDNN run the convolutions without reordering the
            activations at each layer (the values are unchanged; the verification covers it and
            rolls it back if the outputs move). ``netfold.save`` writes plain contiguous tensors:
            re-apply after loading. Off by default: it changes layout, not structure.
        verify: compare the fused model with the original on the example inputs and roll back
            any fusion that exceeds the tolerances.
        float64: also verify in float64 (every op's floating output promoted to float64), which
            separates "exact up to rounding" from "wrong".
        rtol / atol: tolerance in the model's own dtype: an output passes when
            ``max|fused - ref| <= atol + rtol * max|ref|``.
        rtol_float64 / atol_float64: the same in float64.
        skip: fnmatch patterns of module names never touched.
        max_rounds: record -> plan -> apply -> verify rounds (a round can expose new candidates).
    """

    conv_bn: bool = True
    linear_bn: bool = True
    bn_forward: bool = True
    linear_chain: bool = True
    allow_growth: bool = False
    norm_into_linear: bool = True
    pad_conv: bool = True
    remove_dropout: bool = True
    channels_last: bool = False
    verify: bool = True
    float64: bool = True
    rtol: float = 1e-5
    atol: float = 1e-6
    rtol_float64: float = 1e-10
    atol_float64: float = 1e-12
    skip: tuple[str, ...] = ()
    max_rounds: int = 3

    def __post_init__(self) -> None:
        for name in (
            "conv_bn",
            "linear_bn",
            "bn_forward",
            "linear_chain",
            "allow_growth",
            "norm_into_linear",
            "pad_conv",
            "remove_dropout",
            "channels_last",
            "verify",
            "float64",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("rtol", "atol", "rtol_float64", "atol_float64"):
            _check_tol(name, getattr(self, name))
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise ValueError("skip must be a sequence of fnmatch patterns (strings)")
        object.__setattr__(self, "skip", tuple(self.skip))
        if isinstance(self.max_rounds, bool) or not isinstance(self.max_rounds, int):
            raise ValueError(f"max_rounds must be an int, got {self.max_rounds!r}")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["skip"] = list(self.skip)
        return d
