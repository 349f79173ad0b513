"""Shared pieces of the SmolLM2-135M studies in ``benchmarks/llm_*.py``.

The model (:func:`netfold.hub.load_smollm2`), the evaluation ids (the Python-docs evaluation
split, :func:`netfold.data.text.load_text`), the sample prompt and the results header
(command, machine, git revision, evaluation protocol).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from . import meta

__all__ = ["PROMPT", "smollm2_and_eval_ids", "study_results"]

PROMPT = "What is the capital of France?"


def study_results(windows: int, out: str | Path | None = None, **fields: Any) -> dict[str, Any]:
    """Results header of a SmolLM2 study: command, machine, git revision, the evaluation protocol
    (pydocs eval split, 1024-token windows) and ``fields``; ``rows`` are those already in ``out``
    (a resumed run), else empty."""
    res: dict[str, Any] = meta.header(
        eval={"text": "pydocs eval split", "seqlen": 1024, "windows": windows},
        **fields,
        rows=[],
    )
    if out is not None and Path(out).is_file():
        res["rows"] = json.loads(Path(out).read_text())["rows"]
    return res


def smollm2_and_eval_ids(threads: int) -> tuple[torch.nn.Module, Any, torch.Tensor]:
    """(model, tokenizer, evaluation token ids (T,)) with quiet transformers logging and
    ``threads`` torch threads."""
    import transformers

    from ..data.text import load_text
    from ..hub import load_smollm2

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    model, tok = load_smollm2()
    return model, tok, tok(load_text("pydocs"), return_tensors="pt").input_ids[0]
