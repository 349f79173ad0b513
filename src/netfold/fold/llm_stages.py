"""Bookkeeping of the decoder fold: time per stage, and the self-check around the write.

Kept apart from :mod:`netfold.fold.decoder` so the fold itself stays about folding.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch.nn as nn

from ..config import FoldConfig
from ..eval.self_check import SelfCheck, warning_text
from ..report import Report

#: Offset added to ``FoldConfig.seed`` for the self-check's text, so it is held out from the
#: self-generated calibration text (sampled with ``seed``).
SELF_CHECK_SEED_OFFSET = 7919


class Stages:
    """Wall seconds per named stage, summed over repeated entries (insertion ordered)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def self_check_before(model: nn.Module, config: FoldConfig, sample: Any) -> SelfCheck | None:
    """Sample the held-out text from the ORIGINAL model and score it (None when switched off).

    Args:
        model: the decoder before folding.
        config: its FoldConfig (``llm.self_check*``, ``seed``, ``llm.synth_start``).
        sample: ``(model, n, length, seed, start) -> (n, length) ids``, the decoder's sampler.
    """
    llm = config.llm
    if not llm.self_check:
        return None
    t0 = time.perf_counter()
    ids = sample(
        model,
        llm.self_check_sequences,
        llm.self_check_length,
        config.seed + SELF_CHECK_SEED_OFFSET,
        llm.synth_start,
    )
    # BOS (and the random first token) were not written by the model: not scored
    skip = 2 if llm.synth_start == "random" else 1
    check = SelfCheck.before(model, ids, skip=skip)
    check.seconds = time.perf_counter() - t0
    return check


def self_check_after(
    report: Report, model: nn.Module, check: SelfCheck | None, config: FoldConfig
) -> None:
    """Score the folded ``model``; ``report.extra["self_check"]`` and a warning if it failed."""
    if check is None:
        return
    res = check.after(model, config.llm.self_check_threshold)
    report.extra["self_check"] = res
    if res["failed"]:
        report.warnings.append(warning_text(res))
