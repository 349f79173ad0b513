"""Exact, verified fusion for inference.

``netfold.fuse(model, FuseConfig(), example_inputs=x)`` folds BatchNorms into neighbouring
Conv/Linear layers, multiplies out Linear chains with nothing nonlinear between them, moves
RMSNorm/LayerNorm weights into the projections that read them, and removes eval-time dropout.
Pairs are found from module structure plus a recorded eager forward (works on models torch.fx
cannot trace), every decision is logged, and the result is verified against the original (in
float64 too); a fusion that exceeds the tolerance is rolled back.
"""

from netfold.fuse.config import FuseConfig
from netfold.fuse.core import format_decision_log, fuse
from netfold.fuse.verify import Equivalence, verify_equivalence

__all__ = ["FuseConfig", "fuse", "format_decision_log", "verify_equivalence", "Equivalence"]
