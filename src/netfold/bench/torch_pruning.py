"""Torch-Pruning's own structured magnitude pruning, as a peer baseline for the sweeps.

Runs VainF/Torch-Pruning's ``MetaPruner`` with ``GroupMagnitudeImportance`` (L1 or L2) at a
uniform channel ratio, with the model's output layers ignored, so folding is compared with a
peer library's code and not only with netfold's re-implementation. Optional: install with
``pip install 'netfold[bench]'``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..graph.surgery import get_module
from ..graph.trace import find_groups


def available() -> bool:
    """True when torch-pruning can be imported."""
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def output_layers(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> list[nn.Module]:
    """Modules producing the model output (they keep their width; netfold never folds them)."""
    out = []
    for g in find_groups(model, tuple(example_inputs)):
        if any("model output" in r for r in g.frozen_reasons):
            out.extend(get_module(model, p) for p in g.producers)
    return out


def tp_magnitude_prune(
    model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor, ratio: float, p: int
) -> nn.Module:
    """Prune ``model`` in place with Torch-Pruning (uniform channel ``ratio``, L``p`` group norm).

    Raises:
        ImportError: torch-pruning is not installed.
    """
    import torch_pruning as tp

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if ratio <= 0:
        return model
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs[0],
        importance=tp.importance.GroupMagnitudeImportance(p=p),
        pruning_ratio=ratio,
        ignored_layers=output_layers(model, example_inputs),
        global_pruning=False,
    )
    pruner.step()
    return model
