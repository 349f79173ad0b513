"""Plot the LayerCollapse results: parameters vs accuracy / embedding similarity per method.

Run: .venv/bin/python benchmarks/plot_collapse.py [--results benchmarks/results] [--markdown]

Reads ``collapse_{vgg,mixer,minilm}.json`` (written by benchmarks/collapse_bench.py) and writes
``collapse_<exp>.png`` next to each (``--markdown`` also prints the tables quoted in
docs/collapse.md); nothing is shown that is not in a results file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    "original": ("k", "*"),
    "collapse": ("tab:red", "o"),
    "fold": ("tab:blue", "s"),
    "collapse+fold": ("tab:purple", "D"),
    "fold+collapse": ("tab:purple", "D"),
    "control lc=0": ("tab:gray", "x"),
    "fold +ft": ("tab:cyan", "s"),
    "collapse (PReLU + regulariser, ft)": ("tab:red", "o"),
    "collapse (refit)": ("tab:orange", "^"),
    "collapse (refit, ft)": ("tab:green", "^"),
    "collapse+fold heads": ("tab:pink", "D"),
    "collapse+fold heads (ft)": ("tab:purple", "D"),
    "collapse+fold +ft": ("tab:pink", "D"),
}
TITLES = {
    "vgg": "VGG11-BN (torchvision layout), Fashion-MNIST",
    "mixer": "MLP-Mixer, Fashion-MNIST (collapsed block by block)",
    "minilm": "all-MiniLM-L6-v2, held-out Python-docs paragraphs",
}


def plot(path: Path) -> Path:
    res = json.loads(path.read_text())
    exp = path.stem.removeprefix("collapse_")
    text = "cos_mean" in res["points"][0]
    metric = "cos_mean" if text else "accuracy"
    scale = 1.0 if text else 100.0
    fig, ax = plt.subplots(figsize=(6, 4))
    by: dict[str, list[dict]] = {}
    for p in res["points"]:
        by.setdefault(p["method"], []).append(p)
    for method, pts in by.items():
        if all(p.get("stage") is not None for p in pts):  # progressive collapse: stage order
            pts = sorted(pts, key=lambda p: p["stage"])
        else:
            pts = sorted(pts, key=lambda p: p["params"])
        color, marker = STYLE.get(method, ("tab:green", "v"))
        xs = [p["params"] / 1e6 for p in pts]
        ys = [p[metric] * scale for p in pts]
        ax.plot(
            xs, ys, marker=marker, color=color, label=method, linestyle="-" if len(xs) > 1 else ""
        )
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("mean cosine similarity to original" if text else "test accuracy (%)")
    title = TITLES.get(exp.split("_")[0], exp)
    if text and res.get("collapsed_layers"):
        title += f"\ncollapsed MLP blocks {res['collapsed_layers']}"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def table(path: Path) -> str:
    """A markdown table of one results file (the numbers quoted in docs/collapse.md)."""
    res = json.loads(path.read_text())
    p0 = res["points"][0]["params"]
    if "cos_mean" in res["points"][0]:
        head = "| method | setting | params | fewer params | cos mean | cos p05 | cos min |"
        rows = [head, "|---|---|---:|---:|---:|---:|---:|"]
        for p in res["points"]:
            setting = ", ".join(
                f"{k} {p[k]}" for k in ("groups", "layers", "ratio") if p.get(k) is not None
            )
            rows.append(
                f"| {p['method']} | {setting} | {p['params']:,} | {100 * (1 - p['params'] / p0):.1f}% "
                f"| {p['cos_mean']:.4f} | {p['cos_p05']:.4f} | {p['cos_min']:.4f} |"
            )
        return "\n".join(rows)
    rows = [
        "| method | setting | params | fewer params | test accuracy |",
        "|---|---|---:|---:|---:|",
    ]
    for p in res["points"]:
        setting = ", ".join(
            f"{k} {p[k]}" for k in ("pairs", "stage", "ratio") if p.get(k) is not None
        )
        rows.append(
            f"| {p['method']} | {setting} | {p['params']:,} | {100 * (1 - p['params'] / p0):.1f}% "
            f"| {100 * p['accuracy']:.2f}% |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--markdown", action="store_true", help="also print markdown tables")
    args = ap.parse_args()
    for path in sorted(Path(args.results).glob("collapse_*.json")):
        print(plot(path))
        if args.markdown:
            print(table(path) + "\n")


if __name__ == "__main__":
    main()
