"""The "auto" defaults (repair / allocation resolved per model) and the decoder self-check.

Run: python -m pytest tests/test_auto.py -q            (real-model tests: -m real)
"""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
import torch.nn as nn

import netfold
from netfold import FoldConfig
from netfold.config import LLMConfig
from netfold.eval.self_check import SelfCheck
from netfold.fold import auto
from netfold.fold.decoder import self_generated_ids

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

X_IMG = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    with torch.no_grad():  # non-trivial stored statistics
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    ).eval()


def _tiny_llama(layers: int = 2, sharp: float = 1.0, mlp_gain: float = 1.0) -> nn.Module:
    """A random Llama; ``sharp`` scales the LM head (peaked predictions), ``mlp_gain`` the
    MLPs (gate and up by sqrt(gain), down by gain: MLPs then dominate the residual stream)."""
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharp)
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight.mul_(math.sqrt(mlp_gain))
            layer.mlp.up_proj.weight.mul_(math.sqrt(mlp_gain))
            layer.mlp.down_proj.weight.mul_(mlp_gain)
    return model


TINY_LLM = LLMConfig(synth_sequences=2, synth_length=16, self_check_sequences=2)


# --------------------------------------------------------------------------- resolution
def test_defaults_are_auto_and_round_trip():
    cfg = FoldConfig()
    assert cfg.repair == "auto" and cfg.allocation == "auto"
    assert FoldConfig.from_json(cfg.to_json()) == cfg
    assert cfg.llm.self_check and cfg.llm.self_check_threshold == 3.0


@pytest.mark.parametrize(
    "kind, model, kw, repair, allocation",
    [
        ("traced", _bn_cnn(), {}, "stats", "uniform"),
        ("traced", _mlp(), {}, auto.BN_FREE_REPAIR, "uniform"),
        ("traced", _mlp(), {"has_data": True}, "data", "uniform"),
        ("encoder", _mlp(), {}, auto.BN_FREE_REPAIR, "uniform"),
        ("decoder", _mlp(), {}, auto.DECODER_REPAIR, "uniform"),  # a ratio keeps its meaning
    ],
)
def test_resolve_per_model_kind(kind, model, kw, repair, allocation):
    cfg, why = auto.resolve(model, FoldConfig(ratio=0.3), kind, **kw)
    assert (cfg.repair, cfg.allocation, cfg.ratio) == (repair, allocation, 0.3)
    assert why and repr(repair) in why


def test_resolve_decoder_target_uses_cost_allocation_and_keeps_explicit_choices():
    m = _mlp()
    cfg, _ = auto.resolve(m, FoldConfig(target_sparsity=0.1), "decoder")
    assert (cfg.repair, cfg.allocation, cfg.target_sparsity) == (
        auto.DECODER_REPAIR,
        "cost",
        0.1,
    )
    cfg, why = auto.resolve(m, FoldConfig(target_sparsity=0.1, allocation="uniform"), "decoder")
    assert (cfg.repair, cfg.allocation) == (auto.DECODER_REPAIR, "uniform")
    assert "allocation" not in why  # only what was "auto" is named
    explicit = FoldConfig(repair="ar", allocation="uniform")
    assert auto.resolve(_bn_cnn(), explicit, "traced") == (explicit, None)
    cfg, _ = auto.resolve(_bn_cnn(), FoldConfig(method="magnitude-l2"), "traced")
    assert (cfg.repair, cfg.allocation) == ("ar", "uniform")  # baselines keep the old default
    with pytest.raises(ValueError, match="unknown model kind"):
        auto.resolve(m, FoldConfig(), "vision")


def test_default_fold_of_a_bn_cnn_is_the_stats_repair_and_says_so():
    a, b = _bn_cnn(), _bn_cnn()
    rep = netfold.fold(a, FoldConfig(ratio=0.5), example_inputs=X_IMG)
    ref = netfold.fold(b, FoldConfig(ratio=0.5, repair="stats"), example_inputs=X_IMG)
    assert rep.extra["repair"] == "stats" and "BatchNorm" in rep.extra["auto"]
    assert rep.config["repair"] == "stats"  # the Report's config reproduces the fold
    assert "repair: stats" in str(rep)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    assert ref.extra["repair"] == "stats" and "repair" not in ref.extra["auto"]  # explicit
    # negative control: Fold-AR gives other BatchNorm statistics
    c = _bn_cnn()
    netfold.fold(c, FoldConfig(ratio=0.5, repair="ar"), example_inputs=X_IMG)
    assert not torch.allclose(c[1].running_var, a[1].running_var)


def test_default_fold_of_a_bn_free_mlp_uses_the_measured_repair():
    a, b = _mlp(), _mlp()
    rep = netfold.fold(a, FoldConfig(ratio=0.5), example_inputs=torch.randn(2, 64))
    netfold.fold(
        b, FoldConfig(ratio=0.5, repair=auto.BN_FREE_REPAIR), example_inputs=torch.randn(2, 64)
    )
    assert rep.extra["repair"] == auto.BN_FREE_REPAIR
    x = torch.randn(5, 64)
    assert torch.equal(a(x), b(x))


def test_auto_falls_back_when_stats_cannot_propagate(monkeypatch):
    """A BatchNorm model whose operations the moment propagation refuses (simulated: the
    propagation raises as it does for an unsupported op): "auto" folds with the fallback."""
    from netfold.fold import stats_repair as stats_mod

    def refuse(*a, **k):
        raise ValueError("repair='stats' cannot propagate channel statistics through module X")

    monkeypatch.setattr(stats_mod, "stats_repair_state", refuse)
    m, ref = _bn_cnn(), _bn_cnn()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match="cannot propagate"):  # explicit "stats" refuses
        netfold.fold(m, FoldConfig(ratio=0.5, repair="stats"), example_inputs=X_IMG)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # untouched
    rep = netfold.fold(m, FoldConfig(ratio=0.5), example_inputs=X_IMG)
    assert rep.extra["repair"] == auto.STATS_FALLBACK and "fell back" in rep.extra["auto"]
    assert any("cannot propagate" in w for w in rep.warnings)
    netfold.fold(ref, FoldConfig(ratio=0.5, repair=auto.STATS_FALLBACK), example_inputs=X_IMG)
    assert torch.equal(m(X_IMG), ref(X_IMG))


# --------------------------------------------------------------------------- self-check
def test_self_check_identity_gives_ratio_one_and_a_broken_model_fails():
    model = _tiny_llama(sharp=20.0)
    ids = self_generated_ids(model, 3, 20, seed=5)  # the model's own text: it predicts it well
    check = SelfCheck.before(model, ids, skip=1)
    same = check.after(model)
    assert same["ratio"] == pytest.approx(1.0, abs=1e-6) and same["kl"] == pytest.approx(
        0, abs=1e-6
    )
    assert same["tokens"] == 3 * 18 and not same["failed"]
    with torch.no_grad():
        model.lm_head.weight.copy_(model.lm_head.weight[torch.randperm(64)])  # destroyed
    broken = check.after(model)
    assert broken["failed"] and broken["ratio"] > 3 and broken["kl"] > 0.5  # measured 37x
    with pytest.raises(ValueError, match="self-check ids"):
        SelfCheck.before(model, ids[:, :2], skip=1)


def test_decoder_fold_runs_the_self_check_ratio_zero_is_one():
    model = _tiny_llama()
    rep = netfold.fold(model, FoldConfig(ratio=0.0, llm=TINY_LLM))
    sc = rep.extra["self_check"]
    assert sc["ratio"] == pytest.approx(1.0, abs=1e-6)
    # random-start text: BOS and the random token are not scored
    assert sc["tokens"] == 2 * (64 - 1 - 2) and sc["seconds"] > 0 and not sc["failed"]
    assert not any("self-check" in w for w in rep.warnings)
    assert set(rep.extra["stage_seconds"]) >= {"self_check", "write"}
    off = netfold.fold(
        _tiny_llama(), FoldConfig(ratio=0.0, llm=LLMConfig(self_check=False, synth_sequences=2))
    )
    assert "self_check" not in off.extra


def test_destroyed_decoder_fold_warns():
    """A fold that breaks a model whose MLPs carry its predictions: every MLP to 1 channel and
    every KV group to one query head, no repair."""
    model = _tiny_llama(sharp=20.0, mlp_gain=10.0)
    cfg = FoldConfig(ratio=0.98, repair="none", llm=TINY_LLM)
    rep = netfold.fold(model, cfg)
    sc = rep.extra["self_check"]
    assert sc["failed"] and sc["ratio"] > 3, sc  # measured 58.7x
    assert any(w.startswith("self-check FAILED") for w in rep.warnings)
    assert "self-check FAILED" in str(rep)
    # negative control: the same fold judged with a threshold above its ratio passes
    llm = LLMConfig(**{**TINY_LLM.to_dict(), "self_check_threshold": sc["ratio"] * 2})
    model2 = _tiny_llama(sharp=20.0, mlp_gain=10.0)
    rep2 = netfold.fold(model2, FoldConfig(ratio=0.98, repair="none", llm=llm))
    assert not rep2.extra["self_check"]["failed"]
    assert rep2.extra["self_check"]["ratio"] == pytest.approx(sc["ratio"], rel=1e-5)


def test_default_decoder_fold_resolves_to_the_cost_recipe_and_times_its_stages():
    model = _tiny_llama(layers=3)
    rep = netfold.fold(model, FoldConfig(target_sparsity=0.25, llm=TINY_LLM))
    assert rep.extra["repair"] == auto.DECODER_REPAIR and rep.extra["allocation"] == "cost"
    assert rep.extra["features"] == "activations"
    assert rep.config["allocation"] == "cost" and rep.config["repair"] == auto.DECODER_REPAIR
    st = rep.extra["stage_seconds"]
    assert {"sampling", "allocation", "features", "clustering", "self_check"} <= set(st)
    assert all(v >= 0 for v in st.values()) and sum(st.values()) <= rep.seconds + 1e-6
    assert rep.extra["non_embedding_sparsity"] >= 0.25


def test_cli_prints_a_failed_self_check_as_a_banner(capsys):
    from netfold.cli.fold import print_self_check
    from netfold.report import Report

    model = _tiny_llama(sharp=20.0, mlp_gain=10.0)
    rep = netfold.fold(model, FoldConfig(ratio=0.98, repair="none", llm=TINY_LLM))
    print_self_check(rep)
    cap = capsys.readouterr()
    assert "self-check: perplexity on 122 tokens" in cap.out
    assert "WARNING: self-check FAILED" in cap.err and "!" * 78 in cap.err
    print_self_check(Report("fold", 1, 1))  # no check: prints nothing
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"self_check_threshold": 1.0}, "self_check_threshold"),
        ({"self_check_threshold": math.nan}, "self_check_threshold"),
        ({"self_check_sequences": 0}, "self_check_sequences"),
        ({"self_check_length": 3}, "self_check_length"),
    ],
)
def test_self_check_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        LLMConfig(**kw)
    with pytest.raises(TypeError, match="self_check"):
        LLMConfig(self_check=1)


def test_curves_on_the_shared_collection_equal_their_own_collection(monkeypatch):
    """The default decoder fold collects MLP inputs once (FEATURE_ROWS rows, with residuals)
    for the allocation's curves and the features: the curves read its first CURVE_ROWS rows,
    exactly the rows their own collection keeps."""
    from netfold.families import llama as fam
    from netfold.fold import decoder as D

    monkeypatch.setattr(D, "CURVE_ROWS", 24)
    monkeypatch.setattr(D, "FEATURE_ROWS", 48)
    model = _tiny_llama(layers=2)
    ids = self_generated_ids(model, 4, 32, seed=1)  # 128 token rows: both collections subsample
    groups = fam.find_llm_groups(model)
    cfg = FoldConfig(target_sparsity=0.2, n_init=1)
    own = fam.mlp_error_curves(model, groups, cfg, ids)
    io = fam.collect_mlp_inputs(model, ids, max_rows=48, seed=cfg.seed, residual=True)
    shared = D.mlp_error_curves(model, groups, cfg, ids, hooks=fam.HOOKS, io=io)
    assert shared == own and len(own) == 2
    # negative control: other rows give other curves
    io2 = fam.collect_mlp_inputs(model, ids, max_rows=48, seed=cfg.seed + 1, residual=True)
    assert D.mlp_error_curves(model, groups, cfg, ids, hooks=fam.HOOKS, io=io2) != own


def test_collection_reads_the_body_without_the_lm_head():
    from netfold.families import llama as fam

    model = _tiny_llama()
    ids = self_generated_ids(model, 2, 16, seed=1)
    calls = []
    h = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    io = fam.collect_mlp_inputs(model, ids, residual=True)
    h.remove()
    assert not calls and set(io) == {f"model.layers.{i}.mlp" for i in range(2)}
    x, r = io["model.layers.0.mlp"]
    assert x.shape == r.shape == (32, 32) and x.dtype == torch.float64


# --------------------------------------------------------------------------- real model
@pytest.mark.real
@pytest.mark.slow
def test_smollm2_self_check_identity_and_cost():
    """SmolLM2-135M: a ratio-0 fold's self-check is exactly 1 and costs seconds. Measured:
    self-perplexity 67.8 on 4 x 61 scored tokens (text sampled at temperature 1 after a random
    first token); the check took 8 s wall (2 threads, load ~6) and up to 58 CPU-s under a
    load of 15."""
    from netfold.hub import load_smollm2

    try:
        model, _tok = load_smollm2()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cpu0 = time.process_time()
    rep = netfold.fold(model, FoldConfig(ratio=0.0, repair="ar", allocation="uniform"))
    cpu = time.process_time() - cpu0
    sc = rep.extra["self_check"]
    assert sc["ratio"] == 1.0 and sc["kl"] == pytest.approx(0.0, abs=1e-6)
    assert sc["tokens"] == 4 * (64 - 1 - 2) and not rep.warnings
    assert sc["ppl_before"] == pytest.approx(67.8, rel=0.05), sc  # float32, CPU-dependent
    assert cpu < 90, cpu
