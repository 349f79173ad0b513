"""Streaming fold of a sharded safetensors decoder: one decoder layer resident at a time.

A group's clustering needs only its own layer's weights, so a decoder larger than memory folds
layer by layer. This module is the engine; :mod:`netfold.scale` is the driver that knows the
model families (it passes their structure in as data and callables, so this module never
imports a family or transformers):

- :class:`Checkpoint` reads a Hugging Face folder (``model.safetensors`` or shards with
  ``model.safetensors.index.json``): the tensor table from the safetensors headers, one layer's
  tensors through ``safe_open`` (memory-mapped; the file is closed after each read);
- :func:`fold_layer` loads one layer into a one-layer model (built by the driver), folds it with
  :func:`netfold.fold.decoder.fold_decoder` at explicit widths (the same per-group code the
  in-RAM fold runs) and returns the layer's new tensors in the checkpoint's dtype;
- :class:`WorkDir` holds the per-layer results of a run (``layer-00007.safetensors``, written
  atomically: its presence is the done marker) beside a fingerprint of the plan, so a killed run
  restarts from the last finished layer;
- :func:`run_jobs` runs the layer jobs in this process, in local worker processes or as Ray
  tasks; every job reads the input folder and writes its result into the work folder, so the
  final :func:`assemble` is the same for every mode;
- :func:`assemble` writes the output shards tensor by tensor (:func:`write_safetensors`: the
  format is written directly, so no shard is ever held in memory; unchanged tensors are
  byte-copied from the input), named and split like the input, with an index.

Every job runs with a fixed number of threads, and clustering randomness depends only on the
seed (every group's k-means is seeded with ``config.seed``), so the output bytes do not depend
on the order or the process in which layers were folded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..atomic import fsync_dir, write_json
from ..config import FoldConfig
from ..report import Report
from .decoder import DecoderHooks, cluster_device, fold_decoder

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
WORK_TAG = ".netfold-stream"

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
_COPY_CHUNK = 64 << 20


# --------------------------------------------------------------------------- safetensors files
@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file.

    Attributes:
        file: the file name (inside the checkpoint folder).
        dtype: safetensors dtype name ("BF16", "F32", ...).
        shape: the tensor's shape.
        start / end: byte offsets of its data in the file (absolute).
    """

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensor table and ``__metadata__`` of a safetensors file (header only; no data read).

    Raises:
        ValueError: not a safetensors file (named).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    table = {}
    for name, h in header.items():
        b, e = h["data_offsets"]
        if h["dtype"] not in ST_DTYPES or base + e > size:
            raise ValueError(f"{path}: tensor {name!r} has dtype {h['dtype']} or lies past the end")
        table[name] = TensorInfo(path.name, h["dtype"], tuple(h["shape"]), base + b, base + e)
    return table, meta


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t`` (CPU, contiguous) as safetensors stores them."""
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(
    path: Path,
    entries: Sequence[tuple[str, str, tuple[int, ...], int, Callable[[Any], None]]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file tensor by tensor; no tensor is held longer than its own write.

    Args:
        path: the file (written as is; callers write into a temporary folder).
        entries: ``(name, dtype name, shape, nbytes, write(f))`` in file order; ``write`` writes
            exactly ``nbytes`` bytes of the tensor's data to the open file ``f``.
        metadata: the ``__metadata__`` strings.

    Returns:
        Bytes written.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    off = 0
    for name, dtype, shape, nbytes, _ in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name, _dt, _shape, nbytes, write in entries:
            start = f.tell()
            write(f)
            if f.tell() - start != nbytes:
                raise RuntimeError(f"{path}: tensor {name} wrote {f.tell() - start} != {nbytes}")
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def _copy_range(src: Path, start: int, nbytes: int) -> Callable[[Any], None]:
    def write(f) -> None:
        with open(src, "rb") as s:
            s.seek(start)
            left = nbytes
            while left:
                buf = s.read(min(left, _COPY_CHUNK))
                if not buf:
                    raise ValueError(f"{src}: truncated")
                f.write(buf)
                left -= len(buf)

    return write


# ------------------------------------------------------------------------------ the checkpoint
class Checkpoint:
    """A Hugging Face safetensors folder: the tensor table, and tensors read on demand.

    Args:
        folder: holds ``model.safetensors`` or ``model.safetensors.index.json`` and its shards.

    Raises:
        ValueError: no weights, a shard the index names that is missing or unreadable, or a
            tensor the index maps to a shard that does not hold it (each named).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"{self.folder} is not a folder")
        idx = self.folder / INDEX
        if idx.is_file():
            try:
                weight_map = json.loads(idx.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{idx}: not a safetensors index ({e})") from None
            files = list(dict.fromkeys(weight_map.values()))
        elif (self.folder / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            raise ValueError(f"{self.folder} holds neither {SINGLE} nor {INDEX}")
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise ValueError(f"{self.folder}: shard {missing[0]} named by {INDEX} is missing")
        #: file name -> [tensor names in file order]
        self.files: dict[str, list[str]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        for f in files:
            table, meta = read_header(self.folder / f)
            order = sorted(table, key=lambda n: table[n].start)
            if weight_map is not None:
                order = [n for n in order if weight_map.get(n) == f]
            self.files[f] = order
            self.metadata[f] = meta
            for n in order:
                self.tensors[n] = table[n]
        if weight_map is not None:
            lost = [n for n in weight_map if n not in self.tensors]
            if lost:
                raise ValueError(
                    f"{self.folder}: tensor {lost[0]!r} is mapped to {weight_map[lost[0]]} by "
                    f"{INDEX} but that shard does not hold it"
                )

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def dtype(self) -> torch.dtype:
        """The floating dtype of the weights (the most common one by bytes)."""
        by: dict[str, int] = {}
        for t in self.tensors.values():
            if ST_DTYPES[t.dtype].is_floating_point:
                by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
        if not by:
            raise ValueError(f"{self.folder}: no floating-point weights")
        return ST_DTYPES[max(by, key=by.get)]

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (as stored), each file opened once (memory-mapped) and closed."""
        from safetensors import safe_open

        names = list(names)
        by_file: dict[str, list[str]] = {}
        for n in names:
            if n not in self.tensors:
                raise ValueError(f"{self.folder}: no tensor {n!r}")
            by_file.setdefault(self.tensors[n].file, []).append(n)
        out: dict[str, torch.Tensor] = {}
        for f, ns in by_file.items():
            with safe_open(str(self.folder / f), framework="pt") as h:
                for n in ns:
                    out[n] = h.get_tensor(n)
        return {n: out[n] for n in names}


# ------------------------------------------------------------------------------ layer jobs
@dataclasses.dataclass(frozen=True)
class LayerJob:
    """One decoder layer to fold: everything a worker needs, picklable (no model, no family).

    Attributes:
        src: the input folder.
        work: the work folder (results go there).
        layer: the layer index in the input model.
        tensors: {name in the checkpoint: name in the one-layer model}.
        widths: explicit widths for the one-layer model's groups ({group: channels or query
            heads}); a group not named stays as it is.
        model_config: the input's config.json as a dict (the driver's builder reads it).
        fold_config: :meth:`FoldConfig.to_dict` of the per-layer config.
        threads: torch threads of the job (fixed, so results do not depend on the mode).
        compute_dtype: "float32" or "float64": the dtype the fold math runs in.
        device: where the layer's k-means runs ("cpu", "cuda", "cuda:1"); features and
            merges stay on the CPU.
    """

    src: str
    work: str
    layer: int
    tensors: dict[str, str]
    widths: dict[str, int]
    model_config: dict[str, Any]
    fold_config: dict[str, Any]
    threads: int = 1
    compute_dtype: str = "float32"
    device: str = "cpu"


#: ``(model_config, layer, tensors in the one-layer model's names, compute dtype) -> model``:
#: the driver's one-layer model with these tensors loaded (every other tensor materialised).
LayerBuilder = Callable[[dict[str, Any], int, dict[str, torch.Tensor], torch.dtype], nn.Module]


def fold_layer(
    job: LayerJob, build: LayerBuilder, hooks: DecoderHooks
) -> tuple[dict[str, torch.Tensor], Report]:
    """Fold one decoder layer of ``job.src`` and return its tensors under the checkpoint's names.

    The layer's tensors are read (memory-mapped), cast to ``job.compute_dtype``, loaded into the
    one-layer model ``build`` makes, folded by :func:`fold_decoder` with ``job.widths`` (the
    same per-group code as the in-RAM fold) and cast back to each tensor's stored dtype.

    Returns:
        ({checkpoint name: new tensor}, the layer's Report).
    """
    ckpt = Checkpoint(job.src)
    stored = ckpt.read(job.tensors)
    dt = getattr(torch, job.compute_dtype)
    local = {job.tensors[n]: t.to(dt) for n, t in stored.items()}
    dtypes = {job.tensors[n]: t.dtype for n, t in stored.items()}
    del stored
    model = build(job.model_config, job.layer, local, dt)
    del local
    config = FoldConfig.from_dict(job.fold_config)
    with cluster_device(None if job.device == "cpu" else job.device):
        report = fold_decoder(model, config, hooks, widths=dict(job.widths))
    back = {v: k for k, v in job.tensors.items()}
    out = {}
    for name, t in model.state_dict().items():
        if name in back:
            out[back[name]] = t.detach().to("cpu", dtypes[name]).contiguous()
    if len(out) != len(back):
        lost = sorted(set(back) - set(model.state_dict()))
        raise RuntimeError(f"layer {job.layer}: the folded model lost tensors {lost[:3]}")
    return out, report


# ------------------------------------------------------------------------------ work folder
class WorkDir:
    """Per-layer results of one streaming run, beside the output (``.OUT.netfold-stream``).

    ``plan.json`` fingerprints the plan (input tensor table, config, widths); a folder left by
    a run with another plan is cleared. ``layer-00007.safetensors`` is written to a temporary
    name and renamed, so it exists only when complete: its presence is the done marker.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @classmethod
    def beside(cls, out: str | os.PathLike) -> WorkDir:
        """The work folder of output folder ``out``: its hidden sibling ``.OUT.netfold-stream``."""
        out = Path(out)
        return cls(out.with_name(f".{out.name}{WORK_TAG}"))

    def layer_file(self, i: int) -> Path:
        return self.path / f"layer-{i:05d}.safetensors"

    def done(self, i: int) -> bool:
        return self.layer_file(i).is_file()

    def start(self, fingerprint: str) -> list[int]:
        """Create (or reuse) the folder for ``fingerprint``; returns the layers already done."""
        plan = self.path / "plan.json"
        if self.path.is_dir():
            try:
                same = json.loads(plan.read_text()).get("fingerprint") == fingerprint
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if not plan.is_file():
            write_json(plan, {"fingerprint": fingerprint})
        return sorted(
            int(p.name[6:11])
            for p in self.path.glob("layer-*.safetensors")
            if p.name[6:11].isdigit()
        )

    def save(self, i: int, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Write layer ``i``'s result atomically (tensors, then its info JSON, then the rename)."""
        from safetensors.torch import save_file

        write_json(self.path / f"layer-{i:05d}.json", info)
        final = self.layer_file(i)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        save_file(dict(sorted(tensors.items())), str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(self.path)

    def info(self, i: int) -> dict[str, Any]:
        try:
            return json.loads((self.path / f"layer-{i:05d}.json").read_text())
        except (OSError, ValueError):
            return {}

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def fingerprint(*parts: Any) -> str:
    """sha256 of the JSON of ``parts`` (sorted keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def run_layer_job(job: LayerJob, build: LayerBuilder, hooks: DecoderHooks) -> dict[str, Any]:
    """Fold ``job``'s layer with ``job.threads`` threads and save it into the work folder.

    Returns:
        The layer's info: seconds, bytes read / written, widths, folding costs.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        t0 = time.perf_counter()
        ckpt_bytes = sum(Checkpoint(job.src).tensors[n].nbytes for n in job.tensors)
        tensors, report = fold_layer(job, build, hooks)
        info = {
            "layer": job.layer,
            "seconds": time.perf_counter() - t0,
            "bytes_read": ckpt_bytes,
            "bytes_written": sum(t.numel() * t.element_size() for t in tensors.values()),
            "groups": [
                {"name": g.name, "before": g.width_before, "after": g.width_after, "cost": g.cost}
                for g in report.groups
            ],
            "pid": os.getpid(),
        }
        WorkDir(job.work).save(job.layer, tensors, info)
        return info
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ runners
def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def run_jobs(
    fn: Callable[[LayerJob], dict[str, Any]],
    jobs: Sequence[LayerJob],
    *,
    workers: int = 1,
    ray_address: str | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``fn`` on every job: here (``workers`` 1), in local processes, or as Ray tasks.

    ``fn`` must be importable by name (a module-level function) for processes and Ray. Results
    come back in job order; ``progress`` is called with each as it finishes.

    Raises:
        ValueError: ``workers`` < 1; ImportError: ``ray_address`` given and ray missing.
        Whatever a job raised (the other results stay in the work folder).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not jobs:
        return []
    if ray_address is not None:
        return _run_ray(fn, jobs, ray_address, progress)
    if workers == 1:
        out = []
        for j in jobs:
            out.append(fn(j))
            if progress:
                progress(out[-1])
        return out
    import concurrent.futures as cf
    import multiprocessing as mp

    threads = jobs[0].threads
    ctx = mp.get_context("spawn")  # fork would copy this process's torch thread pools
    results: dict[int, dict[str, Any]] = {}
    with cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)
    ) as ex:
        futs = {ex.submit(fn, j): i for i, j in enumerate(jobs)}
        try:
            for f in cf.as_completed(futs):
                results[futs[f]] = f.result()
                if progress:
                    progress(results[futs[f]])
        except BaseException:
            for f in futs:
                f.cancel()
            raise
    return [results[i] for i in range(len(jobs))]


def _run_ray(
    fn: Callable[[LayerJob], dict[str, Any]],
    jobs: Sequence[LayerJob],
    address: str,
    progress: Callable[[dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError as e:
        raise ImportError("ray_address needs ray: pip install 'netfold[distributed]'") from e
    started = False
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, ignore_reinit_error=True)
        started = True
    try:
        task = ray.remote(num_cpus=jobs[0].threads)(fn)
        refs = {task.remote(j): i for i, j in enumerate(jobs)}
        results: dict[int, dict[str, Any]] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for r in ready:
                results[refs[r]] = ray.get(r)
                if progress:
                    progress(results[refs[r]])
        return [results[i] for i in range(len(jobs))]
    finally:
        if started and address == "local":
            ray.shutdown()


# ------------------------------------------------------------------------------ assembly
def assemble(
    src: Checkpoint,
    work: WorkDir,
    out: Path,
    layer_of: Callable[[str], int | None],
    files: dict[str, str],
) -> dict[str, Any]:
    """Write the folded checkpoint into ``out`` (an empty folder): shards like the input's.

    Output shard ``f`` holds the tensors of input shard ``f`` in the same order: a layer's
    tensors from its result in ``work``, everything else byte-copied from the input. With
    several shards an index is written.

    Args:
        layer_of: checkpoint tensor name -> its decoder layer (None: not a layer tensor).
        files: extra files {name: text} to write (config.json, ...).

    Returns:
        {"bytes_written": ..., "total_size": tensor bytes, "files": [...]}.
    """
    from safetensors import safe_open

    weight_map: dict[str, str] = {}
    total = 0
    written = 0
    for fname, names in src.files.items():
        entries = []
        for n in names:
            i = layer_of(n)
            if i is None:
                info = src.tensors[n]
                entries.append(
                    (
                        n,
                        info.dtype,
                        info.shape,
                        info.nbytes,
                        _copy_range(src.folder / fname, info.start, info.nbytes),
                    )
                )
            else:
                rfile = work.layer_file(i)
                table, _ = read_header(rfile)
                if n not in table:
                    raise RuntimeError(f"{rfile} lacks {n}")
                r = table[n]

                def write(f, rfile=rfile, n=n) -> None:
                    with safe_open(str(rfile), framework="pt") as h:
                        f.write(tensor_bytes(h.get_tensor(n)))

                entries.append((n, r.dtype, r.shape, r.nbytes, write))
            weight_map[n] = fname
            total += entries[-1][3]
        written += write_safetensors(
            out / fname, entries, src.metadata.get(fname) or {"format": "pt"}
        )
    if len(src.files) > 1 or (src.folder / INDEX).is_file():
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    for name, text in files.items():
        (out / name).write_text(text)
    return {"bytes_written": written, "total_size": total, "files": sorted(src.files)}
