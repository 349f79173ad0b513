"""Experiment sweeps (model x method x repair x ratio) and their plots: ``netfold bench``."""

from .plots import plot_file, plot_results, results_table
from .sweep import merge_results, run_sweep, validate

__all__ = ["plot_file", "plot_results", "merge_results", "results_table", "run_sweep", "validate"]
