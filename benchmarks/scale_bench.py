"""Streaming fold at scale: Llama-2-7B / Llama-3-8B-shaped checkpoints, workers, SmolLM2.

Run (late, on a quiet machine; it generates ~30 GB of synthetic checkpoints):
    PYTHONPATH=src python benchmarks/scale_bench.py                       # everything
    PYTHONPATH=src python benchmarks/scale_bench.py --parts llama2-7b     # one part
    PYTHONPATH=src python benchmarks/scale_bench.py --parts ray smollm2 --keep
    PYTHONPATH=src python benchmarks/scale_bench.py --parts llama3-8b --layers-8b 8

Parts (results merge into benchmarks/results/scale.json, one key per part):

- ``llama2-7b`` / ``llama3-8b``: write the synthetic checkpoint (benchmarks/make_synthetic_llama.py,
  bf16, 5 GB shards) unless present, fold it with ``netfold fold DIR --stream`` semantics
  (:func:`netfold.scale.fold_folder`, ``target_sparsity=0.2`` of non-embedding parameters) in a
  child process, and sample the child's resident memory (with its own children) every 50 ms.
  Recorded: peak RSS, seconds per layer and total, bytes read and written, widths. Then the
  reload check: the folded folder is run layer by layer (one layer resident) on 8 tokens next to
  the original, logits compared.
- ``ray``: a multi-layer synthetic model (8 layers, hidden 1024) folded with Ray on 1 CPU and on
  2 CPUs (``ray.init(num_cpus=...)``), one job thread each; the speed-up and byte identity.
- ``smollm2``: the real SmolLM2-135M (cached fp32 export, see /work/shared/ASSETS.md) folded by
  streaming and in RAM at 20% non-embedding sparsity; the weights must be identical.

Every part records the load average before and after (other jobs on the machine slow it down).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
SYNTH = Path.home() / ".cache" / "netfold" / "synthetic"
SHAPE_PARTS = ("llama2-7b", "llama3-8b")


def _git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> dict:
    import psutil
    import torch

    return {
        "cpus": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


class RssSampler:
    """Peak resident memory of a process and all its children, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.every = every
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, rss)
            except psutil.Error:
                return
            time.sleep(self.every)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def _ensure_checkpoint(shape: str, log, layers: int | None = None) -> tuple[Path, float | None]:
    from netfold.bench import synthetic as g

    spec = dict(g.SHAPES[shape])
    d = SYNTH / shape
    if layers:
        spec["num_hidden_layers"] = layers
        d = SYNTH / f"{shape}-{layers}layers"
    if (d / "config.json").is_file():
        return d, None
    t0 = time.perf_counter()
    g.write_checkpoint(d, spec, progress=True)
    dt = time.perf_counter() - t0
    log(f"{shape}: wrote {d} in {dt:.0f} s")
    return d, dt


def _child_fold(args: argparse.Namespace) -> int:
    """Child process: fold one folder, write the Report's numbers as JSON."""
    import torch

    import netfold
    from netfold.scale import fold_folder

    cfg = netfold.FoldConfig(target_sparsity=args.sparsity)
    rep = fold_folder(
        args.src,
        args.out,
        cfg,
        threads=args.threads,
        workers=args.workers,
        progress=True,
        compute_dtype=torch.float32,
    )
    res = {
        "seconds": rep.seconds,
        "params_before": rep.params_before,
        "params_after": rep.params_after,
        "extra": rep.extra,
        "widths": [(g.name, g.width_before, g.width_after) for g in rep.groups],
    }
    Path(args.result).write_text(json.dumps(res, default=str))
    return 0


def _fold_in_child(src: Path, out: Path, sparsity: float, threads: int, workers: int = 1):
    res_file = out.with_name(out.name + ".result.json")
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--src",
        str(src),
        "--out",
        str(out),
        "--sparsity",
        str(sparsity),
        "--threads",
        str(threads),
        "--workers",
        str(workers),
        "--result",
        str(res_file),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env)
    with RssSampler(p.pid) as s:
        rc = p.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"fold of {src} failed with exit code {rc}")
    res = json.loads(res_file.read_text())
    res_file.unlink()
    res["peak_rss_gb"] = round(s.peak / 1e9, 3)
    res["wall_seconds"] = wall
    return res


def layerwise_logits(folder: Path, ids):
    """Logits of the model in ``folder`` computed one decoder layer at a time, (n, seq, vocab).

    Only one layer's weights (and the embedding / head) are resident: a check that the folded
    checkpoint loads and runs, for models that do not fit in memory as a whole.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from netfold.families.decoders import LAYER_WIDTHS_KEY, resize_layers
    from netfold.fold.stream import Checkpoint

    ck = Checkpoint(folder)
    cfg = AutoConfig.from_pretrained(folder)
    per_layer = getattr(cfg, LAYER_WIDTHS_KEY, None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        if per_layer:
            resize_layers(model, per_layer)
    from netfold.families.decoders import sync_decoder

    if per_layer:
        sync_decoder(model)
    rot = type(model.model.rotary_emb)(config=cfg)  # real buffers (built on CPU)
    # embedding and head stay in the stored dtype (a 128k-row float32 table is 2 GB)
    emb = ck.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    head = (
        emb if "lm_head.weight" not in ck.tensors else ck.read(["lm_head.weight"])["lm_head.weight"]
    )
    norm = ck.read(["model.norm.weight"])["model.norm.weight"].float()
    model.model.norm.load_state_dict({"weight": norm}, assign=True)
    with torch.no_grad():
        h = torch.nn.functional.embedding(ids, emb).float()
        pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        pe = rot(h, pos)
        for i, layer in enumerate(model.model.layers):
            pre = f"model.layers.{i}."
            t = ck.read([n for n in ck.tensors if n.startswith(pre)])
            layer.load_state_dict({k[len(pre) :]: v.float() for k, v in t.items()}, assign=True)
            out = layer(h, position_embeddings=pe, position_ids=pos)
            h = out[0] if isinstance(out, tuple) else out
            model.model.layers[i] = torch.nn.Identity()  # free the layer
        h = model.model.norm(h)
        logits = torch.cat(
            [h @ head[r : r + 8192].float().t() for r in range(0, head.shape[0], 8192)], -1
        )
    return logits


def part_shape(shape: str, args, log) -> dict:
    import torch

    layers = args.layers_8b if shape == "llama3-8b" else None
    src, gen_seconds = _ensure_checkpoint(shape, log, layers)
    out = SYNTH / f"{shape}-folded"
    shutil.rmtree(out, ignore_errors=True)
    load0 = os.getloadavg()
    res = _fold_in_child(src, out, args.sparsity, args.threads)
    load1 = os.getloadavg()
    ex = res["extra"]
    secs = [s for s in ex["layer_seconds"] if s is not None]
    log(
        f"{shape}: {res['seconds']:.0f} s, peak {res['peak_rss_gb']} GB, layer {sum(secs) / len(secs):.1f} s"
    )
    ids = torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    with RssSampler(os.getpid()) as s:
        a = layerwise_logits(src, ids)
        b = layerwise_logits(out, ids)
    check = {
        "tokens": ids.shape[1],
        "finite": bool(torch.isfinite(b).all()),
        "relative_logit_error": float((a - b).norm() / a.norm()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "seconds": time.perf_counter() - t0,
        "peak_rss_gb_bench_process": round(s.peak / 1e9, 3),
    }
    log(f"{shape}: reload check {check}")
    in_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "source": str(src),
        "layers_folded": len(secs),
        "note": (
            f"{len(secs)} of the shape's 32 layers (same per-layer shapes and full vocabulary); "
            "total_seconds_projected_32_layers scales the layer time"
            if layers
            else None
        ),
        "total_seconds_projected_32_layers": (
            res["seconds"] - sum(secs) + 32 * sum(secs) / len(secs) if layers else res["seconds"]
        ),
        "generation_seconds": gen_seconds,
        "target_sparsity": args.sparsity,
        "threads": args.threads,
        "total_seconds": res["seconds"],
        "wall_seconds_with_startup": res["wall_seconds"],
        "peak_rss_gb": res["peak_rss_gb"],
        "layer_seconds": ex["layer_seconds"],
        "layer_seconds_mean": sum(secs) / len(secs),
        "layer_seconds_max": max(secs),
        "assemble_seconds": ex["assemble_seconds"],
        "bytes_read_layers": ex["bytes_read"],
        "bytes_written": ex["bytes_written"],
        "input_weight_bytes": in_bytes,
        "output_weight_bytes": out_bytes,
        "non_embedding_sparsity": ex["non_embedding_sparsity"],
        "params_before": res["params_before"],
        "params_after": res["params_after"],
        "widths_first_layer": res["widths"][:2],
        "save_format": ex["save_format"],
        "reload_check": check,
        "loadavg_before": load0,
        "loadavg_after": load1,
    }


def part_ray(args, log) -> dict:
    import ray

    import netfold
    from netfold.bench import synthetic as g
    from netfold.scale import fold_folder

    shape = dict(g.SHAPES["tiny"])
    shape.update(
        hidden_size=1024,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=2752,
        vocab_size=4096,
    )
    src = SYNTH / "ray-8x1024"
    if not (src / "config.json").is_file():
        g.write_checkpoint(src, shape, shard_bytes=50_000_000)
    cfg = netfold.FoldConfig(target_sparsity=0.2)
    times, outs = {}, {}
    load0 = os.getloadavg()
    for cpus in (1, 2):
        out = SYNTH / f"ray-out-{cpus}"
        shutil.rmtree(out, ignore_errors=True)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            t0 = time.perf_counter()
            rep = fold_folder(src, out, cfg, threads=1, ray_address="auto")
            times[cpus] = time.perf_counter() - t0
            outs[cpus] = rep.extra["jobs_seconds"]
        finally:
            ray.shutdown()
        log(f"ray {cpus} cpu(s): {times[cpus]:.1f} s total, jobs {outs[cpus]:.1f} s")
    load1 = os.getloadavg()
    same = all(
        (SYNTH / "ray-out-1" / f.name).read_bytes() == f.read_bytes()
        for f in sorted((SYNTH / "ray-out-2").iterdir())
    )
    for cpus in (1, 2):
        shutil.rmtree(SYNTH / f"ray-out-{cpus}", ignore_errors=True)
    return {
        "model": shape,
        "threads_per_job": 1,
        "total_seconds": {"1": times[1], "2": times[2]},
        "jobs_seconds": {"1": outs[1], "2": outs[2]},
        "speedup_total": times[1] / times[2],
        "speedup_jobs": outs[1] / outs[2],
        "identical_bytes": same,
        "loadavg_before": load0,
        "loadavg_after": load1,
    }


def part_smollm2(args, log) -> dict:
    import torch

    import netfold
    from netfold.hub import SMOLLM2_CACHE, load_pretrained, load_smollm2
    from netfold.scale import fold_folder

    if not (SMOLLM2_CACHE / "config.json").is_file():
        load_smollm2()  # exports the fp32 folder once
    cfg = netfold.FoldConfig(target_sparsity=0.2)
    out = SYNTH / "smollm2-stream"
    shutil.rmtree(out, ignore_errors=True)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    rep = fold_folder(SMOLLM2_CACHE, out, cfg, threads=args.threads)
    t_stream = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = load_pretrained(SMOLLM2_CACHE, dtype=torch.float32)
    netfold.fold(ref, cfg)
    t_ram = time.perf_counter() - t0
    got = load_pretrained(out, dtype=torch.float32)
    a, b = ref.state_dict(), got.state_dict()
    same = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    maxdiff = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].shape == b[k].shape)
    ids = torch.arange(100, 132)[None]
    with torch.no_grad():
        logits_same = bool(torch.equal(ref(ids).logits, got(ids).logits))
    load1 = os.getloadavg()
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    log(f"smollm2: identical {same}, stream {t_stream:.0f} s, in RAM {t_ram:.0f} s")
    return {
        "target_sparsity": 0.2,
        "identical_weights": same,
        "identical_logits": logits_same,
        "max_abs_weight_diff": maxdiff,
        "stream_seconds": t_stream,
        "in_ram_seconds": t_ram,
        "non_embedding_sparsity": rep.extra["non_embedding_sparsity"],
        "threads": args.threads,
        "loadavg_before": load0,
        "loadavg_after": load1,
    }


def table(results: dict) -> str:
    """The markdown table of docs/scale.md, from the results JSON."""
    rows = [
        "| model | layers folded | peak RSS | s / layer (mean, max) | total | bytes read / written "
        "| non-emb. sparsity | reload check | load avg (1 min) before / after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for part in SHAPE_PARTS:
        r = results.get(part)
        if not r:
            continue
        chk = r["reload_check"]
        total = f"{r['total_seconds'] / 60:.1f} min"
        if r.get("note"):
            total += f" ({r['total_seconds_projected_32_layers'] / 60:.1f} min for 32 layers)"
        rows.append(
            f"| {part}-shaped, bf16 | {r.get('layers_folded', len(r['layer_seconds']))} | {r['peak_rss_gb']:.2f} GB "
            f"| {r['layer_seconds_mean']:.0f}, {r['layer_seconds_max']:.0f} | {total} "
            f"| {r['bytes_read_layers'] / 1e9:.1f} / {r['bytes_written'] / 1e9:.1f} GB "
            f"| {r['non_embedding_sparsity']:.3f} | finite {chk['finite']}, rel. logit error "
            f"{chk['relative_logit_error']:.3f} | {r['loadavg_before'][0]:.1f} / "
            f"{r['loadavg_after'][0]:.1f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="*", default=[*SHAPE_PARTS, "ray", "smollm2"])
    p.add_argument("--sparsity", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep folded outputs and checkpoints")
    p.add_argument(
        "--layers-8b", type=int, help="fold a Llama-3-8B shape with this many layers (time)"
    )
    p.add_argument("--out", default=str(RESULTS))
    # child mode (one fold, measured from the parent)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--table", action="store_true", help="print the docs table and exit")
    a = p.parse_args(argv)
    if a.table:
        print(table(json.loads(Path(a.out).read_text())))
        return 0
    if a.child:
        a.out = a.out
        return _child_fold(a)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    path = Path(a.out)
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update(
        command="PYTHONPATH=src python benchmarks/scale_bench.py " + " ".join(argv or sys.argv[1:]),
        git_revision=_git_rev(),
        machine=_machine(),
        date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    )
    for part in a.parts:
        if part in SHAPE_PARTS:
            results[part] = part_shape(part, a, log)
        elif part == "ray":
            results[part] = part_ray(a, log)
        elif part == "smollm2":
            results[part] = part_smollm2(a, log)
        else:
            raise SystemExit(f"unknown part {part!r}")
        results[part]["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        results[part]["command"] = results["command"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
