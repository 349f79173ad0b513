"""netfold.fold: cluster similar channels, merge them, repair the statistics, in place.

The whole plan (groups, widths, clusterings, new tensors) is computed and validated before the
model is touched; the write itself is rolled back if anything fails after it started.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .config import PRUNE_METHODS, FoldConfig
from .eval.cost import count_flops, count_params
from .fold.checks import check_finite, check_materialised, check_patterns
from .fold.deep_inversion import synthesize
from .fold.merge import ColumnShifts, TensorState, merge_group, merge_matrices
from .fold.methods import GroupPlan, plan_group
from .fold.plan import (  # noqa: F401 - the planner's public names, kept importable here
    group_ratio,
    params_after,
    plan_widths,
    width_for,
)
from .fold.repair import collect_inputs, producer_stats, repair_with_batch
from .graph.groups import ChannelGroup
from .graph.surgery import Snapshot, apply_tensors
from .graph.trace import find_groups, infer_example_inputs
from .report import Report


def _fold_decoder(model: nn.Module, config: FoldConfig, **kw) -> Report:
    from .families.llama import fold_decoder

    return fold_decoder(model, config, **kw)


def _fold_encoder(
    model: nn.Module,
    config: FoldConfig,
    *,
    data=None,
    widths: dict[str, int] | None = None,
    groups: list[ChannelGroup] | None = None,
    progress: bool = False,
) -> Report:
    from .families.encoders import fold_encoder

    if data is not None:
        raise ValueError(
            f"data= is not used when folding encoders ({type(model).__name__}): their repair "
            "is data-free ('ar' or 'none'); drop data="
        )
    if widths is not None:
        raise ValueError("widths= is supported for decoder LLMs only; use ratios= patterns")
    return fold_encoder(model, config, groups=groups, progress=progress)


def hf_families() -> dict[str, object]:
    """Hugging Face ``model_type`` -> fold function, from the family table
    (:mod:`netfold.families.table`: one row per decoder family, plus the encoder types)."""
    from .families.table import DECODERS, ENCODER_MODEL_TYPES

    return {
        **{t: _fold_decoder for f in DECODERS for t in f.model_types},
        **{t: _fold_encoder for t in ENCODER_MODEL_TYPES},
    }


def model_family(model: nn.Module):
    """The fold function for a Hugging Face ``model`` (None for models the tracer handles).

    Raises:
        ValueError: a Hugging Face model whose ``config.model_type`` no family supports.
    """
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(mt, str):
        return None
    families = hf_families()
    if mt not in families:
        raise ValueError(
            f"unsupported architecture {type(model).__name__} (Hugging Face model_type={mt!r}); "
            f"netfold folds model types {sorted(families)}"
        )
    return families[mt]


def _first_layer_shape(model: nn.Module) -> str:
    """What the first Linear / Conv expects, for error messages: "(N, 3, H, W)", "(N, ..., 64)"."""
    first = next(
        (m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))),
        None,
    )
    if isinstance(first, nn.Linear):
        return f"(N, ..., {first.in_features}) (first layer: Linear({first.in_features}, ...))"
    if isinstance(first, nn.modules.conv._ConvNd):
        spatial = ", ".join("HWD"[: len(first.kernel_size)])
        return f"(N, {first.in_channels}, {spatial}) (first layer: {type(first).__name__})"
    return "the model's input shape"


def check_data(
    model: nn.Module, data, example_inputs: tuple[torch.Tensor, ...] | None
) -> torch.Tensor:
    """Collect ``data`` into one (N, ...) batch and check it fits ``model``, or raise ValueError.

    Empty, NaN / inf, a dtype other than the model's, or a shape other than ``example_inputs``'
    (or, without them, one the model cannot run on: tried once in eval mode, no gradients,
    training mode restored) are refused with a message naming ``data``.

    Returns:
        The calibration batch (N, ...), at most 1024 samples.
    """
    try:
        batch = collect_inputs(data)
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise type(e)(msg if "data" in msg else f"data: {msg}") from None
    if batch.dim() == 0 or batch.shape[0] == 0 or batch.numel() == 0:
        raise ValueError(f"data is empty (shape {tuple(batch.shape)}): no calibration samples")
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    want = example_inputs[0].dtype if example_inputs else (p.dtype if p is not None else None)
    if want is not None and batch.dtype != want:
        raise ValueError(f"data must have dtype {want} (the model's inputs), got {batch.dtype}")
    if batch.is_floating_point() and not bool(torch.isfinite(batch).all()):
        raise ValueError("data contains NaN or inf; calibration inputs must be finite")
    if example_inputs:
        ex = example_inputs[0]
        if tuple(batch.shape[1:]) != tuple(ex.shape[1:]):
            raise ValueError(
                f"data must have shape (N, {', '.join(map(str, ex.shape[1:]))}) like "
                f"example_inputs, got {tuple(batch.shape)}"
            )
        return batch
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(batch[:2])
    except Exception as e:  # noqa: BLE001 - any failure here means the data does not fit
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"data of shape {tuple(batch.shape)} does not fit the model, which expects "
            f"{_first_layer_shape(model)}: {reason}"
        ) from None
    finally:
        model.train(was)
    return batch


def fold(
    model: nn.Module,
    config: FoldConfig | None = None,
    *,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    data=None,
    synthetic: torch.Tensor | None = None,
    groups: list[ChannelGroup] | None = None,
    progress: bool = False,
    widths: dict[str, int] | None = None,
) -> Report:
    """Fold ``model`` in place: cluster each channel group, merge, repair.

    Hugging Face models are dispatched on ``config.model_type`` through the family table
    (:mod:`netfold.families.table`): decoders (Llama, Mistral, Qwen2/3, Gemma/2/3, Phi-3,
    GPT-2, OPT) to :func:`netfold.fold.decoder.fold_decoder` (MLP channels and whole attention
    heads), encoders (BERT, RoBERTa, DistilBERT, ViT) to
    :func:`netfold.families.encoders.fold_encoder`.
    Any other model is traced with torch.fx.

    Args:
        model: a CNN / MLP (traced with torch.fx) in eval or train mode; its mode is kept.
        config: what to fold and how (default ``FoldConfig()``: ratio 0.5, k-means, Fold-AR).
        example_inputs: an input batch, e.g. (N, C, H, W), for tracing and FLOP counts;
            inferred from the first layer when None.
        data: calibration inputs for ``repair="data"``: a Tensor (N, ...) of the model's input
            shape and dtype, a list of Tensors or (x, y) pairs, or a DataLoader (at most 1024
            samples are used). Refused with any other repair (it would be ignored). Decoder
            LLMs: token ids (n, seqlen), see :func:`netfold.families.llama.fold_decoder`.
        synthetic: an already synthesised Deep-Inversion batch for ``repair="dir"`` (synthesis
            depends only on the original model, so sweeps can reuse one batch; other repairs
            ignore it, which lets a sweep pass the same arguments to every run).
        groups: precomputed channel groups (from :func:`netfold.graph.find_groups` on this same
            model), to skip tracing.
        progress: show progress bars.
        widths: decoder LLMs only: explicit widths ``{group name: channels or query heads}``.

    Returns:
        A :class:`Report` (parameters, FLOPs, widths per group, skipped groups, time).

    Raises:
        TypeError: config / model / example_inputs of the wrong type, or a model torch.fx
            cannot trace.
        ValueError: weights on the meta device or NaN/inf; missing ``data`` for
            repair="data", or ``data`` a repair would ignore; empty / non-finite ``data`` or
            ``data`` of another shape or dtype than the model's inputs; a ``ratios`` / ``skip``
            pattern that matches no group; an unsupported Hugging Face model type; an
            unreachable target. All raised before the model changes.
    """
    t0 = time.perf_counter()
    if config is None:
        config = FoldConfig()
    if not isinstance(config, FoldConfig):
        raise TypeError(f"config must be a netfold.FoldConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_materialised(model)
    family = model_family(model)
    if family is not None:
        return family(model, config, data=data, widths=widths, groups=groups, progress=progress)
    if widths is not None:
        raise ValueError("widths= is supported for decoder LLMs only; use ratios= patterns")
    check_finite(model)
    if config.repair == "data" and data is None:
        raise ValueError(
            "repair='data' needs calibration inputs: pass data=... (a Tensor, batches or a DataLoader)"
        )
    if data is not None and config.repair != "data":
        why = "synthesises its own inputs" if config.repair == "dir" else "is data-free"
        raise ValueError(
            f"data= is only used by repair='data'; repair={config.repair!r} {why} and would "
            "ignore it (pass repair='data' to calibrate on it, or drop data=)"
        )
    if config.repair == "dir" and not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    ):
        raise ValueError(
            "repair='dir' needs BatchNorm layers (Deep Inversion matches their statistics)"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if example_inputs is not None:
        example_inputs = tuple(example_inputs)
        if not example_inputs or not all(isinstance(t, torch.Tensor) for t in example_inputs):
            raise TypeError("example_inputs must be a Tensor or a non-empty sequence of Tensors")
    calib = check_data(model, data, example_inputs) if data is not None else None
    if example_inputs is None:
        # Calibration data already showed which shape the model runs on; no need to guess.
        example_inputs = (calib[:2],) if calib is not None else infer_example_inputs(model)
    if groups is None:
        groups = find_groups(model, example_inputs)
    check_patterns(groups, config)
    mode = "ar" if config.repair == "ar" else "naive"
    widths = plan_widths(model, groups, config, mode=mode, progress=progress)
    params_before = count_params(model)
    one = tuple(t[:1] for t in example_inputs)  # FLOPs are reported per input sample
    flops_before = count_flops(model, one)

    todo = [g for g in groups if g.foldable and widths.get(g.name, g.size) < g.size]
    state: TensorState = {}
    plans: dict[str, GroupPlan] = {}
    for g in tqdm(todo, desc="clustering", disable=not progress, leave=False):
        plans[g.name] = plan_group(model, g, widths[g.name], config, mode)
    shifts: ColumnShifts = {}  # consumers of torch.cat read several groups side by side
    for g in todo:
        pl = plans[g.name]
        merge_group(state, model, g, pl.labels, pl.k, mode, pl.rule, shifts=shifts)

    # Everything that needs the ORIGINAL model happens before the write.
    batch = None
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if todo and config.repair in ("dir", "data"):
        if config.repair == "data":
            batch = calib
        else:
            batch = (
                synthetic
                if synthetic is not None
                else synthesize(
                    model,
                    tuple(example_inputs[0].shape[1:]),
                    config.deep_inversion,
                    progress=progress,
                )
            )
        free = [(g, p) for g in todo for p in g.producers if p not in g.bn_of]
        if free:
            stats = producer_stats(model, [p for _, p in free], batch)
            for g, p in free:
                pl = plans[g.name]
                A = merge_matrices(pl.labels, pl.k, pl.rule, torch.float64)[1]
                mu, sd = stats[p]
                targets[p] = (A @ mu, A @ sd)

    touched = sorted(
        state.keys()
        | {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    )
    snap = Snapshot(model, touched)
    # Everything from the first write on runs under the snapshot: a failure in the write, the
    # repair, the checks or the report puts every touched tensor and attribute back.
    try:
        apply_tensors(model, state)
        if batch is not None:
            repair_with_batch(model, batch, targets, reset_bn=True)
        check_finite(model)
        report = Report(
            operation="prune" if config.method in PRUNE_METHODS else "fold",
            params_before=params_before,
            params_after=count_params(model),
            flops_before=flops_before,
            flops_after=count_flops(model, one) if todo else flops_before,
            config=config.to_dict(),
        )
        report.add_groups(
            groups,
            widths,
            {n: p.cost for n, p in plans.items()},
            {n: p.labels for n, p in plans.items()},
        )
    except BaseException:
        snap.restore()
        raise
    report.seconds = time.perf_counter() - t0
    return report
