"""ONNX export (torch.onnx, dynamo exporter) and ONNX Runtime sessions.

    path = export_onnx(model, x, "model.onnx")            # x: Tensor, tuple of args or kwargs dict
    sess = ort_session(path, threads=2)                   # all graph optimisations on
    outs = run_ort(sess, x)                               # list of numpy arrays
    err = check_onnx(model, x, sess)                      # Equivalence vs PyTorch eager

onnx / onnxruntime / onnxscript are optional dependencies (``pip install netfold[export]``);
they are imported when first needed.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from netfold.fuse.record import call_model
from netfold.fuse.verify import Equivalence, compare_outputs, flat_outputs

__all__ = ["export_onnx", "ort_session", "run_ort", "ort_feed", "check_onnx"]


def _split(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise TypeError(f"example inputs must be a Tensor, tuple or dict, got {type(inputs).__name__}")


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    dynamic_batch: bool = False,
    optimize: bool = True,
    verbose: bool = False,
) -> Path:
    """Export ``model`` (eval mode) to ONNX with ``torch.onnx.export(..., dynamo=True)``.

    Args:
        model: the module to export; put in eval mode.
        example_inputs: a Tensor ``(N, ...)``, a tuple of positional args, or a kwargs dict
            (non-tensor values such as ``use_cache=False`` are baked into the graph).
        path: output ``.onnx`` file; weights may go to ``<path>.data`` next to it.
        opset: ONNX opset version (exporter default if None).
        dynamic_batch: make dim 0 of every tensor input dynamic. Static shapes (the default)
            let ONNX Runtime specialise more.
        optimize: run the exporter's ONNX graph optimiser (constant folding, etc.).
        verbose: show the exporter's progress messages.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    args, kwargs = _split(example_inputs)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")

        def dyn(x: Any) -> Any:
            return {0: batch} if isinstance(x, torch.Tensor) else None

        dynamic_shapes = (
            {k: dyn(v) for k, v in kwargs.items()} if kwargs else tuple(dyn(a) for a in args)
        )
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with torch.no_grad(), sink:
        torch.onnx.export(
            model,
            args,
            str(path),
            kwargs=kwargs or None,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            optimize=optimize,
            verbose=verbose,
        )
    return path


def ort_session(
    path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    optimization: str = "all",
    optimized_model_path: str | os.PathLike[str] | None = None,
) -> Any:
    """An ONNX Runtime CPU session with a stated thread count and graph optimisation level.

    Args:
        path: ``.onnx`` file.
        threads: intra-op threads (None: ORT's default, one per physical core); inter-op
            threads are 1 and execution is sequential, so ``threads`` is the whole budget.
        optimization: "all" (ORT_ENABLE_ALL: constant folding, Conv+BN/Conv+Add/Conv+activation
            fusions, layout transforms), "extended", "basic" or "none".
        optimized_model_path: also save the optimised graph there (for inspection).

    Returns:
        ``onnxruntime.InferenceSession``.
    """
    import onnxruntime as ort

    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    if optimization not in levels:
        raise ValueError(f"optimization must be one of {sorted(levels)}, got {optimization!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        so.intra_op_num_threads = threads
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_feed(session: Any, example_inputs: Any) -> dict[str, np.ndarray]:
    """Map example inputs onto the session's inputs (by name for kwargs, else by position)."""
    args, kwargs = _split(example_inputs)
    names = [i.name for i in session.get_inputs()]
    if kwargs and all(n in kwargs for n in names):
        return {n: kwargs[n].detach().cpu().numpy() for n in names}
    leaves, _ = tree_flatten((args, kwargs))
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    if len(tensors) != len(names):
        raise ValueError(f"ONNX graph takes {names}, got {len(tensors)} tensor input(s)")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}


def run_ort(session: Any, example_inputs: Any) -> list[np.ndarray]:
    """Run an ONNX Runtime session on example inputs; returns every output as numpy."""
    return session.run(None, ort_feed(session, example_inputs))


def check_onnx(
    model: nn.Module,
    example_inputs: Any,
    onnx: str | os.PathLike[str] | Any,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> Equivalence:
    """Compare ONNX Runtime with PyTorch eager on the same inputs.

    Args:
        model: the PyTorch model that was exported.
        example_inputs: inputs (same structure as at export).
        onnx: a path or an existing session.
        rtol / atol: per output, ``max|ort - torch| <= atol + rtol * max|torch|``. Looser than
            fuse's default because ORT reorders float32 reductions (and fuses Conv+BN itself).

    Returns:
        An :class:`~netfold.fuse.verify.Equivalence` (outputs matched in order).
    """
    session = onnx if hasattr(onnx, "run") else ort_session(onnx)
    with torch.no_grad():
        ref = flat_outputs(call_model(model.eval(), example_inputs))
    got = [torch.from_numpy(np.asarray(a)) for a in run_ort(session, example_inputs)]
    got = [g for g in got if g.is_floating_point()]
    return compare_outputs(ref, got, rtol=rtol, atol=atol)
