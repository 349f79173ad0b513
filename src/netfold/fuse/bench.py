"""Latency of one model along several execution paths, measured together (interleaved).

Paths are named ``[variant_][fused_|fusednhwc_]backend``:

* ``eager``: the model as given; ``fused``: a :func:`netfold.fuse`-d copy in eager PyTorch;
  ``fusednhwc``: the same with ``FuseConfig(channels_last=True)`` (Conv2d weights channels-last);
* ``compile`` / ``fused_compile``: ``torch.compile`` (inductor, ``freezing=True`` so weights are
  constant-folded and prepacked, the CPU inference setting);
* ``ort`` / ``fused_ort``: ``torch.onnx`` export run by ONNX Runtime with all graph
  optimisations (static shapes, one file per batch size);
* ``<variant>...``: the same for another model passed in ``variants`` (e.g. ``folded``,
  ``folded_fused_ort``), so compressed and original models are timed in the same rounds.

Every path's output is compared with the eager output of its own base model.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from netfold.eval.cost import count_flops, count_params
from netfold.eval.latency import machine_info, measure_interleaved
from netfold.fuse.config import FuseConfig
from netfold.fuse.core import fuse
from netfold.fuse.record import call_model
from netfold.fuse.verify import flat_outputs

__all__ = ["PATHS", "benchmark_paths", "parse_path", "path_label", "randomize_bn"]

PATHS = ("eager", "fused", "compile", "fused_compile", "ort", "fused_ort")
BACKENDS = ("eager", "compile", "ort")
FUSE_MODES = ("fused", "fusednhwc")


def parse_path(path: str, variants: tuple[str, ...] = ()) -> tuple[str | None, str | None, str]:
    """``"folded_fused_ort"`` -> ``("folded", "fused", "ort")``; ``"eager"`` ->
    ``(None, None, "eager")``; ``"fusednhwc"`` -> ``(None, "fusednhwc", "eager")``."""
    toks = path.split("_")
    variant = toks.pop(0) if toks and toks[0] in variants else None
    mode = toks.pop(0) if toks and toks[0] in FUSE_MODES else None
    backend = toks.pop(0) if toks else "eager"
    if toks or backend not in BACKENDS:
        raise ValueError(
            f"bad path {path!r}: use [variant_][fused_|fusednhwc_](eager|compile|ort), "
            f"variants {variants}"
        )
    return variant, mode, backend


def _first_output(out: Any) -> torch.Tensor:
    outs = flat_outputs(out)
    if not outs:
        raise ValueError("model returned no floating-point tensor")
    return outs[0]


def benchmark_paths(
    model: nn.Module,
    inputs_by_batch: dict[int, Any],
    *,
    paths: tuple[str, ...] | list[str] = PATHS,
    variants: dict[str, nn.Module] | None = None,
    threads: int = 2,
    repeats: int = 15,
    warmup: int = 5,
    calls_per_round: int = 3,
    settle_calls: int = 1,
    workdir: str | os.PathLike[str] | None = None,
    model_name: str = "model",
    fuse_config: FuseConfig | None = None,
    log: Callable[[str], None] | None = print,
    before_timing: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Measure the latency of ``paths`` for each batch size, interleaved within a batch size.

    Args:
        model: the original model (not modified: fused variants are deep copies).
        inputs_by_batch: batch size -> example inputs (Tensor, args tuple or kwargs dict).
        paths: path names (see the module docstring).
        variants: extra base models addressable as path prefixes (names without "_").
        threads: torch intra-op threads and ONNX Runtime intra-op threads.
        repeats / warmup: rounds / untimed calls per path before the first round.
        calls_per_round / settle_calls: timed / untimed calls per path per round (see
            :func:`netfold.eval.latency.measure_interleaved`); the median is over
            ``repeats * calls_per_round`` timed calls.
        workdir: where ONNX files are written (a temporary directory if None).
        model_name: label in the results.
        fuse_config: config for the fused copies (``FuseConfig()`` if None; "fusednhwc"
            paths use it with ``channels_last=True``).
        log: progress messages (None: silent).
        before_timing: called right before each batch size's timed rounds (e.g. to wait for a
            shared machine to quieten down).

    Returns:
        A JSON-serialisable dict: machine and versions, threads, per-base params/FLOPs and fuse
        summaries, and per batch size the latency statistics, speed-ups vs ``eager`` and max
        abs error of every path against its base model's eager output.
    """
    say = log or (lambda _msg: None)
    variants = dict(variants or {})
    for v in variants:
        if "_" in v or v in ("eager",) + FUSE_MODES + BACKENDS:
            raise ValueError(f"variant name {v!r} must not contain '_' or be a path keyword")
    parsed = {p: parse_path(p, tuple(variants)) for p in paths}
    bases: dict[str | None, nn.Module] = {None: model.eval()}
    bases.update({k: m.eval() for k, m in variants.items()})
    smallest = min(inputs_by_batch)
    result: dict[str, Any] = {
        "model": model_name,
        "threads": threads,
        "repeats": repeats,
        "calls_per_round": calls_per_round,
        "settle_calls": settle_calls,
        "warmup": warmup,
        "paths": list(paths),
        "machine": machine_info(),
        "bases": {},
        "batches": {},
    }

    # Fused copies (one per base that needs one), verified by fuse itself.
    fused: dict[tuple[str | None, str], nn.Module] = {}
    for variant, mode, _ in parsed.values():
        if mode is not None and (variant, mode) not in fused:
            m = copy.deepcopy(bases[variant])
            say(f"[{model_name}] fusing {variant or 'model'} ({mode}) ...")
            cfg = fuse_config or FuseConfig()
            if mode == "fusednhwc":
                cfg = dataclasses.replace(cfg, channels_last=True)
            rep = fuse(m, cfg, example_inputs=inputs_by_batch[smallest])
            fused[(variant, mode)] = m
            result["bases"][path_label(variant, mode)] = {
                "fuse": {
                    k: rep.extra.get(k)
                    for k in (
                        "fusions_applied",
                        "candidates_rejected",
                        "rolled_back",
                        "max_abs_err",
                        "max_rel_err",
                        "max_abs_err_float64",
                        "max_rel_err_float64",
                    )
                },
                "fuse_seconds": rep.seconds,
            }

    def get_model(variant: str | None, mode: str | None) -> nn.Module:
        return fused[(variant, mode)] if mode is not None else bases[variant]

    compiled: dict[tuple[str | None, str | None], Any] = {}
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    wd = tmp.name if tmp is not None else os.fspath(workdir)
    old_freezing = None
    try:
        import torch._inductor.config as inductor_config

        old_freezing = inductor_config.freezing
        inductor_config.freezing = True
    except Exception:  # noqa: BLE001 - no inductor: compile paths will fail loudly below
        inductor_config = None
    try:
        for batch in sorted(inputs_by_batch):
            x = inputs_by_batch[batch]
            fns: dict[str, Callable[[], Any]] = {}
            refs: dict[str | None, torch.Tensor] = {}
            errors: dict[str, float] = {}
            flops: dict[str, int] = {}
            for path, (variant, mode, backend) in parsed.items():
                m = get_model(variant, mode)
                label = path_label(variant, mode)
                if label not in flops:
                    flops[label] = count_flops(m, x)
                    info = result["bases"].setdefault(label, {})
                    info["params"] = count_params(m)
                if variant not in refs:
                    with torch.no_grad():
                        refs[variant] = _first_output(call_model(bases[variant], x))
                if backend == "eager":
                    fns[path] = _eager(m, x)
                elif backend == "compile":
                    key = (variant, mode)
                    if key not in compiled:
                        compiled[key] = torch.compile(m, dynamic=False)
                    say(f"[{model_name}] b{batch} compiling {path} ...")
                    fns[path] = _eager(compiled[key], x)
                else:
                    from netfold.export import export_onnx, ort_session

                    f = os.path.join(wd, f"{model_name.replace('/', '_')}_{label}_b{batch}.onnx")
                    say(f"[{model_name}] b{batch} exporting {path} ...")
                    export_onnx(m, x, f)
                    sess = ort_session(f, threads=threads)
                    fns[path] = _ort(sess, x)
                with torch.no_grad():
                    out = fns[path]()
                got = out if isinstance(out, torch.Tensor) else _first_output(out)
                errors[path] = float((got.double() - refs[variant].double()).abs().max())
            if before_timing is not None:
                before_timing()
            say(f"[{model_name}] b{batch} timing {len(fns)} paths x {repeats} rounds ...")
            load_before = _loadavg()
            stats = measure_interleaved(
                fns,
                warmup=warmup,
                repeats=repeats,
                threads=threads,
                calls_per_round=calls_per_round,
                settle_calls=settle_calls,
            )
            lat = {p: s.to_dict() for p, s in stats.items()}
            base_ms = lat.get("eager", {}).get("median_ms")
            result["batches"][str(batch)] = {
                "latency": lat,
                "speedup_vs_eager": (
                    {p: base_ms / s["median_ms"] for p, s in lat.items()} if base_ms else {}
                ),
                "max_abs_err": errors,
                "flops": flops,
                "loadavg_before_timing": load_before,
                "loadavg_after_timing": _loadavg(),
            }
    finally:
        if inductor_config is not None and old_freezing is not None:
            inductor_config.freezing = old_freezing
        if tmp is not None:
            tmp.cleanup()
    result["machine"]["loadavg_end"] = machine_info().get("loadavg_1_5_15")
    return result


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def path_label(variant: str | None, mode: str | None) -> str:
    """The model a path runs, as named in results: "original", "folded+fused", "original+fused+nhwc"."""
    base = variant or "original"
    return {None: base, "fused": f"{base}+fused"}.get(mode, f"{base}+fused+nhwc")


def _eager(m: Any, x: Any) -> Callable[[], Any]:
    if isinstance(x, torch.Tensor):
        return lambda: m(x)
    if isinstance(x, dict):
        return lambda: m(**x)
    return lambda: m(*x)


def _ort(sess: Any, x: Any) -> Callable[[], Any]:
    from netfold.export import ort_feed

    feed = ort_feed(sess, x)  # numpy conversion once, outside the timed call

    def run() -> torch.Tensor:
        return torch.from_numpy(sess.run(None, feed)[0])

    return run


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (in place).

    Freshly constructed BatchNorms have mean 0, var 1, weight 1, bias 0: folding them is
    trivially exact. Random statistics make exactness tests and benchmarks meaningful.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                    m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(c, generator=g))
                    m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model
