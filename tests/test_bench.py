"""Tests of the experiment sweep (``netfold bench``) and its plots, on a random small CNN.

Run: python -m pytest tests/test_bench.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

import netfold.models.train as train
from netfold.bench import merge_results, plot_results, run_sweep, validate
from netfold.bench.torch_pruning import available as tp_available
from netfold.bench.torch_pruning import tp_magnitude_prune
from netfold.cli import main as cli_main
from netfold.data.fashion_mnist import find_fashion_mnist
from netfold.models import build_model

# the sweeps evaluate on the Fashion-MNIST test split; without it they cannot run
needs_fmnist = pytest.mark.skipif(
    find_fashion_mnist() is None,
    reason="Fashion-MNIST absent: apt-get install -y dataset-fashion-mnist",
)


@pytest.fixture
def random_small_cnn(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1, num_classes=10, width=0.5).eval()

    def fake_get_trained(name, seed=0, **kw):
        return model, {"path": str(tmp_path / f"{name}.safetensors"), "sha256": "random"}

    monkeypatch.setattr(train, "get_trained", fake_get_trained)
    return model


def _config() -> dict:
    return {
        "name": "tiny",
        "models": ["small_cnn"],
        "ratios": [0.0, 0.5],
        "n_test": 200,
        "n_var": 64,
        "calibration": 128,
        "runs": [
            {"label": "Fold", "method": "kmeans", "repairs": ["none", "data"]},
            {"label": "Magnitude L2", "method": "magnitude-l2", "repairs": ["data"]},
            {"label": "Torch-Pruning L2", "method": "torch-pruning-l2", "repairs": ["none"]},
            {
                "label": "Clusterer: spectral",
                "method": "spectral",
                "repairs": ["data"],
                "ratios": [0.5],
            },
        ],
        "per_layer_variance": {"ratio": 0.5, "runs": ["Fold"]},
    }


@pytest.mark.real
@needs_fmnist
def test_sweep_rows_resume_and_plots(random_small_cnn, tmp_path):
    out = tmp_path / "res.json"
    res = run_sweep(_config(), out, progress=False)
    n_expected = 2 * 2 + 2 + (2 if tp_available() else 0) + 1
    assert len(res["rows"]) == n_expected
    dense = res["models"]["small_cnn"]["dense_accuracy"]
    by = {(r["label"], r["repair"], r["ratio"]): r for r in res["rows"]}
    # ratio 0 is the identity: same accuracy as dense, no sparsity
    assert by[("Fold", "none", 0.0)]["accuracy"] == pytest.approx(dense, abs=1e-9)
    assert by[("Fold", "none", 0.0)]["sparsity"] == pytest.approx(0.0, abs=1e-12)
    assert by[("Fold", "none", 0.5)]["sparsity"] > 0.5
    assert by[("Magnitude L2", "data", 0.5)]["method"] == "magnitude-l2"
    assert (
        res["per_layer_variance"] and "<classifier input>" in res["per_layer_variance"][0]["layers"]
    )
    for key in ("command", "git", "machine", "seed", "protocol"):
        assert key in res
    saved = json.loads(out.read_text())
    assert saved["rows"] == res["rows"]
    # rerun: nothing left to do, nothing added
    again = run_sweep(_config(), out, progress=False)
    assert len(again["rows"]) == n_expected
    # a different config must not be mixed into the same file
    other = _config() | {"ratios": [0.25]}
    with pytest.raises(ValueError, match="different config"):
        run_sweep(other, out, progress=False)
    paths = plot_results(res, tmp_path / "plots")
    names = {p.name for p in paths}
    assert {
        "tiny_accuracy.png",
        "tiny_variance.png",
        "tiny_layers.png",
        "tiny_clusterers.png",
    } <= names
    assert all(p.stat().st_size > 1000 for p in paths if p.suffix == ".png")
    assert "| Fold |" in (tmp_path / "plots" / "tiny.md").read_text()


@pytest.mark.parametrize(
    "patch, words",
    [
        ({"models": ["nope"]}, "unknown model"),
        ({"runs": [{"label": "x", "method": "nope", "repairs": ["none"]}]}, "unknown method"),
        ({"ratios": [1.5]}, "ratio"),
        ({"per_layer_variance": {"ratio": 0.5, "runs": ["missing"]}}, "unknown runs"),
    ],
)
def test_bad_config_rejected_before_running(patch, words, tmp_path):
    cfg = _config() | patch
    with pytest.raises(ValueError, match=words):
        validate(cfg)
    with pytest.raises(ValueError):
        run_sweep(cfg, tmp_path / "r.json", progress=False)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.skipif(not tp_available(), reason="torch-pruning not installed")
def test_torch_pruning_baseline_prunes_and_keeps_outputs():
    torch.manual_seed(0)
    model = build_model("resnet18_cifar", in_channels=1, num_classes=10, width=0.25).eval()
    x = torch.randn(2, 1, 28, 28)
    n0 = sum(p.numel() for p in model.parameters())
    tp_magnitude_prune(model, x, 0.5, 2)
    n1 = sum(p.numel() for p in model.parameters())
    assert 0.2 < n1 / n0 < 0.35  # ~75% removed at channel ratio 0.5
    assert model(x).shape == (2, 10)
    assert model.fc.out_features == 10


@pytest.mark.real
@needs_fmnist
def test_cli_bench_and_plot(random_small_cnn, tmp_path):
    cfg = _config() | {"runs": _config()["runs"][:1], "ratios": [0.5]}
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "r.json"
    assert (
        cli_main(["bench", str(cfg_path), "--out", str(out), "--plots", str(tmp_path / "p")]) == 0
    )
    assert len(json.loads(out.read_text())["rows"]) == 2
    assert (tmp_path / "p" / "tiny_accuracy.png").is_file()
    assert cli_main(["bench-plot", str(out), "--out-dir", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "tiny.md").is_file()


@pytest.mark.real
@needs_fmnist
def test_merge_results_of_per_model_runs(random_small_cnn, tmp_path):
    cfg = _config() | {"runs": _config()["runs"][:1], "ratios": [0.5]}
    a = run_sweep(cfg, tmp_path / "a.json", progress=False)
    b = run_sweep(cfg | {"models": ["vgg11_bn_cifar"]}, tmp_path / "b.json", progress=False)
    m = merge_results([a, b])
    assert m["config"]["models"] == ["small_cnn", "vgg11_bn_cifar"]
    assert len(m["rows"]) == len(a["rows"]) + len(b["rows"]) == 4
    with pytest.raises(ValueError, match="more than one"):
        merge_results([a, a])
    c = json.loads(json.dumps(b))
    c["config"]["ratios"] = [0.25]
    with pytest.raises(ValueError, match="different configs"):
        merge_results([a, c])
    assert (
        cli_main(
            [
                "bench-plot",
                str(tmp_path / "a.json"),
                str(tmp_path / "b.json"),
                "--out-dir",
                str(tmp_path / "p"),
                "--merge-into",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    assert len(json.loads((tmp_path / "m.json").read_text())["rows"]) == 4


def test_results_header_and_write(tmp_path, monkeypatch) -> None:
    """Every benchmark's results JSON carries the command, git revision and machine."""
    import subprocess

    from netfold.bench import meta

    monkeypatch.setattr("sys.argv", ["benchmarks/x.py", "--n", "3"])
    h = meta.header(rows=[1])
    assert h["command"] == "python benchmarks/x.py --n 3" and h["rows"] == [1]
    m = h["machine"]
    assert m["torch"] == torch.__version__ and m["torch_threads"] == torch.get_num_threads()
    assert {"cpu", "logical_cpus", "loadavg_start"} <= set(m)
    rev = meta.git_revision()
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    want = head.stdout.strip() or "unknown"
    assert rev.removesuffix("+dirty") == want
    path = meta.write_result(tmp_path / "r" / "x.json", meta.finish({"rows": [2]}))
    got = json.loads(path.read_text())
    assert got["rows"] == [2] and got["command"] == h["command"]
    assert got["git_revision"] == rev and len(got["machine"]["loadavg_end"]) == 3
    kept = meta.write_result(tmp_path / "y.json", {"command": "mine", "git_revision": "r"})
    assert json.loads(kept.read_text())["command"] == "mine"  # given entries are kept
