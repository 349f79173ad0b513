"""Save -> load round trips of folded models (safetensors + JSON, no pickle).

Run: python -m pytest tests/test_io.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

import netfold
from netfold import io


@pytest.mark.parametrize(
    "arch, kwargs, shape",
    [
        ("torchvision:mobilenet_v2", {"num_classes": 10}, (2, 3, 32, 32)),
        ("torchvision:resnet18", {"num_classes": 10}, (2, 3, 32, 32)),
        ("netfold:vgg11_bn_cifar", {"in_channels": 1, "width": 0.25}, (2, 1, 32, 32)),
        ("netfold:mlp", {"hidden": (64, 32), "batch_norm": True}, (4, 1, 32, 32)),
    ],
)
def test_fold_save_load_identical(tmp_path, arch, kwargs, shape):
    torch.manual_seed(0)
    model = io.build(arch, kwargs).eval()
    x = torch.randn(*shape)
    netfold.fold(model, netfold.FoldConfig(ratio=0.5, n_init=1, max_iter=3), example_inputs=x)
    io.save(model, tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["model.safetensors", "netfold.json"]
    again = io.load(tmp_path / "m")
    assert torch.equal(again(x), model(x))
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())
    # negative control: the unfolded architecture cannot take these weights
    with pytest.raises(RuntimeError):
        io.build(arch, kwargs).load_state_dict(model.state_dict())


def test_save_needs_architecture(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match="arch"):
        io.save(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_save_with_explicit_arch_and_metadata(tmp_path):
    model = io.build("torchvision:resnet18", {"num_classes": 3})
    io.save(
        model,
        tmp_path / "r",
        arch="torchvision:resnet18",
        kwargs={"num_classes": 3},
        metadata={"note": "dense"},
    )
    info = json.loads((tmp_path / "r" / "netfold.json").read_text())
    assert info["metadata"] == {"note": "dense"} and info["arch"] == "torchvision:resnet18"


def test_unserialisable_metadata_writes_nothing(tmp_path):
    model = io.build("netfold:mlp", {})
    with pytest.raises(TypeError):
        io.save(model, tmp_path / "bad", metadata={"x": object()})
    assert not (tmp_path / "bad").exists()


def test_load_rejects_non_netfold_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="netfold.json"):
        io.load(tmp_path)
