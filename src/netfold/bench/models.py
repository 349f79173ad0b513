"""Models for latency and fusion benchmarks, loaded with the one loader (:func:`netfold.hub.load`).

A :class:`LoadedModel` carries how to make example inputs for it; bare architectures get
seeded random BatchNorm statistics (:func:`netfold.fuse.bench.randomize_bn`), so fusing them
is not trivially exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..fuse.bench import randomize_bn

__all__ = ["LoadedModel", "load_model"]


@dataclass
class LoadedModel:
    """A model plus how to make inputs for it.

    Attributes:
        model: the module, in eval mode.
        kind: "vision" (input ``(N, C, H, W)``) or "lm" (``input_ids`` ``(N, T)``).
        name: the spec it was loaded from.
        image_size: H = W for vision models.
        channels: C for vision models.
        vocab_size: for language models.
    """

    model: nn.Module
    kind: str
    name: str
    image_size: int = 224
    vocab_size: int = 0
    channels: int = 3

    def example_inputs(self, batch: int = 1, seq_len: int = 32, seed: int = 0) -> Any:
        """Deterministic example inputs: a Tensor for vision, ``{"input_ids": ...}`` for LMs."""
        g = torch.Generator().manual_seed(seed)
        if self.kind == "vision":
            return torch.randn(batch, self.channels, self.image_size, self.image_size, generator=g)
        ids = torch.randint(0, self.vocab_size, (batch, seq_len), generator=g)
        return {"input_ids": ids, "use_cache": False}


def load_model(spec: str, *, seed: int = 0) -> LoadedModel:
    """Load a model through :func:`netfold.hub.load` (any spec it takes), as a :class:`LoadedModel`.

    An architecture built without weights gets seeded random BatchNorm statistics
    (:func:`randomize_bn`), so fusing it is not trivially exact.

    Args:
        spec: anything :func:`netfold.hub.load` takes.
        seed: seeds random weights / BatchNorm statistics of bare architectures.

    Returns:
        A :class:`LoadedModel` in eval mode.
    """
    from .. import hub

    torch.manual_seed(seed)
    model, _, info = hub.load(spec)
    return _loaded(model, info, seed)


def _loaded(model: nn.Module, info: Any, seed: int) -> LoadedModel:
    if info.random_weights:
        randomize_bn(model, seed)
    if info.kind == "tokens":
        return LoadedModel(model, "lm", info.spec, vocab_size=int(info.vocab_size or 0))
    shape = info.input_shape
    if shape is None or len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"{info.spec}: takes inputs of shape {shape}, not square images")
    lm = LoadedModel(model, "vision", info.spec, image_size=shape[1])
    lm.channels = shape[0]
    return lm
