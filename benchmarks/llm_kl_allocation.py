"""SmolLM2-135M: allocate the MLP budget by end-to-end KL on self-generated text (data-free).

``allocation="cost"`` scores each MLP by its local error (how much folding it changes the
residual stream). This script scores each MLP instead by what folding it alone to 25% of its
channels does to the model's output: the mean KL divergence between the dense and the folded
next-token distributions on text the model sampled itself (no external data). Layers are then
folded to 25% in order of increasing KL per parameter removed until the target is met (the last
one at the grid width that meets it), and perplexity is measured with the protocol of
benchmarks/llm_bench.py.

Run:
    python benchmarks/llm_kl_allocation.py --threads 2 --windows 4
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "llm_kl_allocation.json"
GRID = (0.875, 0.75, 0.625, 0.5, 0.375, 0.25)


@torch.no_grad()
def mean_kl(model, ids: torch.Tensor, ref_logp: torch.Tensor) -> float:
    """Mean over tokens of KL(dense || model) of the next-token distributions."""
    logp = F.log_softmax(model(input_ids=ids).logits.float(), -1)
    return float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--sequences", type=int, default=16, help="self-generated sequences for KL")
    ap.add_argument("--targets", default="0.1,0.2")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    import netfold
    from netfold.atomic import write_json
    from netfold.bench.llm import smollm2_and_eval_ids, study_results
    from netfold.config import FoldConfig, LLMConfig
    from netfold.eval.cost import count_params
    from netfold.eval.perplexity import perplexity
    from netfold.families.llama import embedding_params, find_llm_groups, self_generated_ids
    from netfold.fold.plan import params_removed

    model, tok, ids = smollm2_and_eval_ids(args.threads)
    t0 = time.perf_counter()
    text = self_generated_ids(model, args.sequences, 128, seed=1)  # not the refit's text
    with torch.no_grad():
        ref = F.log_softmax(model(input_ids=text).logits.float(), -1)
    mlps = [g for g in find_llm_groups(model) if g.name.endswith(".mlp")]
    cfg = FoldConfig(n_init=3, repair="none", llm=LLMConfig(features="weights"))
    kl: dict[str, float] = {}
    for g in mlps:
        m = copy.deepcopy(model)
        netfold.fold(m, cfg, widths={g.name: int(g.size * 0.25)})
        kl[g.name] = mean_kl(m, text, ref)
        print(json.dumps({"group": g.name, "kl_at_25pct": kl[g.name]}), flush=True)
        del m
    scan_seconds = time.perf_counter() - t0
    dense = count_params(model)
    non_emb = dense - embedding_params(model)
    res = study_results(
        args.windows,
        kl_text={"sequences": args.sequences, "length": 128, "seed": 1},
        kl_at_25pct=kl,
        scan_seconds=scan_seconds,
    )
    by = {g.name: g for g in mlps}
    order = sorted(kl, key=lambda n: kl[n])
    for target in [float(t) for t in args.targets.split(",")]:
        budget = target * non_emb
        widths: dict[str, int] = {}
        saved = 0.0
        for name in order:
            if saved >= budget:
                break
            g = by[name]
            for frac in GRID:  # the widest grid width that meets the rest of the budget
                w = int(g.size * frac)
                if saved + params_removed(model, g, w) >= budget or frac == GRID[-1]:
                    break
            widths[name] = w
            saved += params_removed(model, g, w)
        for repair, data in (("none", None), ("dir", None)):
            m = copy.deepcopy(model)
            t1 = time.perf_counter()
            rep = netfold.fold(
                m,
                FoldConfig(n_init=3, repair=repair, llm=LLMConfig(features="weights")),
                data=data,
                widths=dict(widths),
            )
            row = {
                "target": target,
                "repair": repair,
                "widths": widths,
                "non_embedding_sparsity": rep.extra["non_embedding_sparsity"],
                "seconds": time.perf_counter() - t1,
                "ppl": perplexity(m, tok, ids=ids, seqlen=1024, max_windows=args.windows),
            }
            res["rows"].append(row)
            print(json.dumps({k: row[k] for k in ("target", "repair", "ppl")}), flush=True)
            write_json(args.out, res)
            del m
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
