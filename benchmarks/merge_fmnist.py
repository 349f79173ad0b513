"""Model merging on Fashion-MNIST: the shape of the model-folding paper's Tables 1-2.

Run (one process per architecture and setting; ``--pair-index 2`` in a second process runs the
third pair in parallel; a pair already in ``--out`` with the same settings is not redone):
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/merge_fmnist.py \
        --arch vgg11_bn_cifar --setting same --out /tmp/merge_vgg11_bn_cifar_same.json
    ... likewise for resnet18_cifar and --setting split, then
    PYTHONPATH=src .venv/bin/python benchmarks/merge_fmnist.py --combine /tmp/merge_*.json \
        --out benchmarks/results/merge_fmnist.json --plot benchmarks/results/merge_fmnist.png
    PYTHONPATH=src .venv/bin/python benchmarks/merge_fmnist.py \
        --table benchmarks/results/merge_fmnist.json

Two settings per architecture, three model pairs each:

- ``same``: three models trained on all ten classes from seeds 0, 1, 2; pairs (0,1), (1,2),
  (0,2). The merged model's logits are scored like one model's; the ensemble averages the two
  models' logits.
- ``split``: model A trained on labels 0-4 (seed i), model B on labels 5-9 (seed 10 + i), each
  with its own 5-output head (``netfold.models.train.get_trained(classes=...)``); pairs
  i = 0, 1, 2. Merged with ``MergeConfig(outputs="concat")``: the merged trunk feeds both
  heads, and the prediction is the argmax over the concatenated 10 logits ("joint" accuracy on
  all ten classes, as ZipIt! reports it); per-task accuracies use one head on its five classes.
  The ensemble runs both full models and concatenates their logits.

Rows: the two endpoints (their joint accuracy; for ``split`` at most ~50%), their ensemble, and
every method (weight matching, ZipIt!, fold, plain averaging) with ``repair="data"`` (REPAIR on
--calib training images; ZipIt!'s correlations on the same images) and with the data-free
Deep-Inversion repair (``repair="dir"``: one synthetic batch per pair, an equal share
synthesised from each model, reused by every method; ZipIt! then correlates activations on the
synthetic batch), plus "fold-merge and compress": two models into one of half one model's width
(``MergeConfig(method="fold", width=0.5)``).

Models are trained (or reused from the checkpoint cache) with the settings in ``ARCHS``; they
were reduced from the training presets to fit the shared 2-core CPU (see docs/merge.md).
Accuracies are measured on a fixed, seeded subset of the Fashion-MNIST test split
(--test-subset, default 2,000 of 10,000 images; 0 = all).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netfold.atomic import write_json
from netfold.bench.sweep import git_revision
from netfold.config import DeepInversionConfig
from netfold.data.fashion_mnist import calibration_batches, load_fashion_mnist
from netfold.eval.latency import machine_info
from netfold.merge import MergeConfig, merge, synthesize_merge_batch
from netfold.models.train import get_trained

#: Training settings per architecture (epochs over the images of a model's classes).
ARCHS: dict[str, dict[str, Any]] = {
    "vgg11_bn_cifar": {"width": 0.5, "epochs": 1, "train_subset": None},
    "resnet18_cifar": {"width": 0.25, "epochs": 1, "train_subset": 20000},
}
TASK_A, TASK_B = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
SAME_PAIRS = ((0, 1), (1, 2), (0, 2))
SPLIT_PAIRS = ((0, 10), (1, 11), (2, 12))
METHODS = ("weight-matching", "zipit", "fold", "average")
#: (row name, method, repair, width) of every merged model, in table order.
ROWS: tuple[tuple[str, str, str, float], ...] = tuple(
    (f"{m}/{r}", m, r, 1.0) for r in ("data", "dir") for m in METHODS
) + (("fold-w0.5/data", "fold", "data", 0.5), ("fold-w0.5/dir", "fold", "dir", 0.5))


def train_pair_models(
    arch: str, setting: str, pair: tuple[int, int]
) -> list[tuple[nn.Module, dict]]:
    """The two trained models of one pair (trained now if not in the checkpoint cache)."""
    kw = dict(ARCHS[arch], device="cpu", progress=False)
    if setting == "same":
        return [get_trained(arch, seed=s, **kw) for s in pair]
    return [
        get_trained(arch, seed=pair[0], classes=TASK_A, **kw),
        get_trained(arch, seed=pair[1], classes=TASK_B, **kw),
    ]


_ENDPOINTS: dict[str, torch.Tensor] = {}  # checkpoint path -> test logits (pairs share models)


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """``(N, n_out)`` float32 logits of ``model`` (eval mode) on ``x`` ``(N, 1, 32, 32)``."""
    model.eval()
    return torch.cat([model(x[i : i + batch]).float() for i in range(0, len(x), batch)])


def scores(z: torch.Tensor, y: torch.Tensor, setting: str) -> dict[str, float]:
    """Accuracies of logits ``z`` against labels ``y`` (N,).

    ``same``: ``acc`` (10-way). ``split`` (z = [head A | head B], 10 columns): ``acc`` = joint
    10-way argmax on all images, ``task_a`` / ``task_b`` = one head's 5-way argmax on its own
    classes' images, ``task_avg`` their mean.
    """
    out = {"acc": float((z.argmax(1) == y).double().mean())}
    if setting == "split":
        a, b = y < 5, y >= 5
        out["task_a"] = float((z[a, :5].argmax(1) == y[a]).double().mean())
        out["task_b"] = float((z[b, 5:].argmax(1) + 5 == y[b]).double().mean())
        out["task_avg"] = (out["task_a"] + out["task_b"]) / 2
    return out


def endpoint_logits(z: torch.Tensor, which: int, setting: str) -> torch.Tensor:
    """An endpoint's logits in the merged model's layout (``split``: the other head -inf)."""
    if setting == "same":
        return z
    pad = torch.full_like(z, -math.inf)
    return torch.cat([z, pad] if which == 0 else [pad, z], 1)


def run_pair(
    arch: str,
    setting: str,
    pair: tuple[int, int],
    x: torch.Tensor,
    y: torch.Tensor,
    calib: torch.Tensor,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Every row for one pair of models: accuracies, merge seconds, parameter counts."""
    (a, ia), (b, ib) = train_pair_models(arch, setting, pair)
    models = [a.float(), b.float()]
    example = calib[:2]
    outputs = "concat" if setting == "split" else "average"
    rows: dict[str, Any] = {}
    t = time.perf_counter()
    for m, info in ((a, ia), (b, ib)):
        if info["path"] not in _ENDPOINTS:
            _ENDPOINTS[info["path"]] = logits_of(m, x)
    za, zb = _ENDPOINTS[ia["path"]], _ENDPOINTS[ib["path"]]
    eval_s = (time.perf_counter() - t) / 2
    for i, z in enumerate((za, zb)):
        sc = scores(endpoint_logits(z, i, setting), y, setting)
        if setting == "split":  # an endpoint only has a head for its own task
            sc = {k: v for k, v in sc.items() if k in ("acc", f"task_{'ab'[i]}")}
        rows[f"model_{'ab'[i]}"] = sc
    ens = (za + zb) / 2 if setting == "same" else torch.cat([za, zb], 1)
    rows["ensemble"] = scores(ens, y, setting)
    di = DeepInversionConfig(batch_size=args.dir_batch, steps=args.dir_steps, seed=0)
    t = time.perf_counter()
    synthetic = synthesize_merge_batch(models, tuple(x.shape[1:]), di)
    dir_s = time.perf_counter() - t
    for name, method, repair, width in ROWS:
        cfg = MergeConfig(
            method=method,
            repair="data",  # "dir" = REPAIR on the Deep-Inversion batch (tested to be identical)
            width=width,
            seed=0,
            outputs=outputs,
            n_init=args.n_init,
            max_passes=args.max_passes,
        )
        data = calib if repair == "data" else synthetic
        t = time.perf_counter()
        merged, report = merge(models, cfg, example_inputs=example, data=data)
        sec = time.perf_counter() - t
        rows[name] = {
            **scores(logits_of(merged, x), y, setting),
            "merge_s": round(sec, 2),
            "passes": report.extra["passes"],
            "cross_model_fraction": round(report.extra["cross_model_fraction"], 4),
            "params": report.params_after,
        }
        print(
            f"  {arch} {setting} {pair} {name}: {rows[name]['acc']:.4f} ({sec:.1f} s)", flush=True
        )
    return {
        "arch": arch,
        "setting": setting,
        "pair": list(pair),
        "models": [
            {k: info.get(k) for k in ("path", "test_accuracy", "classes", "train_time_s", "steps")}
            for info in (ia, ib)
        ],
        "params_one_model": sum(p.numel() for p in a.parameters()),
        "dir_synthesis_s": round(dir_s, 2),
        "eval_s_per_model": round(eval_s, 2),
        "rows": rows,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """{arch: {setting: {row: {metric: {mean, std, min, max, n}}}}} over the pairs."""
    out: dict[str, Any] = {}
    for r in runs:
        for row, vals in r["rows"].items():
            for metric, v in vals.items():
                if metric in ("acc", "task_a", "task_b", "task_avg"):
                    out.setdefault(r["arch"], {}).setdefault(r["setting"], {}).setdefault(
                        row, {}
                    ).setdefault(metric, []).append(v)
    for arch in out.values():
        for setting in arch.values():
            for metrics in setting.values():
                for metric, v in metrics.items():
                    metrics[metric] = {
                        "mean": round(statistics.fmean(v), 4),
                        "std": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0,
                        "min": round(min(v), 4),
                        "max": round(max(v), 4),
                        "n": len(v),
                    }
    return out


def _cell(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return "-"
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"


def tables(results: dict[str, Any]) -> str:
    """Markdown tables (accuracy in %, mean ± sample std over the pairs) from a results dict."""
    summary = results["summary"]
    lines = []
    for setting, metric, title in (
        ("same", "acc", "same task: test accuracy"),
        ("split", "acc", "separate tasks (5+5): joint 10-way accuracy"),
        ("split", "task_avg", "separate tasks (5+5): mean per-task accuracy (each head, 5-way)"),
    ):
        archs = [a for a in summary if setting in summary[a]]
        if not archs:
            continue
        n = {a: summary[a][setting]["ensemble"]["acc"]["n"] for a in archs}
        lines += [
            f"**{title}** (% , mean ± std over {', '.join(f'{n[a]} {a}' for a in archs)} pairs)",
            "",
            "| repair | model | WM | ZipIt! | fold | average | fold w0.5 |",
            "|---|---|---|---|---|---|---|",
        ]
        for repair in ("data", "dir"):
            for a in archs:
                rows = summary[a][setting]
                cells = [
                    _cell(rows.get(f"{m}/{repair}", {}).get(metric))
                    for m in (*METHODS, "fold-w0.5")
                ]
                label = "REPAIR (data)" if repair == "data" else "DIR (data-free)"
                lines.append(f"| {label} | {a} | " + " | ".join(cells) + " |")
        head = "| model | endpoint A | endpoint B | ensemble |"
        if metric == "task_avg":
            head = "| model | A on task A | B on task B | ensemble |"
        lines += ["", head, "|---|---|---|---|"]
        for a in archs:
            rows = summary[a][setting]
            ends = ("task_a", "task_b") if metric == "task_avg" else (metric, metric)
            cells = [
                _cell(rows["model_a"].get(ends[0])),
                _cell(rows["model_b"].get(ends[1])),
                _cell(rows["ensemble"].get(metric)),
            ]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "**trained models** (test accuracy on the test images of the model's classes; one "
        "torch thread on the shared machine)",
        "",
        "| model | classes | seed | steps | train s | test acc. |",
        "|---|---|---|---|---|---|",
    ]
    seen = {}
    for r in results["runs"]:
        for m, seed in zip(r["models"], r["pair"]):
            seen.setdefault(m["path"], (r["arch"], m, seed))
    for arch, m, seed in sorted(seen.values(), key=lambda t: (t[0], str(t[1]["classes"]), t[2])):
        cls = "all" if m["classes"] is None else f"{m['classes'][0]}-{m['classes'][-1]}"
        lines.append(
            f"| {arch} | {cls} | {seed} | {m['steps']} | {m['train_time_s']:.0f} | "
            f"{100 * m['test_accuracy']:.2f} |"
        )
    lines += ["", "**merge seconds** (mean over pairs; wall time on the shared machine)", ""]
    lines += ["| model | setting | " + " | ".join(r[0] for r in ROWS) + " | DIR batch |"]
    lines += ["|---|---|" + "---|" * (len(ROWS) + 1)]
    for arch in summary:
        for setting in summary[arch]:
            rs = [r for r in results["runs"] if r["arch"] == arch and r["setting"] == setting]
            cells = [
                f"{statistics.fmean(r['rows'][row]['merge_s'] for r in rs):.0f}" for row, *_ in ROWS
            ]
            dir_s = statistics.fmean(r["dir_synthesis_s"] for r in rs)
            lines.append(f"| {arch} | {setting} | " + " | ".join(cells) + f" | {dir_s:.0f} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
    """Bar chart of the mean accuracy (error bars: min..max over pairs) per arch and setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    panels = [(a, s) for a in summary for s in ("same", "split") if s in summary[a]]
    ncol = 2 if len(panels) > 1 else 1
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.5 * ncol, 4.6 * nrow), squeeze=False)
    for ax, (arch, setting) in zip(axes.flat, panels):
        rows = summary[arch][setting]
        names = ["model_a", "model_b", "ensemble"] + [r[0] for r in ROWS if r[0] in rows]
        names = [n for n in names if n in rows]
        mean = [rows[n]["acc"]["mean"] for n in names]
        lo = [rows[n]["acc"]["mean"] - rows[n]["acc"]["min"] for n in names]
        hi = [rows[n]["acc"]["max"] - rows[n]["acc"]["mean"] for n in names]
        colors = [
            "0.6" if n.startswith("model") else "0.3" if n == "ensemble"
            else "C0" if "weight" in n else "C1" if "zipit" in n
            else "C3" if "w0.5" in n else "C2" if "fold" in n else "C4"
            for n in names
        ]  # fmt: skip
        hatches = ["//" if n.endswith("/dir") else "" for n in names]
        bars = ax.bar(range(len(names)), mean, yerr=[lo, hi], color=colors, capsize=2)
        for bar, h in zip(bars, hatches):
            bar.set_hatch(h)
        ax.set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(f"{arch}, {setting} task{'s (joint acc.)' if setting == 'split' else ''}")
        ax.grid(axis="y", alpha=0.3)
    for row in axes:
        row[0].set_ylabel("test accuracy (mean; bars: min..max over pairs)")
    fig.suptitle("Merging two models: REPAIR (plain) vs Deep-Inversion repair (hatched)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """Run the pairs of the requested architectures and settings, or combine result files."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--arch", nargs="+", default=list(ARCHS), choices=sorted(ARCHS))
    ap.add_argument("--setting", nargs="+", default=["same", "split"], choices=["same", "split"])
    ap.add_argument("--pairs", type=int, default=3, help="pairs per setting (at most 3)")
    ap.add_argument(
        "--pair-index", type=int, nargs="+", default=None, help="run only these pairs (0, 1, 2)"
    )
    ap.add_argument("--test-subset", type=int, default=2000, help="0: all 10,000 test images")
    ap.add_argument("--calib", type=int, default=512, help="training images for REPAIR/ZipIt!")
    ap.add_argument("--dir-batch", type=int, default=64, help="Deep-Inversion images per pair")
    ap.add_argument("--dir-steps", type=int, default=100, help="Deep-Inversion Adam steps")
    ap.add_argument("--n-init", type=int, default=3, help="k-means restarts (fold)")
    ap.add_argument("--max-passes", type=int, default=5, help="coordinate-descent passes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/merge_fmnist.json")
    ap.add_argument("--plot", default=None, help="also draw the results to this PNG")
    ap.add_argument("--combine", nargs="+", default=None, help="merge these result files")
    ap.add_argument("--table", default=None, help="print the markdown tables of this results file")
    args = ap.parse_args(argv)
    if args.table:
        print(tables(json.loads(Path(args.table).read_text())))
        return 0
    command = "PYTHONPATH=src .venv/bin/python " + " ".join(
        ["benchmarks/merge_fmnist.py", *sys.argv[1:]]
    )

    if args.combine:
        parts = [json.loads(Path(p).read_text()) for p in args.combine]
        runs, seen = [], set()
        for r in (r for p in parts for r in p["runs"]):  # a pair run twice: the first counts
            key = (r["arch"], r["setting"], tuple(r["pair"]))
            if key not in seen:
                seen.add(key)
                runs.append(r)
        results = {
            **{k: v for k, v in parts[0].items() if k not in ("runs", "summary")},
            "combined_from": {p: part["command"] for p, part in zip(args.combine, parts)},
            "combine_command": command,
            "runs": runs,
            "summary": summarise(runs),
        }
        write_json(args.out, results)
        if args.plot:
            plot(results, args.plot)
        return 0

    torch.set_num_threads(args.threads)
    x, y = load_fashion_mnist("test")
    if args.test_subset:
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: args.test_subset]
        x, y = x[idx], y[idx]
    calib = torch.cat(calibration_batches(n_batches=max(1, args.calib // 64), batch_size=64))
    out = Path(args.out)
    results: dict[str, Any] = {
        "command": command,
        "git_revision": git_revision(),
        "machine": machine_info(),
        "loadavg_at_start": list(os.getloadavg()),
        "settings": {
            "archs": ARCHS,
            "test_images": len(y),
            "test_subset_seed": 0 if args.test_subset else None,
            "calibration_images": len(calib),
            "deep_inversion": {"batch_size": args.dir_batch, "steps": args.dir_steps},
            "n_init": args.n_init,
            "max_passes": args.max_passes,
            "same_pairs": SAME_PAIRS,
            "split_pairs": SPLIT_PAIRS,
            "tasks": [TASK_A, TASK_B],
            "threads": args.threads,
        },
        "runs": [],
    }
    if out.is_file():  # resume: keep the pairs already measured with the same settings
        old = json.loads(out.read_text())
        if json.loads(json.dumps(old.get("settings"))) == json.loads(
            json.dumps(results["settings"])
        ):
            results["runs"] = old["runs"]
    done = {(r["arch"], r["setting"], tuple(r["pair"])) for r in results["runs"]}
    t0 = time.perf_counter()
    for arch in args.arch:
        for setting in args.setting:
            pairs = SAME_PAIRS if setting == "same" else SPLIT_PAIRS
            for i, pair in enumerate(pairs[: args.pairs]):
                if (arch, setting, tuple(pair)) in done:
                    continue
                if args.pair_index is not None and i not in args.pair_index:
                    continue
                tp = time.perf_counter()
                run = run_pair(arch, setting, pair, x, y, calib, args)
                run["wall_s"] = round(time.perf_counter() - tp, 1)
                results["runs"].append(run)
                results["summary"] = summarise(results["runs"])
                results["loadavg_at_end"] = list(os.getloadavg())
                write_json(out, results)
                print(f"{arch} {setting} {pair}: {run['wall_s']} s", flush=True)
    results["summary"] = summarise(results["runs"])
    results["wall_s_this_invocation"] = round(time.perf_counter() - t0, 1)
    write_json(out, results)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
