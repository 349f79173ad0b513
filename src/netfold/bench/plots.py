"""Plots and a Markdown table drawn from a sweep's results JSON alone (matplotlib, PNG).

- ``<name>_accuracy.png``: accuracy vs parameter sparsity per method (the paper's Fig. 6), one
  column per model and one row per kind of repair (none/AR, Deep Inversion, calibration data);
- ``<name>_variance.png``: accuracy vs the classifier-input variance ratio (Fig. 1, right);
- ``<name>_layers.png``: per-layer variance ratio at one ratio (Fig. 4);
- ``<name>_clusterers.png``: accuracy vs sparsity per clusterer (Fig. 3), when the sweep has
  runs whose label starts with "Clusterer";
- ``<name>.md``: every row as a table.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..atomic import write_text  # noqa: E402

REPAIR_NAMES = {"none": "", "ar": "+AR", "dir": "+DIR", "data": "+REPAIR(data)"}


def _series(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[(r["model"], r["label"], r["repair"])].append(r)
    for v in out.values():
        v.sort(key=lambda r: r["sparsity"])
    return out


def _name(label: str, repair: str) -> str:
    return f"{label}{REPAIR_NAMES.get(repair, '+' + repair)}"


def _label_axes(ax: plt.Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _save(fig: plt.Figure, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def plot_results(results: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write every plot and the table for ``results`` into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = results["config"]["name"]
    models = list(results["models"])
    rows = [r for r in results["rows"] if not r["label"].startswith("Clusterer")]
    series = _series(rows)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cmap = plt.get_cmap("tab10")
    color = {lab: cmap(i % 10) for i, lab in enumerate(labels)}
    style = {"none": ":", "ar": "-", "dir": "--", "data": "-."}
    written: list[Path] = []

    panels = (
        ("no data, instant: none / AR", ("none", "ar")),
        ("no data: Deep-Inversion repair", ("dir",)),
        ("calibration data: REPAIR", ("data",)),
    )
    fig, axes = plt.subplots(
        len(panels), len(models), figsize=(6 * len(models), 4.3 * len(panels)), squeeze=False
    )
    for j, model in enumerate(models):
        dense = results["models"][model]["dense_accuracy"]
        for i, (title, keep) in enumerate(panels):
            ax = axes[i][j]
            for (mdl, lab, rep), pts in series.items():
                if mdl != model or rep not in keep:
                    continue
                ax.plot(
                    [100 * p["sparsity"] for p in pts],
                    [100 * p["accuracy"] for p in pts],
                    style.get(rep, "-"),
                    marker="o",
                    ms=3,
                    color=color[lab],
                    label=_name(lab, rep),
                )
            ax.axhline(100 * dense, color="k", lw=0.8, label="dense")
            ax.set_ylim(0, 100)
            _label_axes(ax, f"{model} ({title})", "parameter sparsity (%)", "test accuracy (%)")
    written.append(out_dir / f"{name}_accuracy.png")
    _save(fig, written[-1])

    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for j, model in enumerate(models):
        ax = axes[0][j]
        for lab in labels:
            pts = [
                r
                for r in rows
                if r["model"] == model and r["label"] == lab and r["variance_ratio_last"]
            ]
            if pts:
                ax.scatter(
                    [p["variance_ratio_last"] for p in pts],
                    [100 * p["accuracy"] for p in pts],
                    s=14,
                    color=color[lab],
                    label=lab,
                )
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        _label_axes(
            ax,
            model,
            "variance ratio at the classifier input (compressed / dense)",
            "test accuracy (%)",
        )
    written.append(out_dir / f"{name}_variance.png")
    _save(fig, written[-1])

    plv = results.get("per_layer_variance") or []
    if plv:
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
        for j, model in enumerate(models):
            ax = axes[0][j]
            for e in plv:
                if e["model"] != model:
                    continue
                layers = list(e["layers"])
                ax.plot(
                    range(len(layers)),
                    [e["layers"][k] for k in layers],
                    style.get(e["repair"], "-"),
                    marker="o",
                    ms=3,
                    color=color.get(e["label"], "k"),
                    label=_name(e["label"], e["repair"]),
                )
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_yscale("log")
            _label_axes(
                ax,
                f"{model}, ratio {plv[0]['ratio']}",
                "layer (forward order; last = classifier input)",
                "variance ratio",
            )
        written.append(out_dir / f"{name}_layers.png")
        _save(fig, written[-1])

    crow = [r for r in results["rows"] if r["label"].startswith("Clusterer")]
    if crow:
        cs = _series(crow)
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
        for j, model in enumerate(models):
            ax = axes[0][j]
            for i, ((mdl, lab, rep), pts) in enumerate(cs.items()):
                if mdl != model:
                    continue
                ax.plot(
                    [100 * p["sparsity"] for p in pts],
                    [100 * p["accuracy"] for p in pts],
                    marker="o",
                    ms=3,
                    color=cmap(i % 10),
                    label=_name(lab.removeprefix("Clusterer: "), rep),
                )
            _label_axes(ax, f"{model}: clusterers", "parameter sparsity (%)", "test accuracy (%)")
        written.append(out_dir / f"{name}_clusterers.png")
        _save(fig, written[-1])

    written.append(out_dir / f"{name}.md")
    write_text(written[-1], results_table(results))
    return written


def results_table(results: dict[str, Any]) -> str:
    """Markdown: one table per model, a row per (method, repair), a column per ratio."""
    lines = [
        f"# Results: {results['config']['name']}",
        "",
        f"Generated from the results JSON by `netfold bench-plot`. Command: `{results['command']}`;"
        f" git {results['git']}; {results['machine'].get('cpu', '')}, "
        f"{results['machine'].get('torch_threads')} threads; {results['protocol']['n_test']} test"
        " images. Cells: test accuracy % (parameter sparsity %).",
        "",
    ]
    ratios = sorted({r["ratio"] for r in results["rows"]})
    for model, info in results["models"].items():
        lines += [
            f"## {model} (dense {100 * info['dense_accuracy']:.2f}%, {info['params']:,} params)",
            "",
        ]
        lines.append("| method | " + " | ".join(f"ratio {r}" for r in ratios) + " |")
        lines.append("|---|" + "---|" * len(ratios))
        cells: dict[tuple[str, str], dict[float, str]] = defaultdict(dict)
        for r in results["rows"]:
            if r["model"] == model:
                cells[(r["label"], r["repair"])][r["ratio"]] = (
                    f"{100 * r['accuracy']:.1f} ({100 * r['sparsity']:.0f})"
                )
        for (lab, rep), c in cells.items():
            lines.append(
                f"| {_name(lab, rep)} | " + " | ".join(c.get(r, "") for r in ratios) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_file(path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """:func:`plot_results` on a results JSON file."""
    return plot_results(json.loads(Path(path).read_text()), out_dir)
