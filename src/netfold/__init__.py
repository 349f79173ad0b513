"""netfold: compress trained PyTorch networks by changing their structure, without data.

report = netfold.fold(model, netfold.FoldConfig(ratio=0.5, repair="ar"))
"""

from .api import fold
from .collapse import CollapseConfig, collapse
from .config import DeepInversionConfig, FoldConfig
from .fuse import FuseConfig, fuse
from .graph.trace import TraceError, find_groups
from .hub import load_saved as load
from .hub import save
from .merge import MergeConfig, merge
from .registry import register_arch
from .report import GroupReport, Report
from .scale import fold_folder

__all__ = [
    "CollapseConfig",
    "DeepInversionConfig",
    "FoldConfig",
    "FuseConfig",
    "GroupReport",
    "MergeConfig",
    "Report",
    "TraceError",
    "collapse",
    "find_groups",
    "fold",
    "fold_folder",
    "fuse",
    "load",
    "merge",
    "register_arch",
    "save",
]
__version__ = "0.1.0"
