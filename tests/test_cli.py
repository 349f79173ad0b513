"""The command line through ``netfold.cli.main``: fold / eval / export on small CNNs, exit codes
(0 ok, 2 usage error with a one-line message, 1 internal error), outputs checked before work.

Run: PYTHONPATH=$PWD/src .venv/bin/pytest -q tests/test_cli.py
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import netfold
import netfold.cli as cli
from netfold import hub
from netfold import FoldConfig
from netfold.eval.cost import count_params
from netfold.io import build

ARCH = {"width": 0.25}


@pytest.fixture
def saved_cnn(tmp_path):
    """A small CNN (1 input channel, 8/16/16/32 channels) saved as a netfold folder."""
    torch.manual_seed(0)
    m = build("netfold:small_cnn", ARCH).eval()
    d = tmp_path / "in"
    netfold.save(m, d)
    return d


def _err(capsys) -> str:
    """stderr of a refused run: exactly one line, the netfold error, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def _forbid_work(monkeypatch) -> None:
    """Make loading a model fail loudly: a refused run must stop before it."""

    def boom(*a, **k):
        raise AssertionError("the model was loaded although the arguments were invalid")

    monkeypatch.setattr(hub, "load", boom)


# ------------------------------------------------------------------------------- fold
def test_fold_cnn_saves_the_same_model_the_api_makes(saved_cnn, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert cli.main(["fold", str(saved_cnn), "--ratio", "0.5", "--out", str(out)]) == 0
    assert f"saved to {out}" in capsys.readouterr().out
    folded = netfold.load(out)
    ref = netfold.load(saved_cnn)
    rep = netfold.fold(ref, FoldConfig(ratio=0.5))  # same config, same seed: same fold
    assert count_params(folded) == rep.params_after == 2_886
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref(x), atol=1e-5, rtol=1e-5)
    meta = json.loads((out / "netfold.json").read_text())["metadata"]["report"]
    assert meta["params_before"] == 10_946 and meta["params_after"] == 2_886
    assert meta["sparsity"] == pytest.approx(rep.sparsity, abs=1e-12)
    assert {g["name"]: g["width_after"] for g in meta["groups"]} == {
        "conv1": 4,
        "conv2+1": 8,
        "block.conv1": 8,
        "conv3": 16,
    }
    assert meta["skipped"] == [["fc", "model output"]]


def test_fold_target_sparsity_and_skip(saved_cnn, tmp_path) -> None:
    out = tmp_path / "out"
    args = ["fold", str(saved_cnn), "--target-sparsity", "0.5", "--skip", "conv1", "--out"]
    assert cli.main([*args, str(out)]) == 0
    meta = json.loads((out / "netfold.json").read_text())["metadata"]["report"]
    widths = {g["name"]: (g["width_before"], g["width_after"]) for g in meta["groups"]}
    assert widths["conv1"] == (8, 8)  # skipped: kept whole
    assert meta["sparsity"] == pytest.approx(0.5, abs=0.05)
    assert meta["config"]["ratio"] is None and meta["config"]["target_sparsity"] == 0.5


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_fold_out_that_cannot_be_written_is_refused_first(
    where, saved_cnn, tmp_path, capsys, monkeypatch
) -> None:
    f = tmp_path / "taken"
    f.write_text("keep me")
    out = f if where == "file" else f / "sub"
    _forbid_work(monkeypatch)
    assert cli.main(["fold", str(saved_cnn), "--out", str(out)]) == 2
    line = _err(capsys)
    assert line.startswith("netfold: error: --out ") and str(out) in line
    assert ("existing file" if where == "file" else "is a file, not a directory") in line
    assert f.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_fold_out_in_unwritable_folder_is_refused(saved_cnn, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _forbid_work(monkeypatch)
        assert cli.main(["fold", str(saved_cnn), "--out", str(ro / "out")]) == 2
        assert "not writable" in _err(capsys)
        assert not (ro / "out").exists()
    finally:
        ro.chmod(0o700)


def test_fold_out_that_cannot_be_written_is_refused_even_for_root(saved_cnn, capsys, monkeypatch):
    # /proc takes no new files for anyone, root included (os.access would say yes to root).
    out = "/proc/netfold-cannot-write/out"
    _forbid_work(monkeypatch)
    assert cli.main(["fold", str(saved_cnn), "--out", out]) == 2
    line = _err(capsys)
    assert line.startswith("netfold: error: --out ") and "not writable" in line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ratio", "1.5"], "ratio must lie in [0, 1), got 1.5"),
        (["--model-kwargs", "{width: 1}"], "--model-kwargs is not valid JSON"),
        (["--model-kwargs", "[1]"], "--model-kwargs must be a JSON object"),
        (["--input-shape", "1,x"], "--input-shape must look like C,H,W"),
        (["--data", "cifar10"], "--data 'cifar10' is unknown"),
        (["--repair", "data"], "--repair data needs calibration images"),
        (["--calib", "0"], "--calib must be >= 1"),
        (["--round-to", "0"], "--round-to must be >= 1"),
    ],
)
def test_fold_bad_options_exit_2_before_loading(
    extra, message, saved_cnn, tmp_path, capsys, monkeypatch
) -> None:
    _forbid_work(monkeypatch)
    out = tmp_path / "out"
    assert cli.main(["fold", str(saved_cnn), *extra, "--out", str(out)]) == 2
    assert message in _err(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--skip", "layer4.*"], "skip pattern 'layer4.*' matches no group"),
        (["--input-shape", "3,32,32"], "--input-shape inputs of shape (2, 3, 32, 32) do not fit"),
    ],
)
def test_fold_refused_after_loading_leaves_no_output(
    extra, message, saved_cnn, tmp_path, capsys
) -> None:
    out = tmp_path / "out"
    before = (saved_cnn / "model.safetensors").read_bytes()
    assert cli.main(["fold", str(saved_cnn), *extra, "--out", str(out)]) == 2
    assert message in _err(capsys)
    assert not out.exists()
    assert (saved_cnn / "model.safetensors").read_bytes() == before


def test_argparse_usage_errors_and_help_exit_codes(saved_cnn, capsys) -> None:
    assert cli.main(["fold", str(saved_cnn), "--ratio", "0.2", "--target-sparsity", "0.2"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert cli.main(["no-such-command"]) == 2
    assert cli.main(["fold"]) == 2
    assert cli.main(["fold", str(saved_cnn), "--ratio", "half"]) == 2
    capsys.readouterr()
    assert cli.main(["--help"]) == 0
    assert "--debug" in capsys.readouterr().out


# ------------------------------------------------------------------------------- model inputs
@pytest.mark.parametrize(
    "case", ["missing-file", "missing-path", "plain-folder", "unknown-arch", "bad-weights"]
)
def test_models_that_cannot_load_exit_2(case, tmp_path, capsys) -> None:
    if case == "missing-file":
        spec, extra, message = str(tmp_path / "nope.safetensors"), [], "does not exist"
    elif case == "missing-path":
        spec, extra = str(tmp_path / "gone" / "model"), []
        message = f"model path {spec} does not exist"
    elif case == "plain-folder":
        (tmp_path / "empty").mkdir()
        spec, extra, message = str(tmp_path / "empty"), [], "folder without netfold.json"
    elif case == "unknown-arch":
        spec, extra, message = "netfold:no_such_net", [], "unknown netfold model 'no_such_net'"
    else:
        w = tmp_path / "w.pth"
        torch.save({"conv1.weight": torch.zeros(1)}, w)
        spec, extra = "netfold:small_cnn", ["--weights", str(w)]
        message = f"--weights {w} do not fit netfold:small_cnn"
    assert cli.main(["fold", spec, *extra, "--out", str(tmp_path / "out")]) == 2
    assert message in _err(capsys)
    assert not (tmp_path / "out").exists()


def _damage(d, how: str) -> None:
    p = d / "netfold.json"
    if how == "invalid-json":
        p.write_text(p.read_text()[:40])
        return
    info = json.loads(p.read_text())
    if how == "missing-key":
        del info["arch"]
    elif how == "wrong-type-widths":
        info["widths"] = [1, 2, 3]
    else:  # wrong-type-kwargs
        info["kwargs"] = "width=0.25"
    p.write_text(json.dumps(info))


@pytest.mark.parametrize(
    "how", ["invalid-json", "missing-key", "wrong-type-widths", "wrong-type-kwargs"]
)
@pytest.mark.parametrize("cmd", ["fold", "eval"])
def test_damaged_netfold_json_exits_2_naming_the_file(cmd, how, saved_cnn, tmp_path, capsys):
    _damage(saved_cnn, how)
    extra = ["--out", str(tmp_path / "out")] if cmd == "fold" else ["--data", "none"]
    assert cli.main([cmd, str(saved_cnn), *extra]) == 2
    line = _err(capsys)
    assert line.startswith("netfold: error: ") and "netfold.json" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- internal errors
def test_internal_error_exits_1_briefly_and_debug_shows_traceback(
    saved_cnn, tmp_path, capsys, monkeypatch
) -> None:
    import netfold.api

    def broken(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(netfold.api, "fold", broken)
    out = tmp_path / "out"
    assert cli.main(["fold", str(saved_cnn), "--out", str(out)]) == 1
    line = _err(capsys)
    assert line.startswith("netfold: internal error: RuntimeError: injected failure")
    assert "--debug" in line and not out.exists()
    assert cli.main(["fold", str(saved_cnn), "--out", str(out), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "injected failure" in err
    # usage errors show a traceback only with --debug too
    assert cli.main(["--debug", "fold", str(saved_cnn), "--ratio", "2"]) == 2
    assert "Traceback" in capsys.readouterr().err


# ------------------------------------------------------------------------------- eval
def test_eval_without_data_prints_params(saved_cnn, capsys) -> None:
    assert cli.main(["eval", str(saved_cnn), "--data", "none"]) == 0
    assert "params 10,946" in capsys.readouterr().out
    assert cli.main(["eval", str(saved_cnn), "--data", "imagenet"]) == 2
    assert "--data 'imagenet' is unknown" in _err(capsys)


def _have_fashion_mnist() -> bool:
    try:
        from netfold.data.fashion_mnist import find_fashion_mnist
    except ImportError:
        return False
    return find_fashion_mnist() is not None


@pytest.mark.real
@pytest.mark.skipif(not _have_fashion_mnist(), reason="Fashion-MNIST not installed")
def test_eval_fashion_mnist_and_a_model_it_does_not_fit(saved_cnn, tmp_path, capsys) -> None:
    assert cli.main(["eval", str(saved_cnn), "--data", "fashion-mnist"]) == 0
    out = capsys.readouterr().out
    assert "FLOPs" in out and "on fashion-mnist test (10000 images)" in out
    acc = float(out.split("accuracy ")[1].split("%")[0])
    assert 0.0 <= acc <= 100.0
    rgb = tmp_path / "rgb"
    netfold.save(build("netfold:small_cnn", {"in_channels": 3, **ARCH}), rgb)
    assert cli.main(["eval", str(rgb), "--data", "fashion-mnist"]) == 2
    assert "--data fashion-mnist inputs of shape (1, 1, 32, 32) do not fit" in _err(capsys)


# ------------------------------------------------------------------------------- export etc.
@pytest.mark.slow  # the ONNX exporter takes ~9 s on 2 cores
def test_export_cnn_to_onnx(tmp_path, capsys) -> None:
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "m.onnx"
    rc = cli.main(["export", "resnet18", "--onnx", str(out), "--image-size", "32", "--no-check"])
    assert rc == 0
    graph = onnx.load(str(out)).graph
    assert sum(n.op_type == "Conv" for n in graph.node) == 20  # resnet18: 17 + 3 downsample
    assert f"wrote {out}" in capsys.readouterr().out


def test_export_bad_outputs_and_models_exit_2(tmp_path, capsys, monkeypatch) -> None:
    pytest.importorskip("onnx")
    out = tmp_path / "m.onnx"
    out.write_bytes(b"not a model")
    def boom(*a, **k):
        raise AssertionError("loaded a model although --onnx cannot be written")

    monkeypatch.setattr(hub, "load", boom)
    assert cli.main(["export", "resnet18", "--onnx", str(tmp_path)]) == 2
    assert "--onnx" in (line := _err(capsys)) and "existing directory" in line
    assert cli.main(["export", "resnet18", "--onnx", str(out / "x.onnx")]) == 2
    assert "is a file, not a directory" in _err(capsys)
    assert cli.main(["export", "resnet18", "--onnx", str(tmp_path / "b.onnx"), "--batch", "0"]) == 2
    assert "--batch must be >= 1" in _err(capsys)
    monkeypatch.undo()
    assert cli.main(["export", "no_such_net", "--onnx", str(tmp_path / "c.onnx")]) == 2
    assert "unknown model 'no_such_net'" in _err(capsys)
    assert not (tmp_path / "c.onnx").exists()


def test_collapse_and_bench_latency_check_outputs_first(saved_cnn, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnx")
    f = tmp_path / "taken"
    f.write_text("x")
    _forbid_work(monkeypatch)
    assert cli.main(["collapse", str(saved_cnn), "--out", str(f)]) == 2
    assert "--out" in (line := _err(capsys)) and "existing file" in line
    assert cli.main(["collapse", str(saved_cnn), "--data", "mnist"]) == 2
    assert "--data 'mnist' is unknown" in _err(capsys)
    assert cli.main(["bench-latency", "resnet18", "--json", str(tmp_path)]) == 2
    assert "--json" in (line := _err(capsys)) and "existing directory" in line
    assert cli.main(["bench-latency", "resnet18", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in _err(capsys)
    assert f.read_text() == "x"
