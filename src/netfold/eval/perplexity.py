"""Perplexity with the pruning papers' protocol, greedy generation samples, an lm-eval bridge.

Protocol: tokenize the whole text as one stream, cut it into non-overlapping windows of
``seqlen`` tokens (tail dropped), score every next token of every window, and report
``exp(mean NLL)``. ``seqlen`` defaults to 2048, or the model's maximum context if smaller.

    from netfold.eval.perplexity import perplexity
    ppl = perplexity(model, tokenizer, text, seqlen=1024)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.text import token_windows


def default_seqlen(model: nn.Module, seqlen: int | None = None) -> int:
    """``seqlen`` or 2048, capped by ``config.max_position_embeddings`` when the model has one."""
    s = 2048 if seqlen is None else int(seqlen)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(s, int(limit)) if isinstance(limit, int) and limit > 0 else s


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Summed next-token NLL of each window: windows (n, seqlen) -> (n,) float64."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i : i + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
        )
        out.append(nll.reshape(x.shape[0], -1).sum(1).double().cpu())
    return torch.cat(out)


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str | None = None,
    *,
    ids: torch.Tensor | None = None,
    seqlen: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
) -> float:
    """exp(mean token NLL) over non-overlapping windows of one token stream.

    Args:
        model: a causal LM returning ``.logits`` (batch, seq, vocab); its mode is kept.
        tokenizer: a Hugging Face tokenizer (unused when ``ids`` is given).
        text: the evaluation text.
        ids: (T,) pre-tokenized stream instead of ``text``.
        seqlen: window length (default: 2048 or the model's maximum if smaller).
        max_windows: score only the first this many windows.
        batch_size: windows per forward pass.

    Returns:
        The perplexity (inf when the mean NLL overflows).
    """
    if ids is None:
        if text is None:
            raise ValueError("perplexity needs text or ids")
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
    windows = token_windows(ids, default_seqlen(model, seqlen), max_windows)
    was_training = model.training
    model.eval()
    try:
        nll = window_nll(model, windows, batch_size)
    finally:
        model.train(was_training)
    mean = float(nll.sum()) / (windows.shape[0] * (windows.shape[1] - 1))
    return math.exp(mean) if mean < 700 else math.inf


@torch.no_grad()
def greedy_sample(
    model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32, chat: bool = True
) -> str:
    """Greedy continuation of ``prompt`` (through the chat template when the tokenizer has one)."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    device = next(model.parameters()).device
    out = model.generate(
        ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
