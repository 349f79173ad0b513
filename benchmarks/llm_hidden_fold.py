"""Folding the hidden size (residual stream) of SmolLM2-135M: a data-free try.

The residual stream is shared by every layer: one clustering of its dimensions has to serve the
token embedding (tied with the LM head), every layer's o_proj / down_proj rows (writers), every
RMSNorm and the q/k/v/gate/up columns (readers). With k of h dimensions kept, cluster c of N_c
members is stored as ``z_c = s_c * mean_{i in c} x_i`` with ``s_c = sqrt(N_c k / h)``, so the
RMSNorm over the k stored dimensions sees the RMS of the original h (exact when members are
equal); each norm's weight becomes ``1 / s_c`` and is folded, member by member, into the
columns of the layers that read it (summed per cluster); the final norm keeps
``mean_c(w) * h / k`` so the tied embedding can serve as the LM head. Features per dimension:
its writer rows and norm-weighted reader columns in every layer, and its embedding column.

The script first checks the algebra: ratio 0 is bit-identical and a tiny Llama with planted
duplicate residual dimensions folds exactly. Then it measures perplexity (the protocol of
benchmarks/llm_bench.py) at several ratios of the hidden size.

Run:
    python benchmarks/llm_hidden_fold.py --threads 2 --windows 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "llm_hidden_fold.json"


def hidden_features(model: nn.Module) -> torch.Tensor:
    """(h, F) coupled weights of each residual dimension (writers' rows, readers' columns)."""
    parts = [model.model.embed_tokens.weight.t()]
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        w1, w2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        parts += [a.o_proj.weight, m.down_proj.weight]
        parts += [(p.weight * w1).t() for p in (a.q_proj, a.k_proj, a.v_proj)]
        parts += [(p.weight * w2).t() for p in (m.gate_proj, m.up_proj)]
    return torch.cat([p.detach().float() for p in parts], 1)


@torch.no_grad()
def fold_hidden(model: nn.Module, labels: torch.Tensor, k: int) -> None:
    """Fold the residual stream of a Llama-layout model in place to ``k`` dimensions."""
    h = labels.numel()
    dt = torch.float64
    U = torch.zeros(h, k, dtype=dt)
    U[torch.arange(h), labels] = 1.0
    N = U.sum(0)
    A = (U / N).t()  # (k, h) mean per cluster
    s = torch.sqrt(N * k / h)

    def write(lin: nn.Linear) -> None:  # rows of a writer: scaled cluster means
        w = s[:, None] * (A @ lin.weight.to(dt))
        lin.weight = nn.Parameter(w.to(lin.weight.dtype))
        lin.out_features = k

    def read(lin: nn.Linear, norm_w: torch.Tensor) -> None:  # columns of a reader: summed
        w = (lin.weight.to(dt) * norm_w.to(dt)) @ U
        lin.weight = nn.Parameter(w.to(lin.weight.dtype))
        lin.in_features = k

    def set_norm(norm: nn.Module, value: torch.Tensor) -> None:
        norm.weight = nn.Parameter(value.to(norm.weight.dtype))

    emb = model.model.embed_tokens
    e = emb.weight.to(dt) @ A.t() * s  # (V, k)
    emb.weight = nn.Parameter(e.to(emb.weight.dtype))
    emb.embedding_dim = k
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        w1, w2 = (
            layer.input_layernorm.weight.detach(),
            layer.post_attention_layernorm.weight.detach(),
        )
        for p in (a.q_proj, a.k_proj, a.v_proj):
            read(p, w1)
        for p in (m.gate_proj, m.up_proj):
            read(p, w2)
        write(a.o_proj)
        write(m.down_proj)
        set_norm(layer.input_layernorm, 1.0 / s)
        set_norm(layer.post_attention_layernorm, 1.0 / s)
    wf = model.model.norm.weight.detach().to(dt)
    set_norm(model.model.norm, (A @ wf) * h / k)
    if model.lm_head.weight is not emb.weight:
        if getattr(model.config, "tie_word_embeddings", False):
            model.lm_head.weight = emb.weight
        else:
            read(model.lm_head, wf)
            set_norm(model.model.norm, 1.0 / s)
    model.lm_head.in_features = k
    model.config.hidden_size = k


def cluster_hidden(model: nn.Module, ratio: float, seed: int = 0) -> tuple[torch.Tensor, int]:
    from netfold.fold.cluster import cluster

    X = hidden_features(model)
    h = X.shape[0]
    k = max(1, int(round(h * (1.0 - ratio))))
    if k == h:
        return torch.arange(h), h
    return cluster(X, k, "kmeans", seed=seed, n_init=3).labels, k


def self_check() -> dict[str, float]:
    """Ratio 0 is the identity; planted duplicate residual dimensions fold exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        # plant: dimension j duplicates dimension i in every writer and norm weight
        pairs = [(0, 5), (3, 17), (8, 30)]
        ws = [model.model.embed_tokens.weight.t()]
        for layer in model.model.layers:
            ws += [layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight]
        norms = [model.model.norm.weight] + [
            n.weight
            for layer in model.model.layers
            for n in (layer.input_layernorm, layer.post_attention_layernorm)
        ]
        for w in norms:
            w.uniform_(0.5, 1.5)
        for i, j in pairs:
            for w in ws:
                w[j] = w[i]
            for w in norms:
                w[j] = w[i]
        ref = model(input_ids=x).logits
    ident = LlamaForCausalLM(cfg).eval()
    ident.load_state_dict(model.state_dict())
    fold_hidden(ident, torch.arange(32), 32)
    labels = torch.arange(32)
    for i, j in pairs:
        labels[j] = labels[i]
    labels = torch.unique(labels, return_inverse=True)[1]
    fold_hidden(model, labels, 29)
    with torch.no_grad():
        err0 = float((ident(input_ids=x).logits - ref).abs().max())
        err = float((model(input_ids=x).logits - ref).abs().max())
    assert err0 < 1e-5 and err < 1e-4, (err0, err)
    return {"ratio0_max_abs_err": err0, "planted_duplicates_max_abs_err": err}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ratios", default="0.0,0.02,0.05,0.1,0.2")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    import copy

    from netfold.atomic import write_json
    from netfold.bench.llm import PROMPT, smollm2_and_eval_ids, study_results
    from netfold.eval.cost import count_params
    from netfold.eval.perplexity import greedy_sample, perplexity
    from netfold.families.llama import embedding_params

    res = study_results(args.windows, self_check=self_check())
    model, tok, ids = smollm2_and_eval_ids(args.threads)
    dense = count_params(model)
    non_emb = dense - embedding_params(model)
    for r in [float(v) for v in args.ratios.split(",")]:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        labels, k = cluster_hidden(m, r)
        fold_hidden(m, labels, k)
        sec = time.perf_counter() - t0
        after = count_params(m)
        row = {
            "hidden_ratio": r,
            "hidden_size": k,
            "sparsity": 1 - after / dense,
            "non_embedding_sparsity": 1 - (after - embedding_params(m)) / non_emb,
            "cluster_sizes_max": int(torch.bincount(labels).max()),
            "seconds": sec,
            "ppl": perplexity(m, tok, ids=ids, seqlen=1024, max_windows=args.windows),
            "sample": greedy_sample(m, tok, PROMPT, max_new_tokens=24),
        }
        res["rows"].append(row)
        print(json.dumps({k: row[k] for k in ("hidden_ratio", "hidden_size", "ppl")}), flush=True)
        write_json(args.out, res)
        del m
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
