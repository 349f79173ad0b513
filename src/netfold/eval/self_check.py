"""Self-check of a folded decoder LLM: does it still predict the original model's own text?

Before a fold, the ORIGINAL model writes a few short sequences (held out: another seed than
any calibration text) and its per-token log-probabilities on them are kept; after the fold
the folded model scores the same tokens. The check reports both perplexities, their ratio and
the mean token KL divergence KL(original || folded). A fold that silently broke the model
(SmolLM2-135M with the uniform default at 10%: perplexity 15 -> thousands) shows up as a ratio
far above 1; an identity fold gives exactly 1.

It needs no data (the text is the model's own) and costs a few seconds on SmolLM2-135M
(4 x 64 tokens sampled, two forward passes). Used by :func:`netfold.fold.decoder.fold_decoder`
(``LLMConfig.self_check``); usable on its own::

    check = SelfCheck.before(model, ids)      # ids: (n, L) token ids, e.g. self-generated
    ...fold model in place...
    result = check.after(model)               # {"ratio": ..., "ppl_before": ..., ...}
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def token_log_probs(model: nn.Module, ids: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """Log-probabilities of every next token, (n, L - 1 - skip, vocab) float32.

    Args:
        model: a causal LM returning ``.logits`` (n, L, vocab); its mode is kept.
        ids: (n, L) token ids.
        skip: leading positions not scored (e.g. BOS and a random first token that the model
            did not write).
    """
    was = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, use_cache=False).logits[:, skip:-1].float()
    finally:
        model.train(was)
    return F.log_softmax(logits, dim=-1)


@dataclass
class SelfCheck:
    """The original model's scores on its own held-out text; :meth:`after` compares.

    Attributes:
        ids: (n, L) token ids the original model wrote.
        skip: leading positions not scored.
        log_probs: the original model's next-token log-probabilities (n, L - 1 - skip, vocab).
        seconds: time spent so far (sampling, if the caller adds it, and scoring).
    """

    ids: torch.Tensor
    skip: int
    log_probs: torch.Tensor
    seconds: float = 0.0

    @classmethod
    def before(cls, model: nn.Module, ids: torch.Tensor, skip: int = 0) -> SelfCheck:
        """Score ``ids`` (n, L) with the ORIGINAL model (call before folding)."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < skip + 2:
            raise ValueError(f"self-check ids must be (n, L) with L >= {skip + 2} token ids")
        t0 = time.perf_counter()
        lp = token_log_probs(model, ids, skip)
        return cls(ids, skip, lp, time.perf_counter() - t0)

    def targets(self) -> torch.Tensor:
        """The scored tokens, (n, L - 1 - skip)."""
        return self.ids[:, self.skip + 1 :]

    @torch.no_grad()
    def after(self, model: nn.Module, threshold: float = 3.0) -> dict[str, Any]:
        """Score the same tokens with the folded ``model`` and compare.

        Args:
            model: the folded model (same tokenizer and vocabulary).
            threshold: ``failed`` is True when the folded perplexity exceeds this multiple of
                the original's.

        Returns:
            ``{"ppl_before", "ppl_after", "ratio" (after / before), "kl" (mean token
            KL(original || folded), nats), "tokens" (scored), "sequences", "threshold",
            "failed", "seconds"}``.
        """
        t0 = time.perf_counter()
        lp = token_log_probs(model, self.ids, self.skip)
        tgt = self.targets().unsqueeze(-1)
        nll0 = -self.log_probs.gather(-1, tgt).mean().item()
        nll1 = -lp.gather(-1, tgt).mean().item()
        kl = (self.log_probs.exp() * (self.log_probs - lp)).sum(-1).mean().item()
        ppl0, ppl1 = _exp(nll0), _exp(nll1)
        ratio = _exp(nll1 - nll0)
        return {
            "ppl_before": ppl0,
            "ppl_after": ppl1,
            "ratio": ratio,
            "kl": kl,
            "tokens": int(tgt.numel()),
            "sequences": int(self.ids.shape[0]),
            "threshold": float(threshold),
            "failed": not ratio <= threshold,  # NaN counts as failed
            "seconds": self.seconds + time.perf_counter() - t0,
        }


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def warning_text(result: dict[str, Any]) -> str:
    """The Report warning for a failed self-check (one line)."""
    return (
        f"self-check FAILED: on {result['tokens']} tokens of the original model's own text the "
        f"folded model's perplexity is {result['ppl_after']:.4g} vs {result['ppl_before']:.4g} "
        f"({result['ratio']:.3g}x > {result['threshold']:g}x): the fold has likely broken the "
        "model; fold less (lower ratio / target_sparsity) or use allocation='cost'"
    )
