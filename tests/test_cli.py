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
from netfold import FoldConfig, hub
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


# ------------------------------------------------------------------------------- the loader
def test_help_documents_every_option_and_version(capsys) -> None:
    import argparse

    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {a.option_strings or a.dest}"
        for name, p in subs.choices.items()
        for a in p._actions
        if not isinstance(a, argparse._HelpAction) and not a.help
    ]
    assert missing == []
    assert {"fold", "eval", "export", "bench-latency", "collapse"} <= set(subs.choices)
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"netfold {netfold.__version__}"
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "netfold export r18/ --onnx r18.onnx" in out


def test_eval_of_a_torchvision_name_uses_imagenet_inputs(capsys) -> None:
    assert cli.main(["eval", "resnet18", "--model-kwargs", '{"num_classes": 10}']) == 0
    out = capsys.readouterr().out
    assert "params 11,181,642" in out
    assert "input shape (3, 224, 224) (default for torchvision ImageNet models)" in out
    # resnet18 at 224x224: 1.82 GMACs, 2 FLOPs each (FlopCounterMode counts conv + linear)
    flops = int(out.split("FLOPs")[1].split("per")[0].replace(",", ""))
    assert flops == pytest.approx(3.64e9, rel=0.01)


class _Pooled(torch.nn.Module):
    """Three input channels and adaptive pooling: an ImageNet-style model of unknown size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture
def pooled_arch():
    netfold.register_arch("clitest:Pooled", _Pooled, overwrite=True)
    yield "clitest:Pooled"
    from netfold import registry

    registry.unregister_arch("clitest:Pooled")


def test_fold_warns_when_it_guesses_the_input_shape_and_records_it(
    pooled_arch, tmp_path, capsys
) -> None:
    out = tmp_path / "out"
    assert cli.main(["fold", pooled_arch, "--ratio", "0.5", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "input shape (3, 224, 224) (guessed: ImageNet-style" in cap.out
    assert "warning: input shape (3, 224, 224)" in cap.err and "--input-shape" in cap.err
    meta = json.loads((out / "netfold.json").read_text())["metadata"]
    assert meta["input_shape"] == [3, 224, 224]
    # the folder's recorded shape is reused, without a warning
    assert cli.main(["eval", str(out)]) == 0
    cap = capsys.readouterr()
    assert "input shape (3, 224, 224) (recorded by netfold fold)" in cap.out
    assert "warning" not in cap.err
    # an explicit shape is not a guess: no warning, and it is what gets recorded
    assert cli.main(["fold", pooled_arch, "--input-shape", "3,40,40", "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
    meta = json.loads((out / "netfold.json").read_text())["metadata"]
    assert meta["input_shape"] == [3, 40, 40]


def test_fold_dtype_sets_the_saved_dtype(saved_cnn, tmp_path, capsys) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "bf"
    assert cli.main(["fold", str(saved_cnn), "--dtype", "bf16", "--out", str(out)]) == 0
    assert "(bfloat16)" in capsys.readouterr().out
    dtypes = {t.dtype for t in load_file(str(out / "model.safetensors")).values()}
    assert torch.bfloat16 in dtypes and torch.float32 not in dtypes
    assert cli.main(["eval", str(out)]) == 0
    assert "dtype bfloat16" in (text := capsys.readouterr().out) and "params 2,886" in text
    assert cli.main(["eval", str(out), "--dtype", "fp32"]) == 0
    assert "dtype float32" in capsys.readouterr().out
    assert cli.main(["fold", str(saved_cnn), "--dtype", "int8", "--out", str(out)]) == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_hub_id_offline_exits_2_at_once(monkeypatch, capsys) -> None:
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    assert cli.main(["eval", "someorg/somemodel"]) == 2
    assert time.perf_counter() - t0 < 10  # no retries: measured 0.1 s
    line = _err(capsys)
    assert "cannot reach the Hugging Face hub for 'someorg/somemodel'" in line
    assert "offline: HF_HUB_OFFLINE=1" in line


def _tiny_llama_folder(path):
    """A random 2-layer Llama saved with save_pretrained (no tokenizer), float32."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def test_fold_smollm2_goes_through_the_loader(tmp_path, monkeypatch, capsys) -> None:
    tiny = _tiny_llama_folder(tmp_path / "tiny")
    calls = []

    def fake_smollm2():
        calls.append(1)
        return tiny, None

    monkeypatch.setattr(hub, "load_smollm2", fake_smollm2)
    out = tmp_path / "out"
    assert cli.main(["fold", "smollm2", "--ratio", "0.5", "--out", str(out)]) == 0
    assert calls == [1] and (out / "config.json").is_file()
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 32


def _params_line(text: str) -> int:
    return int(text.split("params ")[1].split()[0].replace(",", ""))


def _ort_outputs(path, feed: dict) -> list:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: feed[n] for n in names})


def _check_bench(res: dict, folded: str) -> None:
    """The latency JSON: both paths timed, ORT agreeing with eager, the command recorded."""
    b1 = res["batches"]["1"]
    assert set(b1["latency"]) == {"eager", "ort"}
    assert all(v["median_ms"] > 0 for v in b1["latency"].values())
    assert b1["max_abs_err"]["ort"] < 1e-4
    assert res["command"].startswith(f"netfold bench-latency {folded} ")


def _chain(spec: str, tmp_path, capsys, fold_args: list[str], extra: list[str]) -> dict:
    """fold -> eval -> export --onnx -> bench-latency, each reading what the previous wrote."""
    folded, onnx, bench = tmp_path / "folded", tmp_path / "m.onnx", tmp_path / "bench.json"
    assert cli.main(["fold", spec, *fold_args, "--out", str(folded)]) == 0
    fold_out = capsys.readouterr().out
    assert folded.is_dir()
    assert cli.main(["eval", str(folded)]) == 0
    eval_out = capsys.readouterr().out
    assert cli.main(["export", str(folded), "--onnx", str(onnx), *extra]) == 0
    export_out = capsys.readouterr().out
    assert onnx.is_file() and "ONNX Runtime vs PyTorch" in export_out
    fast = ["--batch", "1", "--paths", "eager,ort", "--repeats", "1", "--warmup", "0"]
    fast += ["--calls-per-round", "1", "--threads", "1", "--json", str(bench)]
    assert cli.main(["bench-latency", str(folded), *fast, *extra]) == 0
    bench_out = capsys.readouterr().out
    assert bench.is_file() and "| ort |" in bench_out
    return {
        "folded": folded,
        "onnx": onnx,
        "bench": json.loads(bench.read_text()),
        "fold": fold_out,
        "eval": eval_out,
        "export": export_out,
    }


@pytest.mark.slow  # ~25 s on 2 cores: resnet18 fold, two ONNX exports
def test_chain_folded_torchvision_resnet18(tmp_path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    kw = ["--model-kwargs", '{"num_classes": 10}', "--input-shape", "3,64,64", "--ratio", "0.5"]
    r = _chain("resnet18", tmp_path, capsys, kw, [])
    assert "input shape (3, 64, 64) (from --input-shape)" in r["fold"]
    model, _, info = hub.load(str(r["folded"]))
    assert info.input_shape == (3, 64, 64) and info.input_note == "recorded by netfold fold"
    meta = json.loads((r["folded"] / "netfold.json").read_text())["metadata"]["report"]
    n = count_params(model)
    assert _params_line(r["eval"]) == n == meta["params_after"]
    assert meta["params_before"] == 11_181_642 and n < 0.3 * 11_181_642  # measured 2,801,450
    assert "input shape (3, 64, 64) (recorded by netfold fold)" in r["eval"]
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    (got,) = _ort_outputs(r["onnx"], {n: x.numpy() for n in ("x", "input", "l_x_")})
    assert got.shape == (1, 10)
    assert abs(got - ref).max() < 1e-4  # measured ~1e-6
    assert abs(got - ref - 1e-2).max() > 1e-4  # negative control: a shifted output fails
    _check_bench(r["bench"], str(r["folded"]))


@pytest.mark.slow  # ~20 s on 2 cores: two ONNX exports of a decoder
def test_chain_folded_tiny_llama_hf_folder(tmp_path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    dense = _tiny_llama_folder(tmp_path / "hf")
    r = _chain(str(tmp_path / "hf"), tmp_path, capsys, ["--ratio", "0.5"], ["--seq-len", "8"])
    model, tok, info = hub.load(str(r["folded"]))
    assert tok is None and info.kind == "tokens"
    assert model.config.intermediate_size == 32  # 64 -> 32
    meta = json.loads((r["folded"] / "netfold_metadata.json").read_text())["report"]
    n = count_params(model)
    assert _params_line(r["eval"]) == n == meta["params_after"] < count_params(dense)
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.numpy()
    got = _ort_outputs(r["onnx"], {"input_ids": ids.numpy()})[0]
    assert got.shape == ref.shape == (1, 8, 96)
    assert abs(got - ref).max() < 1e-4  # measured ~1e-7
    with torch.no_grad():
        dense_logits = dense(input_ids=ids, use_cache=False).logits.numpy()
    assert abs(got - dense_logits).max() > 1e-3  # negative control: the unfolded model differs
    _check_bench(r["bench"], str(r["folded"]))


@pytest.mark.slow  # ~20 s on 2 cores: the ONNX exporter, twice
def test_chain_small_cnn_saved_in_bf16(saved_cnn, tmp_path, capsys) -> None:
    """The fast chain: a bf16 save exports and benchmarks in float32, at its recorded shape."""
    pytest.importorskip("onnxruntime")
    r = _chain(str(saved_cnn), tmp_path, capsys, ["--ratio", "0.5", "--dtype", "bf16"], [])
    assert "dtype bfloat16" in r["eval"] and _params_line(r["eval"]) == 2_886
    assert "input shape (1, 32, 32) (recorded by netfold fold)" in r["export"]
    model, _, info = hub.load(str(r["folded"]), dtype="fp32")
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    (got,) = _ort_outputs(r["onnx"], {"x": x.numpy()})
    assert abs(got - ref).max() < 1e-4  # measured ~3e-8: the same bf16 values in float32
    _check_bench(r["bench"], str(r["folded"]))


def test_fold_then_eval_and_bench_latency_without_onnx(saved_cnn, tmp_path, capsys) -> None:
    """The chain's fast part: what fold writes, eval and bench-latency read (no exporter)."""
    folded, bench = tmp_path / "folded", tmp_path / "b.json"
    assert cli.main(["fold", str(saved_cnn), "--input-shape", "1,24,24", "--out", str(folded)]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(folded)]) == 0
    out = capsys.readouterr().out
    assert "input shape (1, 24, 24) (recorded by netfold fold)" in out
    assert _params_line(out) == 2_886
    fast = ["--batch", "2", "--paths", "eager,fused", "--repeats", "1", "--warmup", "0"]
    assert cli.main(["bench-latency", str(folded), *fast, "--json", str(bench)]) == 0
    assert "input shape (1, 24, 24) (recorded by netfold fold)" in capsys.readouterr().out
    b2 = json.loads(bench.read_text())["batches"]["2"]
    assert set(b2["latency"]) == {"eager", "fused"}
    assert b2["max_abs_err"]["fused"] < 1e-4


def test_fold_and_eval_an_encoder_folder(tmp_path, capsys) -> None:
    """A BERT folder (config names BertModel): folded heads reload through the netfold format."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        architectures=["BertModel"],
    )
    dense = transformers.BertModel(cfg).eval()
    dense.save_pretrained(tmp_path / "bert")
    out = tmp_path / "out"
    assert cli.main(["fold", str(tmp_path / "bert"), "--ratio", "0.5", "--out", str(out)]) == 0
    assert (out / "netfold.json").is_file()
    capsys.readouterr()
    assert cli.main(["eval", str(out)]) == 0
    folded, _, info = hub.load(str(out))
    assert info.kind == "tokens" and type(folded).__name__ == "BertModel"
    assert _params_line(capsys.readouterr().out) == count_params(folded) < count_params(dense)
    ref = hub.load(str(tmp_path / "bert"))[0]
    netfold.fold(ref, FoldConfig(ratio=0.5, llm=folded_llm_config()))  # what the CLI ran
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = folded(ids).last_hidden_state, ref(ids).last_hidden_state
        assert (got - dense(ids).last_hidden_state).abs().max() > 1e-3  # negative control
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def folded_llm_config():
    """The LLM options of ``netfold fold`` at their defaults."""
    from netfold.config import LLMConfig

    return LLMConfig(heads="query", correction="lsq", features="auto", synth_start="random")
