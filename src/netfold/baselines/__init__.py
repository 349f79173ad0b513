"""Baselines on folding's channel groups, behind the same ``netfold.fold`` call and Report.

- :mod:`netfold.fold.magnitude`: structured magnitude pruning (L1 / L2 of the coupled channel
  weights), ``FoldConfig(method="magnitude-l1" | "magnitude-l2")``;
- :mod:`netfold.fold.ifm`: iterative feature merging (Chen et al., 2023),
  ``FoldConfig(method="ifm")``.

The scorers live in :mod:`netfold.fold` (the pipeline's one planning entry,
:func:`netfold.fold.methods.plan_group`, calls them); this package names them as baselines.

Both return the same kind of plan as a clusterer (labels per channel plus a merge rule for
:func:`netfold.fold.merge.merge_matrices`), so surgery, repairs and reports are shared.
"""

from ..fold.ifm import ifm_labels
from ..fold.magnitude import coupled_slices, magnitude_scores, top_k_labels

__all__ = ["coupled_slices", "ifm_labels", "magnitude_scores", "top_k_labels"]
