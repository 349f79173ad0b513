"""ShortGPT-style layer dropping for Llama-family decoders: the data-driven reference baseline.

Block Influence of decoder layer l on calibration text (Men et al., 2024, "ShortGPT"):
``BI_l = 1 - E_tokens[cos(h_l, h_{l+1})]`` with h_l the residual stream entering layer l. The
layers with the lowest BI are removed; the model stays a stock Hugging Face model (fewer
``num_hidden_layers``), so ``save_pretrained`` / ``from_pretrained`` round-trip.

    bi = block_influence(model, ids)            # ids: (n, seqlen) calibration token ids
    report = drop_layers(model, target_sparsity=0.2, data=ids)
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from ..eval.cost import count_params
from ..report import Report
from .llama import _layers, check_supported, embedding_params


@torch.no_grad()
def block_influence(model: nn.Module, data: torch.Tensor) -> torch.Tensor:
    """BI of every decoder layer, (n_layers,) float64, from calibration ids (n, seqlen)."""
    check_supported(model)
    if not isinstance(data, torch.Tensor) or data.dim() != 2:
        raise ValueError("calibration data must be token ids of shape (n, seqlen)")
    layers = _layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    was = model.training
    model.eval()
    try:
        for i in range(data.shape[0]):
            out = model(
                input_ids=data[i : i + 1].long(), output_hidden_states=True, use_cache=False
            )
            hs = out.hidden_states  # n_layers + 1 (the last after the final norm)
            for j in range(len(layers)):
                a = hs[j][0].double()
                b = hs[j + 1][0].double() if j + 1 < len(layers) else None
                if b is None:  # the last hidden state is normed; recompute the raw output
                    continue
                sums[j] += (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).sum()
            count += hs[0].shape[1]
    finally:
        model.train(was)
    bi = sums / count
    # The last layer's raw output is not exposed (hidden_states[-1] is normalised): never drop it.
    bi[-1] = float("inf")
    return bi


def drop_layers(
    model: nn.Module,
    *,
    n_drop: int | None = None,
    target_sparsity: float | None = None,
    data: torch.Tensor | None = None,
    influence: torch.Tensor | None = None,
) -> Report:
    """Remove the decoder layers with the lowest Block Influence, in place.

    Args:
        n_drop: layers to remove; or ``target_sparsity`` of non-embedding parameters (rounded
            to whole layers, at least that fraction).
        data: calibration ids (n, seqlen), unless ``influence`` is given.
        influence: precomputed :func:`block_influence`.

    Returns:
        A Report (``extra``: dropped layer indices, BI, non-embedding sparsity).
    """
    t0 = time.perf_counter()
    check_supported(model)
    layers = _layers(model)
    n = len(layers)
    before = count_params(model)
    emb = embedding_params(model)
    if n_drop is None:
        if target_sparsity is None:
            raise ValueError("pass n_drop or target_sparsity")
        per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        target = target_sparsity * (before - emb)
        order_sizes = sorted(per_layer)
        n_drop, acc = 0, 0
        while acc < target - 1e-9 and n_drop < n - 1:
            acc += order_sizes[n_drop]
            n_drop += 1
    if not 0 <= n_drop < n:
        raise ValueError(f"n_drop must lie in [0, {n - 1}], got {n_drop}")
    if influence is None:
        if data is None:
            raise ValueError("layer dropping needs calibration token ids: pass data=(n, seqlen)")
        influence = block_influence(model, data)
    drop = sorted(torch.argsort(influence)[:n_drop].tolist())
    keep = [i for i in range(n) if i not in drop]
    model.model.layers = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    widths = getattr(cfg, "netfold_layer_widths", None)
    if isinstance(widths, list):
        cfg.netfold_layer_widths = [widths[i] for i in keep]
    after = count_params(model)
    report = Report(operation="drop_layers", params_before=before, params_after=after)
    report.extra.update(
        dropped_layers=drop,
        block_influence=[float(v) for v in influence],
        non_embedding_sparsity=1 - (after - emb) / (before - emb),
    )
    report.seconds = time.perf_counter() - t0
    return report
