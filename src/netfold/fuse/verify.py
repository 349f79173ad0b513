"""Compare a model's outputs with a reference: in its own dtype and in float64.

Float64 verification promotes *every* floating result to float64 and skips explicit downcasts
(a TorchFunctionMode), because many models cast to float32 internally (HF RMSNorm computes in
float32 whatever the input dtype), which would bring float32 rounding back into a "float64"
comparison. With the promotion,
an exact rewrite differs from the original by ~1e-15 relative and a wrong one by far more.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from netfold.fuse.record import _plain, call_model, func_name

__all__ = [
    "Equivalence",
    "compare_outputs",
    "flat_outputs",
    "require_finite",
    "float64_outputs",
    "run_float64",
    "verify_equivalence",
]

_LOW = (torch.float32, torch.float16, torch.bfloat16)
_CASTS = frozenset({"to", "float", "half", "bfloat16", "type", "type_as"})


class _PromoteToFloat64(TorchFunctionMode):
    """Every floating tensor an out-of-place op returns comes back as float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        name = func_name(func)
        if name.endswith("_"):  # in-place: the caller keeps using its own tensor
            return out
        src = args[0] if args else None
        if (
            name in _CASTS
            and isinstance(src, torch.Tensor)
            and src.dtype == torch.float64
            and isinstance(out, torch.Tensor)
            and out.dtype in _LOW
        ):
            # An explicit downcast (HF norms: x.to(torch.float32)) would round to float32 before
            # we could promote the result back: skip it instead.
            return src if out.device == src.device else src.to(out.device)

        def up(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.dtype in _LOW:
                return x.to(torch.float64)
            return x

        return tree_map(up, out) if isinstance(out, (tuple, list)) else up(out)


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors in a model's return value, in a stable order.

    Tuples, lists, dicts and HF ``ModelOutput`` are walked; caches and other objects are ignored.
    """
    leaves, _ = tree_flatten(_plain(out))
    return [x.detach() for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point()]


def require_finite(outputs: list[torch.Tensor], what: str) -> None:
    """Raise ValueError when any output holds NaN / inf: such outputs cannot verify anything.

    Args:
        outputs: flat outputs (see :func:`flat_outputs`).
        what: what produced them, for the message.
    """
    for i, t in enumerate(outputs):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(
                f"{what}: output {i} has {bad} non-finite value(s) (NaN/inf) of {t.numel()}; "
                "equivalence cannot be verified (check the weights and example_inputs)"
            )


def _to64(inputs: Any) -> Any:
    def up(x: Any) -> Any:
        return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    if isinstance(inputs, torch.Tensor):
        return up(inputs)
    return tree_map(up, inputs)


def run_float64(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    """Outputs of a float64 model with every floating result promoted to float64.

    Args:
        model: a module whose floating parameters and buffers are float64.
        inputs: example inputs; floating tensors are cast to float64.

    Returns:
        Flat floating outputs (float64).
    """
    with torch.no_grad(), _PromoteToFloat64():
        return flat_outputs(call_model(model, _to64(inputs)))


def float64_outputs(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    """Outputs of a float64 copy of ``model`` (the model itself is not touched).

    Args:
        model: any module.
        inputs: example inputs; floating tensors are cast to float64.

    Returns:
        Flat floating outputs (float64).
    """
    twin = copy.deepcopy(model).to(torch.float64).eval()
    return run_float64(twin, inputs)


@dataclass
class Equivalence:
    """How far a model's outputs are from a reference.

    Attributes:
        max_abs_err: max over outputs of ``max|out - ref|``.
        max_rel_err: max over outputs of ``max|out - ref| / max|ref|``.
        ok: every output finite and within ``atol + rtol * max|ref|`` (and the output
            structure matches); NaN / inf in either model's outputs is never ok.
        reason: why not ok ("" when ok).
    """

    max_abs_err: float
    max_rel_err: float
    ok: bool
    reason: str = ""


def compare_outputs(
    ref: list[torch.Tensor], out: list[torch.Tensor], *, rtol: float, atol: float
) -> Equivalence:
    """Compare flat output lists (see :func:`flat_outputs`).

    Args:
        ref: reference outputs.
        out: outputs to check, same number and shapes.
        rtol / atol: pass when ``max|out - ref| <= atol + rtol * max|ref|`` for every output.

    Returns:
        An :class:`Equivalence`.
    """
    if len(ref) != len(out):
        return Equivalence(float("inf"), float("inf"), False, f"{len(out)} outputs vs {len(ref)}")
    max_abs = max_rel = 0.0
    reason = ""
    for i, (r, o) in enumerate(zip(ref, out)):
        if r.shape != o.shape:
            return Equivalence(
                float("inf"),
                float("inf"),
                False,
                f"output {i}: shape {tuple(o.shape)} vs {tuple(r.shape)}",
            )
        r64, o64 = r.double(), o.double()
        finite = torch.isfinite(r64)
        # NaN/inf cannot be verified: matching NaNs would otherwise compare as "0.0 error"
        for who, t in (("reference", r64), ("candidate", o64)):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return Equivalence(
                    float("inf"),
                    float("inf"),
                    False,
                    f"output {i}: {bad} non-finite value(s) (NaN/inf) in the {who} outputs",
                )
        diff = (o64 - r64)[finite].abs()
        err = float(diff.max()) if diff.numel() else 0.0
        scale = float(r64[finite].abs().max()) if finite.any() else 0.0
        rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
        max_abs, max_rel = max(max_abs, err), max(max_rel, rel)
        if err > atol + rtol * scale and not reason:
            reason = f"output {i}: max abs err {err:.3g} > {atol:g} + {rtol:g} * {scale:.3g}"
    return Equivalence(max_abs, max_rel, not reason, reason)


def verify_equivalence(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: Any,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    float64: bool = False,
) -> Equivalence:
    """Run both models on the same inputs and compare their outputs.

    Args:
        reference: the original model.
        candidate: the rewritten model.
        example_inputs: a Tensor, a tuple of positional args, or a dict of keyword args.
        rtol / atol: tolerance (see :func:`compare_outputs`).
        float64: compare float64 copies of both models (with every floating result promoted to
            float64) instead of the models as they are.

    Returns:
        An :class:`Equivalence`.
    """
    reference.eval()
    candidate.eval()
    if float64:
        ref = float64_outputs(reference, example_inputs)
        out = float64_outputs(candidate, example_inputs)
    else:
        with torch.no_grad():
            ref = flat_outputs(call_model(reference, example_inputs))
            out = flat_outputs(call_model(candidate, example_inputs))
    return compare_outputs(ref, out, rtol=rtol, atol=atol)
