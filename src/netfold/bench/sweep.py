"""Run a committed experiment config: model x method x repair x ratio, results to JSON.

A config (see benchmarks/configs/) names the models (trained on Fashion-MNIST by
:func:`netfold.models.train.get_trained`), the ratios, and the runs::

    {"name": "fmnist_baselines", "models": ["resnet18_cifar"], "ratios": [0.25, 0.45],
     "n_test": 2000, "seed": 0, "deep_inversion": {"steps": 200, "batch_size": 64},
     "runs": [{"label": "Fold", "method": "kmeans", "repairs": ["none", "ar", "dir", "data"]},
              {"label": "Torch-Pruning L2", "method": "torch-pruning-l2", "repairs": ["none"]}],
     "per_layer_variance": {"ratio": 0.35, "runs": ["Fold"]}}

Every row records accuracy, parameter sparsity, FLOP ratio, the classifier-input variance
ratio and the compression time; ``per_layer_variance`` adds the variance ratio of every layer
for one ratio (the paper's Fig. 4). A run may set its own clustering ``seed`` (to measure the
seed-to-seed spread); the Deep-Inversion batch always uses the config's seed. Results are written atomically after every row, and a
rerun with the same output file skips the rows already there, so an interrupted sweep resumes.
The Deep-Inversion batch depends only on the original model; it is synthesised once per model
and cached beside the checkpoints (~/.cache/netfold/checkpoints/deep_inversion).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..api import fold
from ..atomic import write_json
from ..config import DeepInversionConfig, FoldConfig
from ..eval.accuracy import evaluate_accuracy
from ..eval.cost import count_flops, count_params
from ..eval.latency import machine_info
from ..eval.variance import CLASSIFIER_INPUT, variance_ratio
from ..graph.trace import find_groups

TP_METHODS = {"torch-pruning-l1": 1, "torch-pruning-l2": 2}


def git_revision() -> str:
    """Short git hash of the working tree (with "+dirty" when it has local changes)."""
    try:
        rev = subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL
        ).strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "src"], stderr=subprocess.DEVNULL
        ).returncode
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _atomic_json(path: Path, obj: Any) -> None:
    write_json(path, obj)


def validate(config: dict[str, Any]) -> None:
    """Check an experiment config completely before anything runs (ValueError on problems)."""
    from ..models import MODELS

    for key in ("name", "models", "ratios", "runs"):
        if key not in config:
            raise ValueError(f"experiment config lacks {key!r}")
    for m in config["models"]:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r}; known: {sorted(MODELS)}")
    labels = set()
    for run in config["runs"]:
        if run["label"] in labels:
            raise ValueError(f"duplicate run label {run['label']!r}")
        labels.add(run["label"])
        for repair in run["repairs"]:
            for ratio in run.get("ratios", config["ratios"]):
                if run["method"] in TP_METHODS:
                    if repair != "none":
                        raise ValueError(f"{run['label']}: Torch-Pruning runs take repair 'none'")
                    continue
                FoldConfig(
                    ratio=ratio,
                    method=run["method"],
                    repair=repair,
                    allocation=run.get("allocation", "uniform"),
                )
    plv = config.get("per_layer_variance")
    if plv and not set(plv["runs"]) <= labels:
        raise ValueError(f"per_layer_variance names unknown runs {set(plv['runs']) - labels}")


def _synthetic(model: torch.nn.Module, shape: tuple[int, ...], cfg: DeepInversionConfig, key: str):
    from safetensors.torch import load_file, save_file

    from ..fold.deep_inversion import synthesize
    from ..models.train import default_cache_dir

    digest = hashlib.sha256((key + cfg.to_json()).encode()).hexdigest()[:16]
    path = default_cache_dir() / "deep_inversion" / f"{digest}.safetensors"
    if path.is_file():
        return load_file(path)["x"], 0.0, True
    t = time.perf_counter()
    x = synthesize(model, shape, cfg, progress=False)
    seconds = time.perf_counter() - t
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"x": x.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return x, seconds, False


def coarse_to_fine(values: list[float]) -> list[float]:
    """``values`` sorted, reordered (upper) middle first, then the middles of each half, etc.

    A sweep runs its ratios in this order, so an interrupted sweep still spans the range.
    """
    vals = sorted(values)
    out: list[float] = []
    spans = [(0, len(vals))]
    while spans:
        nxt = []
        for lo, hi in spans:
            if lo >= hi:
                continue
            mid = min((lo + hi + 1) // 2, hi - 1)
            out.append(vals[mid])
            nxt += [(lo, mid), (mid + 1, hi)]
        spans = nxt
    return out


def _row_key(row: dict[str, Any]) -> tuple:
    return (row["model"], row["label"], row["repair"], round(row["ratio"], 6))


def run_sweep(
    config: dict[str, Any],
    out: str | os.PathLike,
    *,
    command: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the experiment ``config``, writing (and resuming) ``out``; returns the results."""
    from ..data.fashion_mnist import calibration_batches, load_fashion_mnist
    from ..models.train import get_trained

    validate(config)
    out = Path(out)
    seed = int(config.get("seed", 0))
    results: dict[str, Any]
    if out.is_file():
        results = json.loads(out.read_text())
        if results.get("config") != config:
            raise ValueError(f"{out} holds results of a different config; choose another --out")
    else:
        results = {"config": config, "models": {}, "rows": [], "per_layer_variance": []}
    results.update(
        command=command or " ".join([Path(sys.executable).name, *sys.argv]),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        git=git_revision(),
        machine={**machine_info(), "torch_threads": torch.get_num_threads()},
        seed=seed,
    )
    done = {_row_key(r) for r in results["rows"]}
    torch.manual_seed(seed)
    x_test, y_test = load_fashion_mnist("test")
    n_test = int(config.get("n_test", 10000))
    x_test, y_test = x_test[:n_test], y_test[:n_test]
    x_var = x_test[: int(config.get("n_var", 512))]
    n_cal = int(config.get("calibration", 512))
    calib = torch.cat(calibration_batches(n_batches=max(1, n_cal // 64), batch_size=64))[:n_cal]
    di_cfg = DeepInversionConfig(**{"seed": seed, **config.get("deep_inversion", {})})
    results["protocol"] = {
        "n_test": len(y_test),
        "variance_images": len(x_var),
        "calibration": f"{len(calib)} train images (calibration_batches)",
        "deep_inversion": di_cfg.to_dict(),
    }

    todo = []
    all_ratios = sorted({r for run in config["runs"] for r in run.get("ratios", config["ratios"])})
    for name in config["models"]:
        for ratio in coarse_to_fine(all_ratios):  # every method at one ratio, then the next
            for run in config["runs"]:
                if ratio not in run.get("ratios", config["ratios"]):
                    continue
                for repair in run["repairs"]:
                    row = {"model": name, "label": run["label"], "repair": repair, "ratio": ratio}
                    if _row_key(row) not in done:
                        todo.append((name, run, repair, ratio))
    bar = tqdm(total=len(todo), desc="sweep", disable=not progress)
    for name in config["models"]:
        model, info = get_trained(name, seed=seed)
        example = calib[:2]
        if name not in results["models"]:
            results["models"][name] = {
                "checkpoint": Path(info["path"]).name,
                "dense_accuracy": evaluate_accuracy(model, x_test, y_test),
                "params": count_params(model),
                "flops": count_flops(model, (calib[:1],)),
            }
        entry = results["models"][name]
        groups = find_groups(model, (example,))
        synthetic = None
        mine = [t for t in todo if t[0] == name]
        if any(r == "dir" for _, _, r, _ in mine):
            synthetic, seconds, cached = _synthetic(
                model, tuple(calib.shape[1:]), di_cfg, info.get("sha256", info["path"])
            )
            if not cached:
                entry["deep_inversion_seconds"] = seconds
        for _, run, repair, ratio in mine:
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            if run["method"] in TP_METHODS:
                from .torch_pruning import available, tp_magnitude_prune

                if not available():
                    bar.update(1)
                    continue
                tp_magnitude_prune(m, example, ratio, TP_METHODS[run["method"]])
                seconds = time.perf_counter() - t0
                params = count_params(m)
            else:
                cfg = FoldConfig(
                    ratio=ratio,
                    method=run["method"],
                    repair=repair,
                    allocation=run.get("allocation", "uniform"),
                    seed=int(run.get("seed", seed)),
                    deep_inversion=di_cfg,
                )
                rep = fold(
                    m,
                    cfg,
                    example_inputs=example,
                    data=calib if repair == "data" else None,
                    synthetic=synthetic,
                    groups=groups,
                )
                seconds, params = rep.seconds, rep.params_after
            acc = evaluate_accuracy(m, x_test, y_test)
            vr = variance_ratio(model, m, x_var)
            row = {
                "model": name,
                "label": run["label"],
                "method": run["method"],
                "allocation": run.get("allocation", "uniform"),
                "seed": int(run.get("seed", seed)),
                "repair": repair,
                "ratio": ratio,
                "accuracy": acc,
                "params": params,
                "sparsity": 1.0 - params / entry["params"],
                "flops_ratio": count_flops(m, (calib[:1],)) / entry["flops"],
                "variance_ratio_last": vr.get(CLASSIFIER_INPUT),
                "seconds": seconds,
            }
            results["rows"].append(row)
            plv = config.get("per_layer_variance")
            if plv and run["label"] in plv["runs"] and abs(ratio - plv["ratio"]) < 1e-9:
                results["per_layer_variance"].append(
                    {
                        "model": name,
                        "label": run["label"],
                        "repair": repair,
                        "ratio": ratio,
                        "layers": vr,
                    }
                )
            _atomic_json(out, results)
            bar.update(1)
            bar.write(
                f"{name} {run['label']:>18} {repair:>4} r={ratio:.2f} "
                f"sparsity={100 * row['sparsity']:5.1f}% acc={100 * acc:6.2f}% {seconds:.1f}s"
            )
    bar.close()
    _atomic_json(out, results)
    return results


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine sweeps of the same config run per model (e.g. in parallel) into one result.

    Every part must have the same config apart from ``models``; rows, per-layer variance and
    model entries are concatenated, commands joined, machines listed.

    Raises:
        ValueError: the configs differ in anything but their models, or a model repeats.
    """
    if not parts:
        raise ValueError("nothing to merge")

    def strip(c: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in c.items() if k != "models"}

    base = strip(parts[0]["config"])
    merged: dict[str, Any] = {
        "config": {**parts[0]["config"], "models": []},
        "models": {},
        "rows": [],
        "per_layer_variance": [],
    }
    for p in parts:
        if strip(p["config"]) != base:
            raise ValueError("results of different configs cannot be merged")
        for name, entry in p["models"].items():
            if name in merged["models"]:
                raise ValueError(f"model {name!r} appears in more than one part")
            merged["models"][name] = entry
            merged["config"]["models"].append(name)
        merged["rows"] += p["rows"]
        merged["per_layer_variance"] += p.get("per_layer_variance", [])
    merged.update(
        command=" ; ".join(p["command"] for p in parts),
        date=min(p["date"] for p in parts),
        git=parts[0]["git"],
        machine=parts[0]["machine"],
        machines=[p["machine"] for p in parts],
        seed=parts[0]["seed"],
        protocol=parts[0]["protocol"],
    )
    return merged
