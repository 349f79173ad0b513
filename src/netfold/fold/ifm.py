"""IFM, iterative feature merging (Chen et al., 2023), on folding's channel groups.

Repeatedly merges the closest pair of channels (squared distance of their coupled weights; the
merged channel is the count-weighted mean) until ``k`` remain. Its merge rule, as its authors
coded it, differs from folding's: producer rows are summed and consumer columns averaged
(merge rule "ifm" in :func:`netfold.fold.merge.merge_matrices`).
"""

from __future__ import annotations

import torch

from .cluster import greedy_pairing


def ifm_labels(X: torch.Tensor, k: int) -> torch.Tensor:
    """Closest-pair merging of the rows of ``X`` (n, d) down to ``k`` clusters: labels (n,)."""
    return greedy_pairing(X, k)
