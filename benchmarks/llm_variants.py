"""SmolLM2-135M: allocation floors and down_proj refits at fixed non-embedding sparsity.

The data-free allocation's error curves are concave (the first folding step of a layer costs
the most), so its greedy pass drives a few layers to the smallest grid width. This script asks
whether spreading the budget (a floor on the kept fraction, applied to the curves here) and which
down_proj refit (none, Gaussian "lsq", self-generated "diag" / "full", calibration "diag" /
"full") give the lowest perplexity. It reuses the error curves stored in
benchmarks/results/llm_curves_8seq.json (measured by benchmarks/llm_bench.py on 8 sequences of
the model's own text, data-free).

Run:
    python benchmarks/llm_variants.py --threads 2 --windows 4
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "llm_variants.json"
CURVES = HERE / "results" / "llm_curves_8seq.json"

# (name, target, min_keep, FoldConfig kwargs, LLMConfig kwargs, data source)
VARIANTS: list[tuple[str, float, float, dict[str, Any], dict[str, Any], str | None]] = [
    ("cost-floor25", 0.1, 0.25, {"repair": "none"}, {}, None),
    ("cost-floor50", 0.1, 0.5, {"repair": "none"}, {}, None),
    ("cost-floor375", 0.1, 0.375, {"repair": "none"}, {}, None),
    ("cost-floor50+lsq", 0.1, 0.5, {"repair": "ar"}, {"correction": "lsq"}, None),
    ("cost-floor50+dir-diag", 0.1, 0.5, {"repair": "dir"}, {"refit": "diag"}, "self"),
    ("cost-floor50+dir-full", 0.1, 0.5, {"repair": "dir"}, {"refit": "full"}, "self"),
    ("cost-floor50+data-diag", 0.1, 0.5, {"repair": "data"}, {"refit": "diag"}, "calib"),
    ("cost-floor50+data-full", 0.1, 0.5, {"repair": "data"}, {"refit": "full"}, "calib"),
    ("cost-floor25+dir-diag", 0.1, 0.25, {"repair": "dir"}, {"refit": "diag"}, "self"),
    ("cost-floor50", 0.2, 0.5, {"repair": "none"}, {}, None),
    ("cost-floor375", 0.2, 0.375, {"repair": "none"}, {}, None),
    ("cost-floor50+dir-diag", 0.2, 0.5, {"repair": "dir"}, {"refit": "diag"}, "self"),
    ("cost-floor50+data-full", 0.2, 0.5, {"repair": "data"}, {"refit": "full"}, "calib"),
    ("cost-floor25+data-full", 0.1, 0.25, {"repair": "data"}, {"refit": "full"}, "calib"),
    ("cost-floor125", 0.1, 0.125, {"repair": "none"}, {}, None),
    ("cost-floor6", 0.1, 0.0625, {"repair": "none"}, {}, None),
    ("cost-floor125+dir-diag", 0.1, 0.125, {"repair": "dir"}, {"refit": "diag"}, "self"),
    ("cost-floor6+dir-diag", 0.1, 0.0625, {"repair": "dir"}, {"refit": "diag"}, "self"),
    ("cost-floor125", 0.2, 0.125, {"repair": "none"}, {}, None),
    ("cost-floor6", 0.2, 0.0625, {"repair": "none"}, {}, None),
    ("cost-floor125+dir-diag", 0.2, 0.125, {"repair": "dir"}, {"refit": "diag"}, "self"),
    ("cost-floor6+dir-diag", 0.2, 0.0625, {"repair": "dir"}, {"refit": "diag"}, "self"),
    ("cost-floor25+data-full", 0.2, 0.25, {"repair": "data"}, {"refit": "full"}, "calib"),
    ("cost-floor25+dir64-full", 0.1, 0.25, {"repair": "dir"}, {"refit": "full"}, "self64"),
    (
        "cost-floor25+dir64-full-r1e-2",
        0.1,
        0.25,
        {"repair": "dir"},
        {"refit": "full", "ridge": 1e-2},
        "self64",
    ),
    (
        "cost-floor25+dir64-full-r1e-1",
        0.1,
        0.25,
        {"repair": "dir"},
        {"refit": "full", "ridge": 1e-1},
        "self64",
    ),
    ("cost-floor25+dir64-diag", 0.1, 0.25, {"repair": "dir"}, {"refit": "diag"}, "self64"),
    ("cost-floor25+dir64-full", 0.2, 0.25, {"repair": "dir"}, {"refit": "full"}, "self64"),
    ("cost-floor25+dir-diag", 0.2, 0.25, {"repair": "dir"}, {"refit": "diag"}, "self"),
    ("cost-floor25+dir64-diag", 0.2, 0.25, {"repair": "dir"}, {"refit": "diag"}, "self64"),
    ("cost-floor6+dir64-diag", 0.2, 0.0625, {"repair": "dir"}, {"refit": "diag"}, "self64"),
    ("cost-floor6+dir64-diag", 0.1, 0.0625, {"repair": "dir"}, {"refit": "diag"}, "self64"),
    ("cost-floor6+dir64-full", 0.2, 0.0625, {"repair": "dir"}, {"refit": "full"}, "self64"),
    ("cost-floor125+dir64-full", 0.2, 0.125, {"repair": "dir"}, {"refit": "full"}, "self64"),
    ("cost-floor6+data-full", 0.2, 0.0625, {"repair": "data"}, {"refit": "full"}, "calib"),
    ("cost-floor25+dir64t07-full", 0.1, 0.25, {"repair": "dir"}, {"refit": "full"}, "self64-t07"),
    ("cost-floor25+dir64t07-full", 0.2, 0.25, {"repair": "dir"}, {"refit": "full"}, "self64-t07"),
    ("cost-floor25+dir64t07-diag", 0.1, 0.25, {"repair": "dir"}, {"refit": "diag"}, "self64-t07"),
]
DEEP = HERE / "results" / "llm_curves_deep.json"
DEEP_GRID = (0.125, 0.0625)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--only", help="comma-separated name@target")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    import netfold
    from netfold.atomic import write_json
    from netfold.bench.llm import smollm2_and_eval_ids, study_results
    from netfold.config import FoldConfig, LLMConfig
    from netfold.data.text import calibration_windows
    from netfold.eval.cost import count_params
    from netfold.eval.perplexity import perplexity
    from netfold.families.llama import (
        allocate_by_cost,
        embedding_params,
        find_llm_groups,
        mlp_error_curves,
        self_generated_ids,
    )

    model, tok, ids = smollm2_and_eval_ids(args.threads)
    curves = json.loads(CURVES.read_text())["allocation_curves"]["curves"]
    llm = LLMConfig()
    data = {
        "self": self_generated_ids(model, 8, llm.synth_length, 0),  # the former default
        "calib": calibration_windows(tok, 512, 8),
    }
    if any(v[5] == "self64" for v in VARIANTS):
        data["self64"] = self_generated_ids(model, 64, llm.synth_length, 0)
    if any(v[5] == "self64-t07" for v in VARIANTS):
        data["self64-t07"] = self_generated_ids(model, 64, llm.synth_length, 0, 0.7, 0.95)
    out = Path(args.out)
    res = study_results(args.windows, out, curves_from=str(CURVES.relative_to(HERE.parent)))
    done = {(r["method"], r["target"]) for r in res["rows"]}
    if ("dense", 0.0) not in done:
        res["rows"].append(
            {
                "method": "dense",
                "target": 0.0,
                "ppl": perplexity(model, tok, ids=ids, seqlen=1024, max_windows=args.windows),
            }
        )
    groups = find_llm_groups(model)
    if any(v[2] < 0.25 for v in VARIANTS):
        # the committed curves stop at 25%: add the deeper grid points (same protocol)
        if not DEEP.is_file():
            t0 = time.perf_counter()
            mlp = [g for g in groups if g.name.endswith(".mlp")]
            wcfg = FoldConfig(n_init=3, llm=LLMConfig(features="weights"))
            deep = mlp_error_curves(model, mlp, wcfg, data["self"], DEEP_GRID)
            write_json(
                DEEP, {"grid": DEEP_GRID, "seconds": time.perf_counter() - t0, "curves": deep}
            )
        deep = json.loads(DEEP.read_text())["curves"]
        curves = {k: v + deep[k][1:] for k, v in curves.items()}
    dense = count_params(model)
    non_emb = dense - embedding_params(model)
    only = set(args.only.split(",")) if args.only else None
    for name, target, floor, fk, lk, src in VARIANTS:
        if (name, target) in done or (only and f"{name}@{target}" not in only):
            continue
        cut = {k: [p for p in v if p[0] >= round(1536 * floor)] for k, v in curves.items()}
        # this study predates activation features: it pins the weight features it measured
        lk = {"features": "weights", **lk}
        cfg = FoldConfig(target_sparsity=target, n_init=3, llm=LLMConfig(**lk), **fk)
        widths = allocate_by_cost(model, groups, cfg, dense - target * non_emb, None, cut)
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        rep = netfold.fold(m, cfg, data=data.get(src) if src else None, widths=widths)
        sec = time.perf_counter() - t0
        ppl = perplexity(m, tok, ids=ids, seqlen=1024, max_windows=args.windows)
        row = {
            "method": name,
            "target": target,
            "min_keep": floor,
            "data": src,
            "config": cfg.to_dict(),
            "non_embedding_sparsity": rep.extra["non_embedding_sparsity"],
            "widths": {k: v for k, v in widths.items()},
            "seconds": sec,
            "ppl": ppl,
        }
        res["rows"].append(row)
        print(json.dumps({k: row[k] for k in ("method", "target", "ppl", "seconds")}), flush=True)
        write_json(out, res)
        del m
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
