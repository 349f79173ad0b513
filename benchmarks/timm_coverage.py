"""How much of each timm model the tracer folds: parameters before/after, groups foldable and
frozen (with reasons), groups carrying an approximation, time, and the planted-twins check.

For each model (random init, ``pretrained=False``; the hub is not needed), on a (2, 3, 64, 64)
input: ``netfold.find_groups``, then ``netfold.fold`` with ``FoldConfig(ratio=0.3,
repair="none")``. The exactness column is a separate run in float64: every foldable group gets
planted duplicate channels (each distinct channel twice, so LayerNorm statistics over the
channels are kept too) and is folded to its distinct width; the relative output error
max|y' - y| / max|y| is reported (tests/test_timm.py asserts < 1e-9).

Run:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/timm_coverage.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/timm_coverage.py --models resnet18 --fast

Writes benchmarks/results/timm_coverage.json (command, machine, git revision, settings, one
row per model, and the markdown table printed at the end).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn

import netfold
from netfold.bench import meta
from netfold.graph.surgery import copy_channels, get_module

RESULTS = Path(__file__).parent / "results"
MODELS = [
    "resnet18",
    "convnext_atto",
    "mobilenetv3_small_050",
    "efficientnet_b0",
    "regnetx_002",
    "vit_tiny_patch16_224",
]


def create(name: str, seed: int) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    kw = {"img_size": 64} if name.startswith("vit") else {}
    return timm.create_model(name, pretrained=False, **kw).eval()


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def planted_error(name: str, seed: int) -> float:
    """Relative output error of folding planted twins (float64; 0 up to rounding if exact)."""
    model = create(name, seed).to(torch.float64)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    groups = netfold.find_groups(model, x)
    g0 = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():  # non-trivial norms: random init leaves BN an identity
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g0))
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g0) - 0.5)
                if getattr(m, "running_var", None) is not None:
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g0) - 0.5)
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g0))
        todo = [g for g in groups if g.foldable and g.size >= 2 * g.align]
        distinct = {g.name: (g.size // g.align // 2) * g.align for g in todo}
        for g in todo:
            for cp in g.channel_params:
                t = getattr(get_module(model, cp.module), cp.tensor)
                t.copy_(0.5 + torch.rand(t.shape, generator=g0, dtype=t.dtype))
            n, bs, db = g.size, g.size // g.align, distinct[g.name] // g.align
            i = torch.arange(n)
            copy_channels(model, g, (i // bs) * bs + (i % bs) % db)
        ref = model(x)
    ratios = {g.name: 1.0 - distinct[g.name] / g.size for g in todo}
    cfg = netfold.FoldConfig(ratio=0.0, ratios=ratios, repair="none", n_init=1, max_iter=5)
    netfold.fold(model, cfg, example_inputs=x, groups=groups)
    with torch.no_grad():
        return ((model(x) - ref).abs().max() / ref.abs().max()).item()


def run(name: str, args: argparse.Namespace) -> dict:
    model = create(name, args.seed)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(args.seed))
    t0 = time.perf_counter()
    groups = netfold.find_groups(model, x)
    t_trace = time.perf_counter() - t0
    reasons = collections.Counter(r for g in groups for r in g.frozen_reasons)
    kw = {"n_init": 1, "max_iter": 5} if args.fast else {}
    cfg = netfold.FoldConfig(ratio=args.ratio, repair="none", seed=args.seed, **kw)
    before = count(model)
    rep = netfold.fold(model, cfg, example_inputs=x, groups=groups)
    with torch.no_grad():
        ok_shape = tuple(model(x).shape) == (2, 1000)
    row = {
        "model": name,
        "params_before": before,
        "params_after": rep.params_after,
        "sparsity": rep.sparsity,
        "flops_before": rep.flops_before,
        "flops_after": rep.flops_after,
        "groups": len(groups),
        "foldable": sum(g.foldable for g in groups),
        "frozen": sum(not g.foldable for g in groups),
        "frozen_reasons": dict(reasons.most_common()),
        "approximate_groups": sum(bool(g.approximations) for g in groups if g.foldable),
        "approximations": sorted(
            {a.split(":", 1)[1].strip() for g in groups for a in g.approximations}
        ),
        "channel_params": sorted({p.qualname for g in groups for p in g.channel_params}),
        "trace_seconds": t_trace,
        "fold_seconds": rep.seconds,
        "output_shape_ok": ok_shape,
    }
    if not args.no_exact:
        row["planted_twins_rel_error"] = planted_error(name, args.seed)
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| model | params before | after | sparsity | groups (foldable/frozen) | approx. (LN) "
        "| planted twins rel. err | trace s | fold s | frozen because |\n"
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---|\n"
    )
    lines = []
    for r in rows:
        why = "; ".join(f"{n}x {k[:60]}" for k, n in r["frozen_reasons"].items())
        err = r.get("planted_twins_rel_error")
        lines.append(
            f"| {r['model']} | {r['params_before']:,} | {r['params_after']:,} "
            f"| {r['sparsity']:.1%} | {r['groups']} ({r['foldable']}/{r['frozen']}) "
            f"| {r['approximate_groups']} | {'-' if err is None else f'{err:.1e}'} "
            f"| {r['trace_seconds']:.2f} | {r['fold_seconds']:.1f} | {why} |"
        )
    return head + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fast", action="store_true", help="k-means n_init=1, max_iter=5")
    ap.add_argument("--no-exact", action="store_true", help="skip the planted-twins check")
    ap.add_argument("--out", type=Path, default=RESULTS / "timm_coverage.json")
    args = ap.parse_args()
    import timm

    out = {
        "command": meta.command(),
        "git": meta.git_revision(short=True),
        "machine": meta.machine(),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "settings": {
            k: os.path.relpath(v) if isinstance(v, Path) else v for k, v in vars(args).items()
        },
        "input": [2, 3, 64, 64],
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "rows": [],
    }
    for name in args.models:
        row = run(name, args)
        out["rows"].append(row)
        print(
            f"{name}: {row['sparsity']:.1%} of {row['params_before']:,} params, "
            f"{row['foldable']}/{row['groups']} groups foldable",
            flush=True,
        )
    meta.finish(out)
    out["table"] = table(out["rows"])
    print(out["table"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(args.out)  # never leave a half-written results file


if __name__ == "__main__":
    main()
