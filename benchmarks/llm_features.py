"""SmolLM2-135M: what k-means clusters MLP channels on, and which self-generated text, at fixed widths.

Every variant folds the same MLP groups to the same widths (the data-free allocation of
benchmarks/results/llm_curves_8seq.json with a 25% floor, the variant study's widths, at 10% and
20% non-embedding sparsity) and changes one thing at a time:

- features: "w" (weights: [gate * s | up * s | down columns], the former default), "a" (each
  channel's activations h_i(x) on the text's token rows, ``LLMConfig(features="activations")``),
  "a-d" (activations times ||down_i||) and "a-sqrtd" (times sqrt(||down_i||));
- text: 64 x 128 tokens the model samples itself, from BOS ("bos") or from BOS plus one uniform
  random token ("random", LLM-QAT's recipe, ``LLMConfig(synth_start="random")``); data-free both;
- refit of down_proj on the same text: none, diag, full.

Run:
    python benchmarks/llm_features.py --threads 1 --windows 4
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "llm_features.json"
CURVES = HERE / "results" / "llm_curves_8seq.json"
FEATURES = ("w", "a", "a-d", "a-sqrtd")
REFITS = {"none": "none", "diag": "lsq", "full": "data"}  # merge_mlp's correction names


def variants() -> list[tuple[float, str, str, str]]:
    """(target, text start, features, refit), the informative ones first."""
    out = []
    for target in (0.1, 0.2):
        for start in ("random", "bos"):
            for feat in FEATURES if start == "random" else ("w", "a"):
                for refit in REFITS:
                    out.append((target, start, feat, refit))
    return out


def features(kind: str, x: torch.Tensor, gate, up, down, model, g) -> torch.Tensor:
    """(I, d) clustering features of one SwiGLU group."""
    from netfold.fold import llm as L

    if kind == "w":
        return L.mlp_features(model, g)
    X = L.mlp_activation_features(x, (gate, up), L.activation(model, g))
    if kind == "a-d":
        X = X * down.norm(dim=0)[:, None]
    elif kind == "a-sqrtd":
        X = X * down.norm(dim=0).sqrt()[:, None]
    return X


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    from netfold.atomic import write_json
    from netfold.bench.llm import smollm2_and_eval_ids, study_results
    from netfold.config import FoldConfig, LLMConfig
    from netfold.eval.cost import count_params
    from netfold.eval.perplexity import perplexity
    from netfold.families import llama as FL
    from netfold.fold import llm as L
    from netfold.graph.surgery import apply_tensors, get_module

    model, tok, ids = smollm2_and_eval_ids(args.threads)
    curves = json.loads(CURVES.read_text())["allocation_curves"]["curves"]
    curves = {k: [p for p in v if p[0] >= 384] for k, v in curves.items()}  # 25% floor
    groups = FL.find_llm_groups(model)
    by_name = {g.name: g for g in groups}
    dense = count_params(model)
    non_emb = dense - FL.embedding_params(model)
    llm = LLMConfig()
    out = Path(args.out)
    res = study_results(
        args.windows,
        out,
        widths_from=str(CURVES.relative_to(HERE.parent)) + " (floor 25%)",
        text={"sequences": llm.synth_sequences, "length": llm.synth_length, "seed": 0},
    )
    done = {(r["target"], r["start"], r["features"], r["refit"]) for r in res["rows"]}
    if not any(r.get("method") == "dense" for r in res["rows"]):
        p = perplexity(model, tok, ids=ids, seqlen=1024, max_windows=args.windows)
        res["rows"].append({"method": "dense", "ppl": p})
    texts: dict[str, Any] = {}
    for target, start, feat, refit in variants():
        if (target, start, feat, refit) in done:
            continue
        if start not in texts:
            t = FL.self_generated_ids(model, llm.synth_sequences, llm.synth_length, 0, start=start)
            texts[start] = FL.collect_mlp_inputs(model, t, seed=0)
        inputs = texts[start]
        cfg = FoldConfig(target_sparsity=target, n_init=3, llm=llm)
        widths = FL.allocate_by_cost(model, groups, cfg, dense - target * non_emb, None, curves)
        t0 = time.perf_counter()
        state: dict = {}
        for name, k in widths.items():
            g = by_name[name]
            x = inputs[name]
            gate, up = (get_module(model, p).weight.detach().double() for p in g.producers)
            down = get_module(model, g.consumers[0].module).weight.detach().double()
            prot = L.protected_channels(L.channel_gain(model, g), llm.protect)
            X = features(feat, x, gate, up, down, model, g)
            c = FL._cluster_protected(X, k, prot, cfg)
            how = REFITS[refit]
            L.merge_mlp(state, model, g, c.labels, k, how, x if how != "none" else None, llm.ridge)
        sec = time.perf_counter() - t0
        m = copy.deepcopy(model)
        apply_tensors(m, state)
        FL.sync_decoder(m)
        row = {
            "target": target,
            "start": start,
            "features": feat,
            "refit": refit,
            "non_embedding_sparsity": 1 - (count_params(m) - FL.embedding_params(m)) / non_emb,
            "widths": widths,
            "seconds": sec,
            "ppl": perplexity(m, tok, ids=ids, seqlen=1024, max_windows=args.windows),
        }
        res["rows"].append(row)
        print(json.dumps({k: row[k] for k in ("target", "start", "features", "refit", "ppl")}))
        write_json(out, res)
        del m
    print(table(res))
    return 0


def table(res: dict[str, Any]) -> str:
    """Markdown: perplexity per (text, features) and refit, one column block per target."""
    dense = next(r["ppl"] for r in res["rows"] if r.get("method") == "dense")
    rows = [r for r in res["rows"] if "features" in r]
    targets = sorted({r["target"] for r in rows})
    head = "| text | features | " + " | ".join(
        f"{100 * t:.0f}% {f}" for t in targets for f in REFITS
    )
    lines = [head + " |", "|---|---|" + "---:|" * (len(targets) * len(REFITS))]
    keys = list(dict.fromkeys((r["start"], r["features"]) for r in rows))
    for start, feat in keys:
        cells = []
        for t in targets:
            for f in REFITS:
                r = next(
                    (
                        r
                        for r in rows
                        if (r["start"], r["features"], r["target"], r["refit"])
                        == (start, feat, t, f)
                    ),
                    None,
                )
                cells.append("" if r is None else f"{r['ppl']:.2f} ({r['ppl'] / dense:.2f}x)")
        lines.append(f"| {start} | {feat} | " + " | ".join(cells) + " |")
    return f"dense {dense:.2f}\n" + "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
