"""Train (or reuse) the reference Fashion-MNIST models that the folding benchmarks start from.

Run:
    .venv/bin/python benchmarks/train_fmnist.py --model small_cnn resnet18_cifar vgg11_bn_cifar

Each model is trained with its preset from ``netfold.models.train.PRESETS`` (override with the
flags), seeded (initialisation, data order, augmentation, dropout), on Fashion-MNIST zero-padded
to 32x32 and normalised, at batch 128 with a one-cycle schedule; the test (t10k) accuracy is
measured and the checkpoint is written outside git to ``--cache-dir`` / ``$NETFOLD_CACHE`` /
``~/.cache/netfold/checkpoints`` as ``<name>_fmnist_seed<seed>.safetensors`` + ``.json``. An
existing checkpoint with the same settings is reused unless ``--force``.

How the settings were chosen. One SGD step at batch 128 on this 2-core CPU machine
(``torch.set_num_threads(2)``, idle machine, 1x32x32 input): full-width ResNet18 2.97 s (23 min
per epoch, over the ~12-minute budget by itself), ResNet18 width 0.5 0.61-0.68 s, VGG11-BN
width 1.0 0.61-0.79 s, VGG11-BN width 0.5 0.17-0.20 s, small_cnn 0.14 s. Both paper models are
therefore trained at width 0.5 on the full 60k train split:

==============  =====  ======  ==========================  =========  ========  ======  ========
model           width  epochs  optimiser (peak lr), aug.   params     idle est  wall    test acc
==============  =====  ======  ==========================  =========  ========  ======  ========
small_cnn       1.0    2       AdamW (3e-3), none          168,170    2.2 min   14.8 m  89.96 %
resnet18_cifar  0.5    2       SGD (0.1), crop+flip        2,797,034  10 min    30.1 m  91.59 %
vgg11_bn_cifar  0.5    5       SGD (0.05), crop+flip       2,707,786  7-8 min   17.3 m  91.80 %
==============  =====  ======  ==========================  =========  ========  ======  ========

"idle est" = steps x measured step time on the idle machine; "wall" = the actual seed-0 runs,
made while other jobs kept the load average at 4-8 on the 2 cores (1 torch thread, see
``--threads``); both are in each checkpoint's JSON (``train_time_s``, ``machine.loadavg_*``).
SGD is Nesterov momentum 0.9, weight decay 5e-4 on weights; crop = random crop with 2 px padding
of the black background, flip = horizontal flip with p=1/2. Evaluating the 10k test images took
15 s (small_cnn), 60 s (ResNet18) and 22 s (VGG11) under that load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from netfold.models.train import PRESETS, default_cache_dir, get_trained


def _threads(spec: str) -> int:
    """``"auto"`` -> CPU cores minus the 1-minute load average (at least 1); else an int."""
    cores = os.cpu_count() or 1
    if spec != "auto":
        n = int(spec)
        return n if n > 0 else cores
    try:
        load = os.getloadavg()[0]
    except OSError:
        return cores
    return max(1, min(cores, cores - round(load)))


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train or reuse each requested model, print a JSON summary per model."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model", nargs="+", default=["small_cnn"], choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None, help="default: the model's preset")
    ap.add_argument("--width", type=float, default=None, help="default: the model's preset")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--optimizer", choices=["sgd", "adamw"], default=None)
    ap.add_argument("--train-subset", type=int, default=None, help="train on N random images")
    ap.add_argument(
        "--cache-dir", default=None, help="default: $NETFOLD_CACHE or ~/.cache/netfold/checkpoints"
    )
    ap.add_argument("--data-root", default=None, help="directory with the Fashion-MNIST IDX files")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument(
        "--threads",
        default="auto",
        help="torch CPU threads; 'auto': the cores left idle by the current load (at least 1), "
        "because on an oversubscribed machine 2 threads ran 2x slower than 1 (OpenMP barriers)",
    )
    ap.add_argument("--force", action="store_true", help="retrain even if a checkpoint exists")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--results-json", default=None, help="also write the summaries to this file")
    args = ap.parse_args(argv)

    print(f"checkpoints: {default_cache_dir(args.cache_dir)}", file=sys.stderr)
    summaries = []
    for name in args.model:
        torch.set_num_threads(_threads(args.threads))  # re-read the load before each model
        print(f"{name}: torch threads {torch.get_num_threads()}", file=sys.stderr)
        t0 = time.perf_counter()
        _, info = get_trained(
            name,
            epochs=args.epochs,
            seed=args.seed,
            width=args.width,
            cache_dir=args.cache_dir,
            force=args.force,
            batch_size=args.batch_size,
            lr=args.lr,
            optimizer=args.optimizer,
            train_subset=args.train_subset,
            device=args.device,
            data_root=args.data_root,
            progress=not args.no_progress,
        )
        summary = {
            "model": name,
            "model_kwargs": info["model_kwargs"],
            "epochs": info["epochs"],
            "num_params": info["num_params"],
            "test_accuracy": info["test_accuracy"],
            "train_time_s": info["train_time_s"],
            "path": info["path"],
            "reused": info["reused"],
            "wall_time_s": round(time.perf_counter() - t0, 1),
        }
        summaries.append(summary)
        print(json.dumps(summary), flush=True)
    if args.results_json:
        from netfold.atomic import write_json

        write_json(args.results_json, summaries, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
