"""Train a registered model on Fashion-MNIST, or reuse its cached checkpoint.

:func:`get_trained` is what ``make run``, tests and benchmarks call: the first call trains and
writes ``<name>_fmnist_seed<seed>.safetensors`` (the ``state_dict``) plus a ``.json`` (architecture
and constructor kwargs, training settings, test accuracy, wall time, torch version, machine) to
the checkpoint cache; later calls with the same settings load it in a second. Settings other
than the model's :data:`PRESETS` get a file name with a short hash of the settings appended, so
they never overwrite the reference checkpoints.

``classes=[0, 1, 2, 3, 4]`` trains on those labels only, with a ``len(classes)``-output head
(logit ``i`` = label ``classes[i]``), the separate-head setup of ZipIt!'s disjoint-task
experiments (benchmarks/merge_fmnist.py); the label set is part of the checkpoint key and the
recorded test accuracy is on the test images of those classes.

Checkpoints live OUTSIDE git, in ``cache_dir``, else ``$NETFOLD_CACHE``, else
``~/.cache/netfold/checkpoints``. Writes are atomic (temporary file, then ``os.replace``) and
concurrent callers of the same checkpoint serialise on a lock file, so a reader never sees a
half-written checkpoint.

The presets were chosen by measuring one SGD step at batch 128 on the 2-core CPU machine
(``torch.set_num_threads(2)``, channels-last, 1x32x32 input; idle machine):

=================  =====  =========  ======================
model              width  s / step   min / epoch (60k imgs)
=================  =====  =========  ======================
resnet18_cifar     1.0    2.97       23
resnet18_cifar     0.5    0.61-0.68  4.7-5.3
resnet18_cifar     0.25   0.16-0.21  1.3-1.7
vgg11_bn_cifar     1.0    0.61-0.79  4.8-6.2
vgg11_bn_cifar     0.5    0.17-0.20  1.3-1.6
small_cnn          1.0    0.14       1.1
=================  =====  =========  ======================

Full-width ResNet18 cannot finish one epoch in the ~12-minute budget, so both paper models are
trained at width 0.5 (ResNet18: 32-64-128-256 channels, 2.80M parameters; VGG11-BN: 32-...-256
conv channels with the standard 512-wide classifier, 2.71M), ResNet18 for 2 epochs (~10 min
idle) and VGG11-BN for 5 (~8 min idle). Seed-0 results: small_cnn 89.96%, resnet18_cifar
91.59%, vgg11_bn_cifar 91.80% test accuracy; the exact times (taken on a shared, loaded machine)
are in each checkpoint's JSON and in ``benchmarks/train_fmnist.py``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from netfold.atomic import write_bytes
from netfold.data.fashion_mnist import augment_batch, load_fashion_mnist
from netfold.eval.accuracy import evaluate_accuracy
from netfold.models import build_model

__all__ = [
    "PRESETS",
    "checkpoint_stem",
    "default_cache_dir",
    "get_trained",
    "load_checkpoint",
    "select_classes",
    "train_model",
]

#: Default training settings per model (the committed benchmark models use these, seed 0).
PRESETS: dict[str, dict[str, Any]] = {
    # Measured (seed 0, 2 epochs): SGD+crop/flip 87.8%, SGD plain 89.4%, AdamW plain 90.0%
    # (SGD plain, 3 epochs: 90.8%). Two epochs are too few to profit from augmentation.
    "small_cnn": {
        "width": 1.0,
        "epochs": 2,
        "optimizer": "adamw",
        "lr": 3e-3,
        "augment": False,
        "model_kwargs": {},
    },
    "resnet18_cifar": {"width": 0.5, "epochs": 2, "lr": 0.1, "model_kwargs": {}},
    "vgg11_bn_cifar": {"width": 0.5, "epochs": 5, "lr": 0.05, "model_kwargs": {}},
    "mlp": {"width": 1.0, "epochs": 5, "lr": 0.05, "model_kwargs": {"batch_norm": True}},
    # LayerCollapse experiments: torchvision-style VGG11-BN (quarter-width convs, 1x1 pool,
    # 2048-wide classifier holding 88% of the 5.1M parameters) and a 4-block MLP-Mixer
    # (8x8 patches: 16 tokens of 128 channels, channel MLP 128-512-128; 0.55M parameters).
    "vgg11_bn_tv": {
        "width": 0.25,
        "epochs": 4,
        "lr": 0.05,
        "model_kwargs": {"pool": 1, "hidden": 2048},
    },
    "mlp_mixer": {
        "width": 1.0,
        "epochs": 4,
        "optimizer": "adamw",
        "lr": 2e-3,
        "augment": False,
        "model_kwargs": {"patch": 8, "token_hidden": 64},
    },
}
_COMMON = {
    "batch_size": 128,
    "optimizer": "sgd",
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "onecycle",
    "train_subset": None,
    "augment": True,
    "crop_padding": 2,
}
_FMT_VERSION = 1


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$NETFOLD_CACHE``, else ``~/.cache/netfold/checkpoints``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("NETFOLD_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "netfold" / "checkpoints"


def _check_classes(classes: Any) -> list[int]:
    """``classes`` as a sorted list of distinct Fashion-MNIST labels (at least two)."""
    try:
        out = [int(c) for c in classes]
    except (TypeError, ValueError):
        raise ValueError(f"classes must be a sequence of labels in 0..9, got {classes!r}") from None
    if len(out) < 2 or len(set(out)) != len(out) or any(not 0 <= c <= 9 for c in out):
        raise ValueError(f"classes must be >= 2 distinct labels in 0..9, got {classes!r}")
    return sorted(out)


def select_classes(
    images: torch.Tensor, labels: torch.Tensor, classes: list[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the images of ``classes`` and renumber their labels ``0 .. len(classes) - 1``.

    Label ``classes[i]`` becomes ``i``, so a model trained on the subset has a
    ``len(classes)``-output head whose logit ``i`` stands for the original label ``classes[i]``.

    Args:
        images: ``(N, ...)`` inputs.
        labels: ``(N,)`` integer labels.
        classes: sorted labels to keep; ``None`` keeps everything unchanged.

    Returns:
        ``(images[mask], new_labels)`` with ``M <= N`` rows, the original order kept.
    """
    if classes is None:
        return images, labels
    keep = torch.as_tensor(classes, dtype=labels.dtype)
    mask = torch.isin(labels, keep)
    remap = torch.full((max(int(labels.max()), classes[-1]) + 1,), -1, dtype=labels.dtype)
    remap[keep] = torch.arange(len(classes), dtype=labels.dtype)
    return images[mask], remap[labels[mask]]


def _settings(name: str, seed: int, **overrides: Any) -> dict[str, Any]:
    """The canonical, JSON-serialisable description of one training run."""
    if name not in PRESETS:
        raise KeyError(f"no training preset for {name!r}; known: {sorted(PRESETS)}")
    preset = {**_COMMON, **copy.deepcopy(PRESETS[name])}
    classes = overrides.pop("classes", None)
    for k, v in overrides.items():
        if v is not None:
            preset[k] = v
    model_kwargs = {"in_channels": 1, "num_classes": 10, "width": float(preset.pop("width"))}
    model_kwargs.update(preset.pop("model_kwargs"))
    if isinstance(model_kwargs.get("hidden"), tuple):
        model_kwargs["hidden"] = list(model_kwargs["hidden"])
    settings = {
        "arch": name,
        "model_kwargs": model_kwargs,
        "dataset": "fashion-mnist",
        "pad_to": 32,
        "seed": int(seed),
        **preset,
    }
    if classes is not None:
        # Only present when set, so the all-class checkpoints keep their settings and file names.
        settings["classes"] = _check_classes(classes)
        model_kwargs["num_classes"] = len(settings["classes"])
    return settings


def checkpoint_stem(settings: dict[str, Any]) -> str:
    """File stem: ``<name>_fmnist_seed<seed>``, plus ``_<hash8>`` when not the preset settings."""
    name, seed = settings["arch"], settings["seed"]
    stem = f"{name}_fmnist_seed{seed}"
    if settings != _settings(name, seed):
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
        stem += f"_{digest}"
    return stem


def _atomic_write(path: Path, data: bytes) -> None:
    write_bytes(path, data)  # netfold.atomic: temp file, fsync, rename, fsync the folder


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX); a no-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def train_model(
    model: nn.Module,
    settings: dict[str, Any],
    *,
    device: torch.device | str = "cpu",
    data_root: str | os.PathLike | None = None,
    progress: bool = True,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place on Fashion-MNIST as described by ``settings``.

    Seeded end to end: ``torch.manual_seed(settings["seed"])`` before training (dropout), and one
    ``torch.Generator`` for the train subset, the data order and the augmentation.

    Args:
        model: a classifier for ``(B, 1, 32, 32)`` images.
        settings: a dict as built by ``_settings`` (epochs, batch_size, optimizer, lr, ...).
        device: where to train.
        data_root: see :func:`netfold.data.fashion_mnist.load_fashion_mnist`.
        progress: show a tqdm bar.
        max_steps: stop after this many optimiser steps in total (for tests); the schedule is
            still laid out for the full run.

    Returns:
        ``{"train_time_s", "steps", "epoch_times_s", "final_train_loss"}``.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    seed = settings["seed"]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = load_fashion_mnist("train", data_root, settings["pad_to"])
    x, y = select_classes(x, y, settings.get("classes"))
    if settings["train_subset"] is not None and settings["train_subset"] < len(y):
        idx = torch.randperm(len(y), generator=gen)[: settings["train_subset"]]
        x, y = x[idx], y[idx]
    bs = settings["batch_size"]
    steps_per_epoch = len(y) // bs
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {bs} larger than the {len(y)} training images")
    epochs = settings["epochs"]
    total = steps_per_epoch * epochs

    channels_last = any(isinstance(m, nn.Conv2d) for m in model.modules())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, memory_format=fmt).train()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": settings["weight_decay"]},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if settings["optimizer"] == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            groups, lr=settings["lr"], momentum=settings["momentum"], nesterov=True
        )
    elif settings["optimizer"] == "adamw":
        opt = torch.optim.AdamW(groups, lr=settings["lr"])
    else:
        raise ValueError(f"unknown optimizer {settings['optimizer']!r}; use 'sgd' or 'adamw'")
    if total < 4:  # too few steps for a schedule's phases (tiny test runs): constant LR
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    elif settings["schedule"] == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=settings["lr"], total_steps=total, pct_start=max(0.25, 2.0 / total)
        )
    elif settings["schedule"] == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    else:
        raise ValueError(f"unknown schedule {settings['schedule']!r}; use 'onecycle' or 'cosine'")

    step, epoch_times, loss_ema = 0, [], math.nan
    t0 = time.perf_counter()
    bar = tqdm(total=total if max_steps is None else min(total, max_steps), disable=not progress)
    for epoch in range(epochs):
        te = time.perf_counter()
        perm = torch.randperm(len(y), generator=gen)
        for i in range(steps_per_epoch):
            if max_steps is not None and step >= max_steps:
                break
            idx = perm[i * bs : (i + 1) * bs]
            xb, yb = x[idx], y[idx]
            if settings["augment"]:
                xb = augment_batch(xb, gen, padding=settings["crop_padding"], flip=True)
            xb = xb.to(device, non_blocking=True).contiguous(memory_format=fmt)
            yb = yb.to(device, non_blocking=True)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            li = float(loss.detach())
            loss_ema = li if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * li
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_ema:.3f}")
        epoch_times.append(time.perf_counter() - te)
        if max_steps is not None and step >= max_steps:
            break
    bar.close()
    model.to(memory_format=torch.contiguous_format).eval()
    return {
        "train_time_s": round(time.perf_counter() - t0, 2),
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "epoch_times_s": [round(t, 2) for t in epoch_times],
        "final_train_loss_ema": round(loss_ema, 4),
    }


def load_checkpoint(
    path: str | os.PathLike, *, verify: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from ``<stem>.safetensors`` + ``<stem>.json``.

    Args:
        path: the ``.safetensors`` or ``.json`` path, or the common stem.
        verify: check the weights' SHA-256 against the one recorded in the JSON.

    Returns:
        ``(model in eval mode on CPU, info dict)``.
    """
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    info = json.loads(meta.read_text())
    if verify and "sha256" in info:
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        if digest != info["sha256"]:
            raise ValueError(
                f"{weights}: SHA-256 {digest} does not match {meta} ({info['sha256']})"
            )
    model = build_model(info["arch"], **info["model_kwargs"])
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), info


def get_trained(
    name: str,
    *,
    epochs: int | None = None,
    seed: int = 0,
    width: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    batch_size: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    train_subset: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    classes: list[int] | tuple[int, ...] | None = None,
    device: torch.device | str | None = None,
    data_root: str | os.PathLike | None = None,
    progress: bool = True,
    max_steps: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``name`` on Fashion-MNIST (32x32) or reuse the cached checkpoint.

    Arguments left at ``None`` take the model's :data:`PRESETS` value; the checkpoint is reused
    when its JSON records exactly the same settings (unless ``force``).

    Args:
        name: a registered model (:data:`netfold.models.MODELS`) with a preset.
        epochs: training epochs.
        seed: seeds initialisation, data order, augmentation and dropout.
        width: channel multiplier.
        cache_dir: checkpoint directory (see :func:`default_cache_dir`).
        force: retrain and overwrite even if a checkpoint exists.
        batch_size: train batch size.
        lr: peak learning rate.
        optimizer: ``"sgd"`` (Nesterov momentum 0.9) or ``"adamw"``.
        train_subset: train on this many seeded-random train images.
        model_kwargs: extra constructor kwargs (merged over the preset's).
        classes: train on these labels only (e.g. ``[0, 1, 2, 3, 4]``), with a
            ``len(classes)``-output head whose logit ``i`` is label ``classes[i]`` (the separate
            heads of ZipIt!'s disjoint-task experiments). Part of the checkpoint key; the
            recorded ``test_accuracy`` is then on the test images of these classes.
        device: training device; default CUDA when available, else CPU.
        data_root: see :func:`netfold.data.fashion_mnist.load_fashion_mnist`.
        progress: tqdm progress bar while training.
        max_steps: cap on optimiser steps (tests); recorded in the settings.

    Returns:
        ``(model, info)``: the model in eval mode on CPU, and the JSON metadata (``arch``,
        ``model_kwargs``, ``test_accuracy``, ``train_time_s``, ``settings``, ...) plus ``path``
        (the ``.safetensors`` file) and ``reused`` (``True`` when nothing was trained).
    """
    overrides: dict[str, Any] = {
        "epochs": epochs,
        "width": width,
        "batch_size": batch_size,
        "lr": lr,
        "optimizer": optimizer,
        "train_subset": train_subset,
    }
    if model_kwargs:
        overrides["model_kwargs"] = {
            **PRESETS.get(name, {}).get("model_kwargs", {}),
            **model_kwargs,
        }
    if max_steps is not None:
        overrides["max_steps"] = int(max_steps)
    if classes is not None:
        overrides["classes"] = classes
    settings = _settings(name, seed, **overrides)
    directory = default_cache_dir(cache_dir)
    stem = directory / checkpoint_stem(settings)
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    with _file_lock(directory / f".{stem.name}.lock"):
        if not force and weights.is_file() and meta.is_file():
            try:
                model, info = load_checkpoint(stem)
            except (ValueError, OSError, KeyError, RuntimeError, json.JSONDecodeError):
                info = None  # corrupt or stale: retrain below
            if info is not None and info.get("settings") == settings:
                info["path"], info["reused"] = str(weights), True
                return model, info

        dev = (
            torch.device(device)
            if device is not None
            else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        torch.manual_seed(seed)
        model = build_model(name, **settings["model_kwargs"])
        n_params = sum(p.numel() for p in model.parameters())
        machine = _machine()
        stats = train_model(
            model, settings, device=dev, data_root=data_root, progress=progress, max_steps=max_steps
        )
        x_test, y_test = load_fashion_mnist("test", data_root, settings["pad_to"])
        x_test, y_test = select_classes(x_test, y_test, settings.get("classes"))
        te = time.perf_counter()
        acc = evaluate_accuracy(model, x_test, y_test)
        eval_time = time.perf_counter() - te
        model.cpu()
        with contextlib.suppress(OSError):
            # Shared machines: the load says how comparable the wall times are.
            machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        blob = save(state, metadata={"arch": name, "format": f"netfold-ckpt-{_FMT_VERSION}"})
        info = {
            "format_version": _FMT_VERSION,
            "arch": name,
            "model_kwargs": settings["model_kwargs"],
            "num_params": n_params,
            "dataset": "fashion-mnist (train 60k / t10k 10k), zero-padded to 32x32",
            "classes": settings.get("classes"),
            "test_accuracy": round(acc, 4),
            "epochs": settings["epochs"],
            "settings": settings,
            **stats,
            "eval_time_s": round(eval_time, 2),
            "device": str(dev),
            "torch_version": torch.__version__,
            "machine": machine,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sha256": hashlib.sha256(blob).hexdigest(),
        }
        _atomic_write(weights, blob)
        _atomic_write(meta, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    info["path"], info["reused"] = str(weights), False
    return model.eval(), info
