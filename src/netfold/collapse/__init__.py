"""LayerCollapse: make the activation between two Linears learnably linear, then merge them.

    report = netfold.collapse(model, netfold.CollapseConfig(lc=1.0, epochs=2), data=batches)

or step by step inside your own training loop::

    from netfold.collapse import prepare, collapse_regularizer, distillation_loss, collapse_layers
    prepare(model, config)                   # activations -> PReLU (slope alpha)
    loss = distillation_loss(model(x), teacher(x), y) + collapse_regularizer(model, config.lc)
    collapse_layers(model, config)           # Linear-PReLU-Linear -> Linear where alpha ~ 1
"""

from .api import collapse
from .config import CollapseConfig
from .core import (
    collapse_layers,
    collapse_regularizer,
    distillation_loss,
    prepare,
    prepared_activations,
)
from .finetune import default_forward, finetune
from .pairs import LinearPair, find_pairs

__all__ = [
    "CollapseConfig",
    "LinearPair",
    "collapse",
    "collapse_layers",
    "collapse_regularizer",
    "default_forward",
    "distillation_loss",
    "find_pairs",
    "finetune",
    "prepare",
    "prepared_activations",
]
