"""Kill -9 during saves: does the folder always load as the old or the new model?

Each trial starts a child process that builds a model from a seed and saves it over a folder
holding the previous trial's model, in the netfold format (``netfold:mlp``, ~16 MB) or the
Hugging Face format (a small Llama, ~10 MB), alternating. The parent sends SIGKILL after a
random delay in [0, 1.5 x the save time of an unkilled child] (some children finish first), then loads
the folder with ``netfold.load`` and compares every tensor with the two candidates (the
stored bytes are compared, not computed results, so exact equality is the right test).

Outcomes per trial: "old" (the kill came before the swap), "new" (after), or "corrupted"
(the folder does not load, or loads as neither). Leftover temporary siblings after the next
load are counted too.

Run:
    OMP_NUM_THREADS=1 python benchmarks/save_crash.py --n 30 --seed 0
    # from Python (benchmarks/reliability.py): from save_crash import run; run(30, 0)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

FORMATS = ("netfold", "hf")

_CHILD = r"""
import sys
fmt, folder, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
import importlib.util
spec = importlib.util.spec_from_file_location("save_crash", sys.argv[4])
save_crash = importlib.util.module_from_spec(spec)
spec.loader.exec_module(save_crash)
build = save_crash.build
import netfold
model = build(fmt, seed)
print("ready", flush=True)
sys.stdin.readline()          # the parent starts its clock, then says go
netfold.save(model, folder)
print("done", flush=True)
"""


def build(fmt: str, seed: int) -> torch.nn.Module:
    """The model of trial ``seed`` (random weights from the seed, deterministic).

    Args:
        fmt: "netfold" (an MLP saved as netfold.json + safetensors) or "hf" (a Llama saved with
            save_pretrained).
        seed: weight seed.
    """
    torch.manual_seed(seed)
    if fmt == "netfold":
        from netfold import io

        return io.build("netfold:mlp", {"hidden": [2048, 1024]}).eval()
    if fmt == "hf":
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        cfg = transformers.LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            vocab_size=8000,
            tie_word_embeddings=False,
        )
        return transformers.LlamaForCausalLM(cfg).eval()
    raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _child_env() -> dict[str, str]:
    import netfold

    src = str(Path(netfold.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _start(fmt: str, folder: Path, seed: int, here: str, env: dict[str, str]) -> subprocess.Popen:
    """A child that has built model ``seed`` and waits for "go" before saving it to ``folder``."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, fmt, str(folder), str(seed), here],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        child.kill()
        raise RuntimeError(f"the save child did not start (rc {child.wait()})")
    return child


def _go(child: subprocess.Popen) -> None:
    assert child.stdin is not None
    child.stdin.write("go\n")
    child.stdin.flush()


def run(n: int, seed: int, workdir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run ``n`` killed saves (formats alternate) and count how the folder survived.

    Args:
        n: number of trials (>= 1).
        seed: seeds the kill delays and the model weights.
        workdir: where to put the folders (a fresh temporary folder by default).

    Returns:
        ``{"saves": n, "corrupted": k, "old": .., "new": .., "leftovers": .., "killed": ..,
        "save_seconds": {fmt: s}, "trials": [...]}``; ``corrupted`` must be 0.

    Raises:
        ValueError: ``n`` < 1.
    """
    import netfold

    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="netfold-crash-", dir=workdir))
    env = _child_env()
    here = str(Path(__file__).resolve())  # the child loads build() from this file
    folders, current, save_s = {}, {}, {}
    for fmt in FORMATS:
        folders[fmt] = root / fmt
        model = build(fmt, seed * 1000)
        netfold.save(model, folders[fmt])
        current[fmt] = _state(model)
        # calibrate the kill window on an unkilled child save of the same model
        child = _start(fmt, folders[fmt], seed * 1000, here, env)
        t0 = time.perf_counter()
        _go(child)
        line = child.stdout.readline()  # "done" right after the save, before the slow exit
        save_s[fmt] = time.perf_counter() - t0
        if child.wait() != 0 or line.strip() != "done":
            raise RuntimeError(f"calibration save ({fmt}) failed: rc {child.returncode}")
    counts = {"old": 0, "new": 0, "corrupted": 0, "killed": 0, "leftovers": 0}
    trials = []
    for i in range(n):
        fmt = FORMATS[i % len(FORMATS)]
        s = seed * 1000 + i + 1
        child = _start(fmt, folders[fmt], s, here, env)
        delay = rng.uniform(0.0, 1.5 * save_s[fmt])
        _go(child)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        rc = child.wait()
        killed = rc == -signal.SIGKILL
        counts["killed"] += killed
        new = _state(build(fmt, s))
        try:
            got = _state(netfold.load(folders[fmt]))
            outcome = (
                "old" if _same(got, current[fmt]) else "new" if _same(got, new) else "corrupted"
            )
        except Exception as e:  # noqa: BLE001 - any failure to load is a corruption
            outcome = "corrupted"
            print(f"trial {i} ({fmt}): load failed: {type(e).__name__}: {e}", file=sys.stderr)
        if outcome == "new":
            current[fmt] = new
        left = [p.name for p in root.iterdir() if p.name.startswith(".")]
        counts["leftovers"] += len(left)
        counts[outcome] += 1
        trials.append(
            {"fmt": fmt, "delay_s": round(delay, 4), "killed": killed, "outcome": outcome}
        )
    shutil.rmtree(root, ignore_errors=True)
    return {"saves": n, **counts, "save_seconds": save_s, "trials": trials}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args(argv)
    res = run(args.n, args.seed)
    summary = {k: res[k] for k in ("saves", "old", "new", "corrupted", "killed", "leftovers")}
    print(json.dumps(summary))
    if args.out:
        from netfold.atomic import write_json

        write_json(args.out, res)
    return 1 if res["corrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
