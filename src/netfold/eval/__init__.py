"""Evaluation helpers (accuracy and friends)."""
