"""MergeConfig: how several networks of one architecture become one (frozen, JSON round trip)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..config import DeepInversionConfig, _JSONMixin

MERGE_METHODS = ("fold", "weight-matching", "zipit", "average")
MERGE_REPAIRS = ("none", "data", "dir")
MERGE_OUTPUTS = ("average", "concat")


@dataclass(frozen=True)
class MergeConfig(_JSONMixin):
    """What :func:`netfold.merge` does.

    Args:
        method: "fold" (k-means over the stacked channels of all models: merges across and
            within models), "weight-matching" (Ainsworth et al.: one permutation per group and
            model, coordinate descent over linear assignment problems, then the average),
            "zipit" (ZipIt!: greedy pairing of the most similar channels over the union of all
            models' channels, within-model pairs allowed) or "average" (plain weight averaging).
        repair: "none", "data" (REPAIR: BatchNorm statistics re-estimated and producers
            without BatchNorm given an affine correction on ``data``) or "dir" (the same on a
            Deep-Inversion batch synthesised from the models, an equal share from each;
            needs BatchNorm).
        width: merged width of every foldable group as a multiple of ONE model's width: 1.0
            keeps the architecture, 0.5 merges and compresses, up to the number of models
            (every channel kept: the models side by side). "weight-matching" and "average"
            need 1.0.
        seed: seeds k-means, the group order of coordinate descent and Deep Inversion.
        zip_layers: "zipit" only: merge the first N foldable groups (graph order) and keep the
            models apart after them (partial zipping); None merges every group.
        max_passes: bound on the coordinate-descent passes over all groups (each pass
            re-solves every group with the others' current alignment; stops early when no
            group changes).
        n_init / max_iter: k-means restarts and Lloyd iterations per group ("fold").
        outputs: "average" (the models' outputs, e.g. class logits, averaged: models trained on
            one task) or "concat" (the layers writing the model output are kept apart and
            stacked: the merged trunk feeds every model's own head and the merged model returns
            the M models' outputs concatenated, (N, M * n_out); models trained on disjoint
            label sets, as in ZipIt!).
        deep_inversion: synthesis settings for ``repair="dir"``.
    """

    method: str = "fold"
    repair: str = "none"
    width: float = 1.0
    seed: int = 0
    zip_layers: int | None = None
    max_passes: int = 10
    n_init: int = 10
    max_iter: int = 30
    outputs: str = "average"
    deep_inversion: DeepInversionConfig = field(default_factory=DeepInversionConfig)

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {MERGE_METHODS}")
        if self.repair not in MERGE_REPAIRS:
            raise ValueError(f"unknown repair {self.repair!r}; choose from {MERGE_REPAIRS}")
        if self.outputs not in MERGE_OUTPUTS:
            raise ValueError(f"unknown outputs {self.outputs!r}; choose from {MERGE_OUTPUTS}")
        w = self.width
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"width must be a finite number > 0, got {w!r}")
        if self.method in ("weight-matching", "average") and w != 1.0:
            raise ValueError(
                f"width must be 1.0 for method={self.method!r} (a permutation keeps the width); "
                "use method='fold' or 'zipit' to merge and compress"
            )
        if self.zip_layers is not None:
            if self.method != "zipit":
                raise ValueError("zip_layers is the partial zipping option of method='zipit'")
            if isinstance(self.zip_layers, bool) or not isinstance(self.zip_layers, int):
                raise ValueError(f"zip_layers must be an int >= 0, got {self.zip_layers!r}")
            if self.zip_layers < 0:
                raise ValueError(f"zip_layers must be >= 0, got {self.zip_layers}")
        for name in ("max_passes", "n_init", "max_iter"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.deep_inversion, DeepInversionConfig):
            raise TypeError(
                "deep_inversion must be a DeepInversionConfig, got "
                f"{type(self.deep_inversion).__name__}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MergeConfig:
        if isinstance(d, dict) and isinstance(d.get("deep_inversion"), dict):
            d = {**d, "deep_inversion": DeepInversionConfig.from_dict(d["deep_inversion"])}
        return super().from_dict(d)
