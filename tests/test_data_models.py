"""Fashion-MNIST loader, model zoo, accuracy helper and checkpoint cache.

Run:
    .venv/bin/python -m pytest tests/test_data_models.py -q
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

from netfold.data import fashion_mnist as fm
from netfold.eval.accuracy import evaluate_accuracy
from netfold.models import MODELS, build_model, resnet18_cifar, vgg11_bn_cifar
from netfold.models import train as zoo

HAVE_FMNIST = fm.find_fashion_mnist() is not None
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST, reason="Fashion-MNIST absent: apt-get install -y dataset-fashion-mnist"
)


# --------------------------------------------------------------------------- data


def _write_idx(path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_roundtrip_and_bad_magic(tmp_path):
    imgs = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
    p = tmp_path / "x-images-idx3-ubyte.gz"
    _write_idx(p, 2051, imgs)
    np.testing.assert_array_equal(fm._read_idx(p, 2051), imgs)
    with pytest.raises(ValueError, match="magic"):
        fm._read_idx(p, 2049)  # an image file is not a label file
    bad = tmp_path / "y-labels-idx1-ubyte.gz"
    _write_idx(bad, 2049, np.arange(5))
    with gzip.open(bad, "rb") as f:
        truncated = f.read()[:-1]
    with gzip.open(bad, "wb") as f:
        f.write(truncated)
    with pytest.raises(ValueError, match="bytes"):
        fm._read_idx(bad, 2049)


def test_normalization_constants_match_padding():
    mean28, std28 = fm.normalization(28)
    assert mean28 == pytest.approx(fm.MEAN_28) and std28 == pytest.approx(fm.STD_28)
    mean32, std32 = fm.normalization(32)
    assert mean32 == pytest.approx(fm.MEAN_28 * 784 / 1024)
    assert fm.background_value(32) == pytest.approx(-mean32 / std32)
    with pytest.raises(ValueError):
        fm.normalization(27)


@needs_fmnist
def test_load_fashion_mnist_train_and_test():
    x, y = fm.load_fashion_mnist("train")
    assert x.shape == (60000, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert torch.bincount(y).tolist() == [6000] * 10
    # Normalised with the train statistics of the padded image: mean 0, std 1.
    assert abs(float(x.mean())) < 1e-4  # measured -2.5e-08
    assert abs(float(x.std()) - 1.0) < 1e-4  # measured 1.0000
    # Padding is the black background: the 2-pixel border is one constant value.
    assert torch.allclose(x[:, :, :2, :], torch.tensor(fm.background_value(32)))
    xt, yt = fm.load_fashion_mnist("test")
    assert xt.shape == (10000, 1, 32, 32) and torch.bincount(yt).tolist() == [1000] * 10
    assert abs(float(xt.mean())) < 0.02 and abs(float(xt.std()) - 1.0) < 0.02  # 0.0019, 0.999
    x28, _ = fm.load_fashion_mnist("train", pad_to=28)
    assert x28.shape == (60000, 1, 28, 28) and abs(float(x28.std()) - 1.0) < 1e-4
    torch.testing.assert_close(
        x28[:5, :, :, :] * fm.STD_28 + fm.MEAN_28,
        x[:5, :, 2:30, 2:30] * fm.normalization(32)[1] + fm.normalization(32)[0],
    )
    with pytest.raises(ValueError, match="split"):
        fm.load_fashion_mnist("validation")


@needs_fmnist
def test_root_is_searched_first(tmp_path, monkeypatch):
    monkeypatch.delenv("NETFOLD_DATA", raising=False)
    assert fm.find_fashion_mnist(tmp_path) == fm.find_fashion_mnist()  # empty root: falls through
    for f in fm.find_fashion_mnist().iterdir():
        (tmp_path / f.name).symlink_to(f)
    assert fm.find_fashion_mnist(tmp_path) == tmp_path
    monkeypatch.setenv("NETFOLD_DATA", str(tmp_path))
    assert fm.find_fashion_mnist() == tmp_path


def test_missing_data_raises_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.delenv("NETFOLD_DATA", raising=False)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(fm, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    assert fm.find_fashion_mnist(tmp_path / "nowhere") is None
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fm.load_fashion_mnist("test", root=tmp_path / "nowhere")


@needs_fmnist
def test_calibration_batches_fixed_subset_of_train():
    a = fm.calibration_batches(3, 16, seed=0)
    b = fm.calibration_batches(3, 16, seed=0)
    c = fm.calibration_batches(3, 16, seed=1)
    assert len(a) == 3 and all(t.shape == (16, 1, 32, 32) for t in a)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert not torch.equal(a[0], c[0])
    x, _ = fm.load_fashion_mnist("train")
    idx = torch.randperm(60000, generator=torch.Generator().manual_seed(0))[:48]
    torch.testing.assert_close(torch.cat(a), x[idx], rtol=0, atol=0)
    pairs = fm.calibration_batches(1, 8, with_labels=True)
    assert pairs[0][0].shape == (8, 1, 32, 32) and pairs[0][1].dtype == torch.int64


@needs_fmnist
def test_loaders_are_deterministic():
    tr1, te = fm.fashion_mnist_loaders(64, seed=3, train_subset=640)
    tr2, _ = fm.fashion_mnist_loaders(64, seed=3, train_subset=640)
    assert len(tr1) == 10 and len(te.dataset) == 10000
    (x1, y1), (x2, y2) = next(iter(tr1)), next(iter(tr2))
    assert x1.shape == (64, 1, 32, 32) and torch.equal(y1, y2) and torch.equal(x1, x2)


def test_augment_batch():
    x = torch.randn(8, 1, 32, 32)
    out1 = fm.augment_batch(x, torch.Generator().manual_seed(0))
    out2 = fm.augment_batch(x, torch.Generator().manual_seed(0))
    assert out1.shape == x.shape and torch.equal(out1, out2) and not torch.equal(out1, x)
    assert torch.equal(fm.augment_batch(x, padding=0, flip=False), x)
    # A crop with padding is a shift: every output row/col comes from x or from the fill.
    y = fm.augment_batch(x, torch.Generator().manual_seed(1), padding=3, flip=False, fill=0.0)
    assert all(
        torch.isin(y[i], torch.cat([x[i].flatten(), torch.zeros(1)])).all() for i in range(8)
    )


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_models_forward_and_fx_trace(name, in_channels):
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, num_classes=7, width=0.25).eval()
    x = torch.randn(3, in_channels, 32, 32)
    out = model(x)
    assert out.shape == (3, 7)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), out)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_full_width_forward(name):
    model = build_model(name, in_channels=1, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_resnet18_parameter_count_and_widths():
    m = resnet18_cifar(width=1, in_channels=3, num_classes=10)
    assert sum(p.numel() for p in m.parameters()) == 11_173_962
    half = resnet18_cifar(width=0.5, in_channels=1)
    assert half.conv1.out_channels == 32 and half.fc.in_features == 256
    assert half.layer2[0].shortcut is not None and half.layer1[0].shortcut is None
    v = vgg11_bn_cifar(width=0.5, classifier_width=64)
    convs = [c.out_channels for c in v.features if isinstance(c, nn.Conv2d)]
    assert convs == [32, 64, 128, 128, 256, 256, 256, 256]
    assert [lin.out_features for lin in v.classifier if isinstance(lin, nn.Linear)] == [64, 64, 10]
    with pytest.raises(KeyError, match="unknown model"):
        build_model("resnet50")


# --------------------------------------------------------------------------- accuracy


def test_evaluate_accuracy_known_case():
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Dropout(0.9))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
    images = torch.eye(3).repeat(4, 1)  # 12 one-hot rows: predicted class = hot index
    labels = torch.tensor([0, 1, 2] * 4)
    labels[[1, 5, 10]] = 0  # 3 of 12 wrong
    model.train()
    acc = evaluate_accuracy(model, images, labels, batch_size=5)  # dropout would break it
    assert acc == 9 / 12
    assert model.training  # flag restored
    model.eval()
    assert evaluate_accuracy(model, images, labels) == 9 / 12 and not model.training
    assert evaluate_accuracy(model, images[:0], labels[:0]) == 0.0
    with pytest.raises(ValueError):
        evaluate_accuracy(model, images, labels[:5])


# --------------------------------------------------------------------------- checkpoints


@needs_fmnist
def test_get_trained_saves_and_reuses(tmp_path, monkeypatch):
    kw = dict(
        width=0.25, max_steps=1, batch_size=32, train_subset=64, cache_dir=tmp_path, progress=False
    )
    model, info = zoo.get_trained("small_cnn", **kw)
    weights = tmp_path / (info["path"].rsplit("/", 1)[1])
    assert weights.is_file() and weights.with_suffix(".json").is_file()
    assert weights.name.startswith("small_cnn_fmnist_seed0_")  # non-preset settings get a hash
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert meta["arch"] == "small_cnn" and meta["model_kwargs"]["width"] == 0.25
    assert meta["steps"] == 1 and 0.0 <= meta["test_accuracy"] <= 1.0
    for key in ("epochs", "train_time_s", "torch_version", "machine", "sha256", "settings"):
        assert key in meta
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries

    def boom(*a, **k):
        raise AssertionError("should have reused the checkpoint")

    monkeypatch.setattr(zoo, "train_model", boom)
    model2, info2 = zoo.get_trained("small_cnn", **kw)
    assert info2["sha256"] == info["sha256"] and info2["reused"] and not info["reused"]
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(model(x), model2(x))
    with pytest.raises(AssertionError, match="reused"):
        zoo.get_trained("small_cnn", force=True, **kw)
    # A tampered JSON hash is detected by load_checkpoint.
    meta["sha256"] = "0" * 64
    weights.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="SHA-256"):
        zoo.load_checkpoint(weights)


def test_checkpoint_stem_and_cache_dir(tmp_path, monkeypatch):
    preset = zoo._settings("resnet18_cifar", 0)
    assert zoo.checkpoint_stem(preset) == "resnet18_cifar_fmnist_seed0"
    assert (
        zoo.checkpoint_stem(zoo._settings("resnet18_cifar", 0, width=0.5))
        == "resnet18_cifar_fmnist_seed0"
    )
    other = zoo.checkpoint_stem(zoo._settings("resnet18_cifar", 0, epochs=1))
    assert (
        other.startswith("resnet18_cifar_fmnist_seed0_")
        and len(other) == len("resnet18_cifar_fmnist_seed0_") + 8
    )
    monkeypatch.setenv("NETFOLD_CACHE", str(tmp_path))
    assert zoo.default_cache_dir() == tmp_path
    assert zoo.default_cache_dir(tmp_path / "x") == tmp_path / "x"
