"""``repair="auto"`` / ``allocation="auto"``: the measured best data-free choice per model.

The defaults of :class:`~netfold.config.FoldConfig` are "auto"; every fold entry point (the
traced pipeline, the decoder fold, the encoder fold) calls :func:`resolve` first and works on
the concrete config it returns, and the Report says what "auto" became and why
(``extra["repair"]``, ``extra["allocation"]``, ``extra["auto"]``). A name given explicitly
("ar", "stats", "uniform", ...) is never changed.

What "auto" resolves to, each choice measured (docs/repair.md, docs/llm.md):

- a traced network given calibration inputs (``data=``): ``repair="data"``;
- a traced network with BatchNorm layers: ``repair="stats"`` (moment propagation from the
  stored BatchNorm statistics; VGG11-BN at 58% sparsity 87.0% vs Fold-AR's 48.6%, ResNet18
  39.4% vs 25.1%, benchmarks/results/stats_repair.json); if the propagation does not support
  one of the model's operations, the pipeline falls back to "ar" with a warning;
- a traced network without BatchNorm and an encoder: :data:`BN_FREE_REPAIR`
  (benchmarks/results/auto_repair.json);
- a decoder LLM: the data-free recipe: ``allocation="cost"`` on self-generated text with
  activation features and :data:`DECODER_REPAIR` (benchmarks/results/llm_default.json) for a
  ``target_sparsity``. A ``ratio`` keeps its meaning (that fraction of every group: uniform
  widths, with the same repair), and so do per-group ``ratios``; the self-check
  (``LLMConfig.self_check``) warns when such a fold breaks the model;
- the baselines (magnitude pruning, IFM): the previous default "ar" with uniform widths, so
  baseline tables keep their meaning.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from ..config import MERGE_BASELINES, PRUNE_METHODS, FoldConfig

#: Model kinds :func:`resolve` knows.
KINDS = ("traced", "decoder", "encoder")
#: "auto" for traced networks without BatchNorm and for encoders. Measured on a BatchNorm-free
#: MLP trained on Fashion-MNIST (benchmarks/auto_repair.py -> benchmarks/results/
#: auto_repair.json, docs/repair.md): Fold-naive is at least as good as Fold-AR at every ratio
#: (79% sparsity: 81.3% vs 80.4%) and better than "stats" (75.8%), which has no BatchNorm
#: statistics to anchor its propagation there.
BN_FREE_REPAIR = "none"
#: "auto" for decoder LLMs: the repair on top of the cost allocation and activation features
#: (measured: benchmarks/llm_default.py -> benchmarks/results/llm_default.json, docs/llm.md).
DECODER_REPAIR = "dir"
#: "auto" repair when ``repair="stats"`` cannot propagate through a BatchNorm network.
STATS_FALLBACK = "ar"


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds any BatchNorm layer."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def resolve(
    model: nn.Module, config: FoldConfig, kind: str, *, has_data: bool = False
) -> tuple[FoldConfig, str | None]:
    """The concrete config a fold of ``model`` runs with, and why (None: nothing was "auto").

    Args:
        model: the model about to be folded (only inspected).
        config: the user's config; ``repair`` and ``allocation`` may be "auto".
        kind: "traced" (CNN / MLP through torch.fx), "decoder" or "encoder".
        has_data: calibration inputs were passed (``data=``): a traced network then gets
            ``repair="data"`` (REPAIR on them), the repair that reads them.

    Returns:
        (config with "auto" replaced, a one-line reason for the Report), unchanged when
        neither field is "auto".
    """
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose from {KINDS}")
    auto_repair = config.repair == "auto"
    auto_alloc = config.allocation == "auto"
    if not (auto_repair or auto_alloc):
        return config, None
    baseline = config.method in PRUNE_METHODS or config.method in MERGE_BASELINES
    if baseline:
        repair, allocation, why = "ar", "uniform", f"baseline method {config.method!r}"
    elif kind == "decoder":
        # A ratio keeps its meaning (that fraction of every group), per-group ``ratios`` are
        # the user's allocation, and the cost allocation folds MLPs only.
        cost = config.target_sparsity is not None and not config.ratios and config.llm.fold_mlp
        repair, allocation = DECODER_REPAIR, "cost" if cost else "uniform"
        why = "decoder LLM: self-generated text, activation features"
    elif kind == "traced" and has_data:
        repair, allocation, why = "data", "uniform", "calibration data given"
    elif kind == "traced" and has_batchnorm(model):
        repair, allocation, why = "stats", "uniform", "BatchNorm network"
    else:
        repair, allocation = BN_FREE_REPAIR, "uniform"
        why = "encoder" if kind == "encoder" else "network without BatchNorm"
    new = dataclasses.replace(
        config,
        repair=repair if auto_repair else config.repair,
        allocation=allocation if auto_alloc else config.allocation,
    )
    parts = [f"repair={new.repair!r}"] if auto_repair else []
    parts += [f"allocation={new.allocation!r}"] if auto_alloc else []
    return new, f"{why} -> {', '.join(parts)}"


def record(report, config: FoldConfig, why: str | None) -> None:
    """Write the resolved repair / allocation (and why, when "auto" chose) into ``report.extra``."""
    report.extra["repair"] = config.repair
    report.extra["allocation"] = config.allocation
    if why is not None:
        report.extra["auto"] = why
