"""Draw the fold benchmark's plots and table from its results JSON alone.

Run: python benchmarks/plot_fold.py [benchmarks/results/fold_fmnist.json] [--out-dir docs]

Writes docs/fold_fmnist.png (accuracy and last-layer variance ratio vs parameter sparsity, one
panel per model, one line per repair) and docs/fold_fmnist.md (the same numbers as a table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "none": "Fold-naive",
    "ar": "Fold-AR (data-free)",
    "dir": "Fold-DIR (data-free)",
    "data": "Fold-R (512 images)",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default="benchmarks/results/fold_fmnist.json")
    ap.add_argument("--out-dir", default="docs")
    args = ap.parse_args(argv)
    res = json.loads(Path(args.results).read_text())
    models = res["models"]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7.5), squeeze=False)
    lines = [
        "# Folding Fashion-MNIST CNNs without fine-tuning\n",
        f"From `{res['command']}` (git {res['git']}, {res['date']}, {res['machine']['cpu']}, "
        f"{res['machine'].get('logical_cpus', res['machine'].get('cores'))} cores). Accuracy on {res['n_test']} test images; variance ratio "
        "of the classifier input on 512 of them; fold time includes tracing and FLOP counting.\n",
    ]
    for j, (name, entry) in enumerate(models.items()):
        dense = entry["dense"]["accuracy"]
        ax, axv = axes[0][j], axes[1][j]
        ax.axhline(100 * dense, color="k", ls="--", lw=1, label=f"dense {100 * dense:.2f}%")
        repairs = list(dict.fromkeys(r["repair"] for r in entry["runs"]))
        for rep in repairs:
            rows = sorted(
                (r for r in entry["runs"] if r["repair"] == rep), key=lambda r: r["sparsity"]
            )
            xs = [100 * r["sparsity"] for r in rows]
            ax.plot(xs, [100 * r["accuracy"] for r in rows], "o-", label=LABELS.get(rep, rep))
            axv.plot(xs, [r["variance_ratio_last"] for r in rows], "o-", label=LABELS.get(rep, rep))
        ax.set_title(f"{name} ({entry['dense']['params']:,} params)")
        ax.set_xlabel("parameter sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        axv.axhline(1.0, color="k", ls="--", lw=1)
        axv.set_yscale("log")
        axv.set_xlabel("parameter sparsity (%)")
        axv.set_ylabel("variance ratio, last layer")
        axv.grid(alpha=0.3)

        lines.append(
            f"\n## {name}: dense {100 * dense:.2f}%, {entry['dense']['params']:,} parameters\n"
        )
        if "deep_inversion_seconds" in entry:
            lines.append(
                f"Deep Inversion batch synthesised once in {entry['deep_inversion_seconds']:.0f} s.\n"
            )
        lines.append("| repair | ratio | sparsity | accuracy | variance ratio | fold time |")
        lines.append("|---|---|---|---|---|---|")
        for r in entry["runs"]:
            lines.append(
                f"| {LABELS.get(r['repair'], r['repair'])} | {r['ratio']:.2f} | {100 * r['sparsity']:.1f}% | "
                f"{100 * r['accuracy']:.2f}% | {r['variance_ratio_last']:.3f} | {r['fold_seconds']:.2f} s |"
            )
    if "full_resnet18_fold_time" in res:
        t = res["full_resnet18_fold_time"]
        lines.append(
            f"\n## Fold time, full-width CIFAR ResNet18 ({t['params']:,} params, ratio 0.5)\n"
        )
        for rep in ("none", "ar"):
            lines.append(
                f"- repair={rep}: median {t[rep]['seconds_median']:.2f} s "
                f"(with precomputed groups {t[rep]['seconds_with_cached_groups']:.2f} s)"
            )
    fig.tight_layout()
    fig.savefig(out / "fold_fmnist.png", dpi=110)
    from netfold.atomic import write_text

    write_text(out / "fold_fmnist.md", "\n".join(lines) + "\n")
    print(f"wrote {out / 'fold_fmnist.png'} and {out / 'fold_fmnist.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
