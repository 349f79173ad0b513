"""Tests for ONNX export + ONNX Runtime sessions, latency measurement and cost counting.

Run: .venv/bin/python -m pytest tests/test_export_latency.py -q
"""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
from torch import nn

from netfold.cli.fuse import add_bench_latency_parser, add_export_parser, cmd_export
from netfold.eval.cost import count_flops, count_params
from netfold.eval.latency import (
    format_latency_table,
    measure_interleaved,
    measure_latency,
    torch_threads,
)
from netfold.fuse import fuse
from netfold.fuse.bench import benchmark_paths, parse_path, randomize_bn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from netfold.export import check_onnx, export_onnx, ort_session, run_ort  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(8, 16),
        nn.Linear(16, 4),
    )
    return randomize_bn(m).eval()


# ---- cost ----------------------------------------------------------------------------------------


def test_count_params_counts_tied_tensors_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    assert count_params(model) == 40
    assert count_params(nn.Linear(3, 2)) == 8


def test_count_flops_matches_closed_form_and_has_no_side_effects():
    m = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
    m.train()
    mean_before = m[1].running_mean.clone()
    assert count_flops(m, torch.randn(4, 6)) == 2 * 4 * 6 * 5  # BatchNorm is not counted
    assert torch.equal(m[1].running_mean, mean_before)  # ran in eval mode
    assert m.training and m[1].training  # flags restored


# ---- ONNX ----------------------------------------------------------------------------------------


def test_fused_model_exports_and_matches_ort_with_negative_control(tmp_path):
    m = _cnn()
    x = torch.randn(2, 3, 8, 8)
    fuse(m, example_inputs=x)
    path = export_onnx(m, x, tmp_path / "cnn.onnx", dynamic_batch=True)
    sess = ort_session(path, threads=2)
    assert sess.get_session_options().intra_op_num_threads == 2
    err = check_onnx(m, x, sess)
    assert err.ok and err.max_rel_err < 1e-5  # measured ~1e-7
    # Dynamic batch: another batch size runs on the same file.
    x5 = torch.randn(5, 3, 8, 8)
    (y5,) = run_ort(sess, x5)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y5), m(x5), rtol=1e-4, atol=1e-5)
    # Negative control: a perturbed PyTorch model no longer matches the exported graph.
    bad = copy.deepcopy(m)
    (head,) = [layer for layer in bad if isinstance(layer, nn.Linear)]  # the merged classifier
    with torch.no_grad():
        head.weight.mul_(1.001)
    assert not check_onnx(bad, x, sess).ok


def test_export_with_kwargs_inputs(tmp_path):
    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, input_ids, scale=1.0):
            return self.lin(input_ids) * scale

    m = KW().eval()
    x = {"input_ids": torch.randn(2, 4), "scale": 2.0}
    path = export_onnx(m, x, tmp_path / "kw.onnx")
    assert check_onnx(m, x, path).ok


def test_ort_session_rejects_bad_settings(tmp_path):
    m = nn.Linear(3, 2).eval()
    path = export_onnx(m, torch.randn(1, 3), tmp_path / "lin.onnx")
    with pytest.raises(ValueError):
        ort_session(path, optimization="max")
    with pytest.raises(ValueError):
        ort_session(path, threads=0)


# ---- latency -------------------------------------------------------------------------------------


class _FakeClock:
    """A ``time`` stand-in whose ``perf_counter`` only moves when a timed callable says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def work(self, seconds: float):
        def fn() -> None:
            self.now += seconds

        return fn


def test_measure_latency_statistics_with_an_injected_clock(monkeypatch):
    """Known durations in, exact statistics out: no wall clock, no sleeping."""
    import netfold.eval.latency as lat

    clock = _FakeClock()
    monkeypatch.setattr(lat, "time", clock)
    durations = iter([0.5, 0.5, 0.004, 0.001, 0.003, 0.010, 0.002, 0.006, 0.005])  # 2 warm-up
    calls = []

    def fn() -> None:
        calls.append(1)
        clock.now += next(durations)

    st = measure_latency(fn, warmup=2, repeats=7, threads=1)
    assert len(calls) == 9
    assert (st.runs, st.warmup, st.threads) == (7, 2, 1)
    ms = sorted([4.0, 1.0, 3.0, 10.0, 2.0, 6.0, 5.0])  # warm-up calls are not timed
    assert st.median_ms == pytest.approx(4.0, abs=1e-9)
    assert st.min_ms == pytest.approx(1.0, abs=1e-9)
    assert st.mean_ms == pytest.approx(sum(ms) / 7, abs=1e-9)
    # linear interpolation between order statistics: p10 at 0.6, p90 at 5.4
    assert st.p10_ms == pytest.approx(1.0 + 0.6 * (2.0 - 1.0), abs=1e-9)
    assert st.p90_ms == pytest.approx(6.0 + 0.4 * (10.0 - 6.0), abs=1e-9)


def test_measure_interleaved_times_each_callable_separately(monkeypatch):
    import netfold.eval.latency as lat

    clock = _FakeClock()
    monkeypatch.setattr(lat, "time", clock)
    counts = {"fast": 0, "slow": 0}

    def make(name: str, seconds: float):
        def fn() -> None:
            counts[name] += 1
            clock.now += seconds

        return fn

    stats = measure_interleaved(
        {"fast": make("fast", 0.001), "slow": make("slow", 0.006)},
        warmup=2,
        repeats=9,
        calls_per_round=2,
        settle_calls=1,
    )
    # per callable: 2 warm-up + 9 rounds x (1 settle + 2 timed)
    assert counts == {"fast": 29, "slow": 29}
    assert stats["fast"].runs == stats["slow"].runs == 18
    assert stats["fast"].median_ms == pytest.approx(1.0, abs=1e-9)
    assert stats["slow"].median_ms == pytest.approx(6.0, abs=1e-9)
    assert stats["slow"].p90_ms == pytest.approx(6.0, abs=1e-9)


def test_measure_latency_on_a_real_tiny_model():
    """A real forward pass, measured: only sanity of the numbers, which depend on the CPU."""
    model = _cnn()
    x = torch.randn(2, 3, 8, 8)
    st = measure_latency(lambda: model(x), warmup=1, repeats=5, threads=1)
    assert st.runs == 5 and st.threads == 1
    assert 0 < st.min_ms <= st.p10_ms <= st.median_ms <= st.p90_ms
    assert st.min_ms <= st.mean_ms


def test_torch_threads_restores_setting():
    before = torch.get_num_threads()
    with torch_threads(1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError), torch_threads(0):
        pass


def test_parse_path():
    assert parse_path("eager") == (None, None, "eager")
    assert parse_path("fused_ort") == (None, "fused", "ort")
    assert parse_path("fusednhwc") == (None, "fusednhwc", "eager")
    assert parse_path("folded_fused_compile", ("folded",)) == ("folded", "fused", "compile")
    with pytest.raises(ValueError):
        parse_path("fused_tensorrt")


def test_benchmark_paths_times_every_path_and_checks_outputs(tmp_path):
    m = _cnn()
    folded = copy.deepcopy(m)
    res = benchmark_paths(
        m,
        {1: torch.randn(1, 3, 8, 8), 2: torch.randn(2, 3, 8, 8)},
        paths=["eager", "fused", "fused_ort", "small"],
        variants={"small": folded},
        threads=1,
        repeats=3,
        warmup=1,
        workdir=tmp_path,
        model_name="cnn",
        log=None,
    )
    json.dumps(res)  # serialisable
    assert res["threads"] == 1 and "cpu" in res["machine"] and "onnxruntime" in res["machine"]
    for b in ("1", "2"):
        row = res["batches"][b]
        assert set(row["latency"]) == {"eager", "fused", "fused_ort", "small"}
        assert row["speedup_vs_eager"]["eager"] == 1.0
        assert row["max_abs_err"]["eager"] == 0.0
        assert row["max_abs_err"]["fused"] < 1e-5 and row["max_abs_err"]["fused_ort"] < 1e-5
        assert row["flops"]["original"] >= row["flops"]["original+fused"]
    assert res["bases"]["original+fused"]["fuse"]["fusions_applied"] > 0
    assert res["bases"]["original+fused"]["params"] < res["bases"]["original"]["params"]
    table = format_latency_table({"models": [res]})
    assert "| cnn | 2 | fused_ort |" in table


# ---- CLI handlers --------------------------------------------------------------------------------


def test_cli_export_handler_writes_a_checked_onnx(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="netfold")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_export_parser(sub)
    add_bench_latency_parser(sub)
    out = tmp_path / "r18.onnx"
    args = parser.parse_args(
        ["export", "resnet18", "--onnx", str(out), "--fuse", "--image-size", "32"]
    )
    assert args.func is cmd_export
    assert args.func(args) == 0
    assert out.exists()
    text = capsys.readouterr().out
    assert "conv_bn" in text and "ONNX Runtime vs PyTorch" in text
    bench = parser.parse_args(["bench-latency", "resnet18", "--batch", "1", "8", "--threads", "2"])
    assert bench.batch == [1, 8] and bench.threads == 2
