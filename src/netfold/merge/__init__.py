"""netfold.merge: model folding across several networks, beside Weight Matching, ZipIt! and averaging.

merged, report = netfold.merge([a, b], netfold.MergeConfig(method="fold"))
"""

from .config import MERGE_METHODS, MERGE_OUTPUTS, MERGE_REPAIRS, MergeConfig
from .core import Alignment, merge, synthesize_merge_batch

__all__ = [
    "MERGE_METHODS",
    "MERGE_OUTPUTS",
    "MERGE_REPAIRS",
    "Alignment",
    "MergeConfig",
    "merge",
    "synthesize_merge_batch",
]
