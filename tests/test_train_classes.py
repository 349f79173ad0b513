"""Label-subset training (``classes``) in netfold.models.train: settings, key, data selection.

Run:
    PYTHONPATH=$PWD/src OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_train_classes.py
"""

from __future__ import annotations

import json

import pytest
import torch

from netfold.data import fashion_mnist as fm
from netfold.eval.accuracy import evaluate_accuracy
from netfold.models import train as zoo

needs_fmnist = pytest.mark.skipif(
    fm.find_fashion_mnist() is None,
    reason="Fashion-MNIST absent: apt-get install -y dataset-fashion-mnist",
)


def test_classes_setting_is_part_of_the_key_and_sets_the_head():
    plain = zoo._settings("vgg11_bn_cifar", 0)
    assert "classes" not in plain  # all-class checkpoints keep their settings and names
    assert zoo.checkpoint_stem(plain) == "vgg11_bn_cifar_fmnist_seed0"
    low = zoo._settings("vgg11_bn_cifar", 0, classes=(4, 3, 2, 1, 0))
    high = zoo._settings("vgg11_bn_cifar", 0, classes=[5, 6, 7, 8, 9])
    assert low["classes"] == [0, 1, 2, 3, 4]  # sorted: logit i is label classes[i]
    assert low["model_kwargs"]["num_classes"] == 5 == high["model_kwargs"]["num_classes"]
    assert plain["model_kwargs"]["num_classes"] == 10
    stems = {zoo.checkpoint_stem(s) for s in (plain, low, high)}
    assert len(stems) == 3
    assert json.loads(json.dumps(low)) == low  # JSON-serialisable, as the cache compares it


@pytest.mark.parametrize("bad", [[1], [0, 0, 1], [0, 10], [-1, 2], "ab", 3])
def test_bad_classes_are_refused(bad):
    with pytest.raises(ValueError, match="classes must be"):
        zoo._settings("small_cnn", 0, classes=bad)


def test_select_classes_keeps_order_and_renumbers():
    x = torch.arange(8.0)[:, None]
    y = torch.tensor([9, 0, 5, 5, 3, 7, 0, 9])
    xs, ys = zoo.select_classes(x, y, [5, 7, 9])
    assert xs.flatten().tolist() == [0.0, 2.0, 3.0, 5.0, 7.0]
    assert ys.tolist() == [2, 0, 0, 1, 2]
    xs, ys = zoo.select_classes(x, y, [0, 3])
    assert xs.flatten().tolist() == [1.0, 4.0, 6.0] and ys.tolist() == [0, 1, 0]
    x2, y2 = zoo.select_classes(x, y, None)
    assert x2 is x and y2 is y
    # Labels above every present one are fine (no index error in the renumbering table).
    _, ys = zoo.select_classes(x[:2], torch.tensor([0, 1]), [1, 9])
    assert ys.tolist() == [0]


@needs_fmnist
def test_get_trained_on_a_label_subset(tmp_path, monkeypatch):
    kw = dict(
        width=0.25, max_steps=1, batch_size=16, train_subset=32, cache_dir=tmp_path, progress=False
    )
    model, info = zoo.get_trained("small_cnn", classes=[5, 6, 7, 8, 9], **kw)
    assert model.fc.out_features == 5 and info["classes"] == [5, 6, 7, 8, 9]
    assert info["settings"]["classes"] == [5, 6, 7, 8, 9] and not info["reused"]
    _, other = zoo.get_trained("small_cnn", classes=[0, 1, 2, 3, 4], **kw)
    assert other["path"] != info["path"]

    def boom(*a, **k):
        raise AssertionError("should have reused the checkpoint")

    monkeypatch.setattr(zoo, "train_model", boom)
    again, info2 = zoo.get_trained("small_cnn", classes=[9, 8, 7, 6, 5], **kw)
    assert info2["reused"] and info2["sha256"] == info["sha256"]
    assert again.fc.out_features == 5
    # The test accuracy was measured on the 5,000 test images of these classes only.
    x, y = fm.load_fashion_mnist("test")
    xs, ys = zoo.select_classes(x, y, info["classes"])
    assert len(ys) == 5000 and int(ys.max()) == 4
    assert abs(evaluate_accuracy(again, xs, ys) - info["test_accuracy"]) < 1e-4
