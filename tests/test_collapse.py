"""LayerCollapse: prepare, regulariser, distillation, fine-tuning, collapse, save/reload, CLI.

Run: .venv/bin/pytest -q tests/test_collapse.py
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import netfold
from netfold.collapse import (
    CollapseConfig,
    collapse_layers,
    collapse_regularizer,
    distillation_loss,
    find_pairs,
    finetune,
    prepare,
    prepared_activations,
)
from netfold.eval.cost import count_params


def _mlp(bn: bool, *, hidden: int = 64, seed: int = 0) -> nn.Sequential:
    """A VGG-classifier-like MLP: Linear-[BN]-ReLU-Dropout-Linear-ReLU-Linear (float64)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(16, hidden)]
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(), nn.Dropout(0.5), nn.Linear(hidden, 48), nn.ReLU(), nn.Linear(48, 5)]
    m = nn.Sequential(*layers).double()
    if bn:
        b = m[1]
        b.running_mean.uniform_(-1, 1)
        b.running_var.uniform_(0.5, 2.0)
        with torch.no_grad():
            b.weight.uniform_(0.5, 2.0)
            b.bias.uniform_(-1, 1)
    return m.eval()


def _set_alphas(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for a in prepared_activations(model).values():
            a.weight.fill_(value)


@pytest.mark.parametrize("bn", [False, True])
def test_alpha_one_collapse_is_exact(bn: bool) -> None:
    m = _mlp(bn)
    x = torch.randn(32, 16, dtype=torch.float64)
    prepare(m)
    _set_alphas(m, 1.0)
    ref = m(x)
    before = count_params(m)
    rep = collapse_layers(m, CollapseConfig(), example_inputs=x)
    assert rep.extra["collapsed"] == 2 and rep.extra["refused"] == 0
    assert [e["status"] for e in rep.log] == ["collapsed", "collapsed"]
    assert rep.log[0]["pair"].endswith("->" + ("6" if bn else "5"))  # last pair first
    assert rep.params_before == before and rep.params_after == 16 * 5 + 5
    assert sum(isinstance(c, nn.Linear) for c in m) == 1
    torch.testing.assert_close(m(x), ref, atol=1e-10, rtol=0)  # float64: ~4e-16


@pytest.mark.parametrize("bn", [False, True])
def test_alpha_one_collapse_is_exact_float32(bn: bool) -> None:
    m = _mlp(bn).float()
    x = torch.randn(32, 16)
    prepare(m)
    _set_alphas(m, 1.0)
    ref = m(x)
    collapse_layers(m)
    assert (m(x) - ref).abs().max() < 1e-5  # measured ~5e-7


def test_negative_control_alpha_below_one_is_not_exact() -> None:
    # The same check must fail for a model whose activation is not the identity.
    m = _mlp(False)
    x = torch.randn(32, 16, dtype=torch.float64)
    prepare(m)
    _set_alphas(m, 0.97)  # inside tol 0.05: collapses, approximately
    ref = m(x)
    rep = collapse_layers(m, CollapseConfig(tol=0.05))
    assert rep.extra["collapsed"] == 2
    assert (m(x) - ref).abs().max() > 1e-5


def test_refuses_alpha_outside_tol_and_logs_it() -> None:
    m = _mlp(False)
    prepare(m)
    _set_alphas(m, 0.5)
    snapshot = copy.deepcopy(m.state_dict())
    rep = collapse_layers(m, CollapseConfig(tol=0.05))
    assert rep.extra["collapsed"] == 0 and rep.extra["refused"] == 2
    assert all(e["status"] == "refused" and "tol" in e["reason"] for e in rep.log)
    assert {n for n, _ in rep.skipped} == {e["pair"] for e in rep.log}
    assert rep.params_after == rep.params_before
    for k, v in m.state_dict().items():
        assert torch.equal(v, snapshot[k])


def test_refuses_bottleneck_that_adds_parameters() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 512))
    prepare(m)
    _set_alphas(m, 1.0)
    x = torch.randn(4, 64)
    ref = m(x)
    rep = collapse_layers(m)
    by_pair = {e["pair"]: e for e in rep.log}
    # 2->4: 64*512 + 512 > 8*64 + 64 + 64*512 + 512: widening, collapses; 0->2 then reads a
    # Linear(8, 512): 64*8 + 8 + 8*512 + 512 < 64*512 + 512, so it is refused.
    assert by_pair["2->4"]["status"] == "collapsed" and by_pair["0->2"]["status"] == "refused"
    refused = [e for e in rep.log if e["status"] == "refused"]
    assert refused and all("adds parameters" in e["reason"] for e in refused)
    assert (m(x) - ref).abs().max() < 1e-4


def test_bottleneck_alone_is_refused() -> None:
    m = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 64))
    prepare(m)
    _set_alphas(m, 1.0)
    rep = collapse_layers(m)
    assert rep.extra["collapsed"] == 0
    assert "collapsing adds parameters (1,097 -> 4,160)" in rep.log[0]["reason"]
    assert isinstance(m[0], nn.Linear) and m[0].out_features == 8


def test_regularizer_gradient_pushes_alpha_toward_one() -> None:
    for start in (0.0, 0.4, 1.6):
        m = _mlp(False).float()
        prepare(m, CollapseConfig(init_slope=start))
        acts = prepared_activations(m)
        reg = collapse_regularizer(acts, lc=2.0)
        assert float(reg.detach()) == pytest.approx(2.0 * 2 * (1 - start) ** 2, rel=1e-6)
        reg.backward()
        for a in acts.values():
            # d/da lc (1 - a)^2 = -2 lc (1 - a): a gradient step moves a toward 1
            assert float(a.weight.grad) == pytest.approx(-4.0 * (1 - start), rel=1e-6)
            stepped = a.weight.detach() - 0.1 * a.weight.grad
            assert abs(1 - float(stepped)) < abs(1 - start) or start == 1.0


def test_prepare_records_changes_and_keeps_relu_function() -> None:
    m = _mlp(True).float()
    x = torch.randn(8, 16)
    ref = m(x)
    rep = prepare(m)
    assert [e["activation"] for e in rep.log] == ["2", "5"]
    assert all(e["was"] == "ReLU" and e["now"] == "PReLU(1)" for e in rep.log)
    assert not rep.warnings and rep.params_after == rep.params_before + 2
    assert isinstance(m[2], nn.PReLU)
    torch.testing.assert_close(m(x), ref)  # init slope 0 == ReLU
    # per-channel slopes; a GELU replaced is warned about
    g = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 4))
    rep = prepare(g, CollapseConfig(per_channel=True))
    assert g[1].num_parameters == 16 and rep.warnings and "GELU" in rep.warnings[0]


def test_prepare_rejects_model_without_pairs_unchanged() -> None:
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no collapsible"):
        prepare(m)
    with pytest.raises(ValueError, match="no collapsible"):
        netfold.collapse(m)
    bad = _mlp(False)
    with torch.no_grad():
        bad[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prepare(bad)
    assert isinstance(bad[1], nn.ReLU)


def test_distillation_loss() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    assert float(distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    kl = distillation_loss(s, t)
    ce = distillation_loss(s, labels=y)
    both = distillation_loss(s, t, y, ce_weight=0.5, kd_weight=0.5)
    assert float(both) == pytest.approx(0.5 * float(kl) + 0.5 * float(ce), rel=1e-6)
    assert float(distillation_loss(s, s.clone(), kind="cosine")) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError):
        distillation_loss(s)
    with pytest.raises(ValueError, match="teacher output"):
        distillation_loss(s, t[:, :3])


def test_finetune_moves_alphas_and_one_call_collapses() -> None:
    torch.manual_seed(0)
    m = _mlp(False, hidden=32).float()
    teacher = copy.deepcopy(m)
    x = torch.randn(256, 16)
    data = [(x[i : i + 32], teacher(x[i : i + 32]).argmax(1)) for i in range(0, 256, 32)]
    cfg = CollapseConfig(lc=4.0, epochs=6, lr=1e-3, alpha_lr=0.05, tol=0.05)
    rep = netfold.collapse(m, cfg, data=data, example_inputs=x[:2])
    hist = rep.extra["finetune"]
    assert hist["steps"] == 48 and len(hist["epochs"]) == 6
    assert hist["epochs"][-1]["alpha_min"] > 0.95
    assert [e["status"] for e in rep.log].count("prepared") == 2
    assert rep.extra["collapsed"] == 2 and rep.params_after == 16 * 5 + 5
    agree = float((m(x).argmax(1) == teacher(x).argmax(1)).float().mean())
    # control: set the slopes to 1 without fine-tuning and collapse
    naive = copy.deepcopy(teacher)
    prepare(naive)
    _set_alphas(naive, 1.0)
    collapse_layers(naive)
    naive_agree = float((naive(x).argmax(1) == teacher(x).argmax(1)).float().mean())
    assert agree > naive_agree + 0.1, (agree, naive_agree)  # measured 0.70 vs 0.48


def test_finetune_step_api_in_own_loop() -> None:
    m = _mlp(False).float()
    prepare(m)
    with pytest.raises(ValueError, match="no labels"):
        finetune(m, [torch.randn(4, 16)], CollapseConfig(epochs=1))
    h = finetune(m, [torch.randn(4, 16)], CollapseConfig(epochs=2), teacher=copy.deepcopy(m))
    assert h["steps"] == 2


def test_max_pairs_and_targets() -> None:
    m = _mlp(False)
    prepare(m)
    _set_alphas(m, 1.0)
    rep = collapse_layers(m, CollapseConfig(max_pairs=1))
    assert rep.extra["collapsed"] == 1
    assert [e["status"] for e in rep.log] == ["collapsed", "refused"]
    assert "max_pairs" in rep.log[1]["reason"]
    m = _mlp(False)
    prep = prepare(m, CollapseConfig(targets=("0",)))
    assert [e["activation"] for e in prep.log] == ["1"] and isinstance(m[4], nn.ReLU)


def test_config_json_roundtrip_and_validation() -> None:
    c = CollapseConfig(lc=0.5, targets=("classifier.*",), max_pairs=2, distill="cosine")
    assert CollapseConfig.from_json(c.to_json()) == c
    assert json.loads(c.to_json())["targets"] == ["classifier.*"]
    for bad in (
        {"lc": -1},
        {"tol": float("nan")},
        {"optimizer": "lbfgs"},
        {"distill": "l1"},
        {"epochs": -1},
        {"lr": 0},
        {"max_pairs": -1},
    ):
        with pytest.raises(ValueError):
            CollapseConfig(**bad)
    with pytest.raises(ValueError, match="unknown field"):
        CollapseConfig.from_dict({"lcc": 1})


def test_find_pairs_skips_layernorm_between() -> None:
    from netfold.models.classifiers import Mlp

    mlp = Mlp(8, 32)
    assert [p.name for p in find_pairs(mlp)] == ["fc1->fc2"]
    mlp.norm = nn.LayerNorm(32)  # timm Mlp with norm_layer: not linear
    assert find_pairs(mlp) == []


def test_save_reload_prepared_and_collapsed(tmp_path) -> None:
    from netfold.io import build

    m = build("netfold:vgg11_bn_tv", {"in_channels": 1, "width": 0.125, "pool": 1, "hidden": 64})
    m.eval()
    x = torch.randn(2, 1, 32, 32)
    prepare(m)
    with torch.no_grad():
        m.classifier[1].weight.fill_(1.0)
        m.classifier[4].weight.fill_(0.3)
    netfold.save(m, tmp_path / "prepared")
    r = netfold.load(tmp_path / "prepared")
    assert isinstance(r.classifier[4], nn.PReLU)
    torch.testing.assert_close(r(x), m(x))
    rep = collapse_layers(m)
    assert rep.extra["collapsed"] == 1  # classifier.3->6 refused (alpha 0.3), 0->3 collapsed
    netfold.save(m, tmp_path / "collapsed", metadata={"report": rep.to_dict()})
    r = netfold.load(tmp_path / "collapsed")
    assert r.classifier[0].out_features == 64 and isinstance(r.classifier[3], nn.Identity)
    torch.testing.assert_close(r(x), m(x))
    assert count_params(r) == count_params(m)


def test_mixer_prepare_and_collapse_keeps_shapes() -> None:
    from netfold.models import build_model

    m = build_model("mlp_mixer", in_channels=1, dim=16, depth=2, token_hidden=16, channel_hidden=64)
    m.eval()
    pairs = find_pairs(m)
    assert len(pairs) == 4  # token and channel MLP of each block
    prepare(m, CollapseConfig(init_slope=1.0))
    x = torch.randn(3, 1, 32, 32)
    ref = m(x)
    rep = collapse_layers(m)
    # token MLP 64 -> 16 -> 64 tokens is a bottleneck; channel MLPs 16 -> 64 -> 16 widen
    assert rep.extra["collapsed"] == 2 and rep.extra["refused"] == 2
    assert m(x).shape == (3, 10)
    assert (m(x) - ref).abs().max() < 1e-5


def test_cli_collapse_without_data(tmp_path, capsys) -> None:
    from netfold.cli import main
    from netfold.io import build

    m = build("netfold:mlp", {"hidden": [64, 32], "image_size": 8})
    netfold.save(m, tmp_path / "in")
    x = torch.randn(4, 1, 8, 8)
    ref = m(x)
    rc = main(
        [
            "collapse",
            str(tmp_path / "in"),
            "--epochs",
            "0",
            "--init-slope",
            "1",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "collapsed" in out and "sparsity" in out
    r = netfold.load(tmp_path / "out")
    assert count_params(r) == 64 * 10 + 10
    # slopes set to 1 make the MLP linear: the collapsed model is the prepared one, not `m`
    assert (r(x) - ref).abs().max() > 1e-4
    meta = json.loads((tmp_path / "out" / "netfold.json").read_text())
    assert meta["metadata"]["report"]["extra"]["collapsed"] == 2


@pytest.mark.real
def test_cli_collapse_fashion_mnist(tmp_path, capsys) -> None:
    from netfold.cli import main
    from netfold.io import build

    pytest.importorskip("netfold.data.fashion_mnist")
    from netfold.data.fashion_mnist import find_fashion_mnist

    if find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST not installed (make data)")
    netfold.save(build("netfold:mlp", {"hidden": [32], "in_channels": 1}), tmp_path / "in")
    args = ["collapse", str(tmp_path / "in"), "--data", "fashion-mnist", "--subset", "512"]
    rc = main(args + ["--epochs", "1", "--batch-size", "64", "--lc", "4", "--alpha-lr", "0.2"])
    assert rc == 0
    out = capsys.readouterr().out
    # Measured (seed 0 from conftest, untrained 784-32-10 MLP, 512 images, one epoch): alpha
    # climbs 0.2 -> 0.895, short of the 0.95 tolerance, so the pair is refused and the model
    # keeps its 33,130 (+1 alpha) parameters; accuracy 6.09% -> 11.10%.
    import re

    assert "collapsed: 0" in out and "refused: 1" in out
    alpha = float(re.search(r"refused\s+1->3\s+alpha ([0-9.]+)", out).group(1))
    assert 0.85 < alpha < 0.95
    assert re.search(r"params\s+33,130 ->\s+33,131", out)
    before, after = (
        float(v) for v in re.search(r"accuracy ([0-9.]+)% -> ([0-9.]+)%", out).groups()
    )
    assert 3.0 < before < 15.0 and 5.0 < after < 25.0  # ~10% is chance on 10 classes


def test_refit_matches_product_when_linear_and_beats_it_otherwise() -> None:
    x = torch.randn(512, 16, dtype=torch.float64)
    data = [x[i : i + 128] for i in range(0, 512, 128)]
    m = _mlp(True)
    prepare(m)
    _set_alphas(m, 1.0)
    ref = m(x)
    rep = collapse_layers(m, CollapseConfig(refit=True, refit_ridge=0.0), data=data)
    assert rep.extra["collapsed"] == 2
    assert all(e["fit_rel_error"] < 1e-6 for e in rep.log)
    torch.testing.assert_close(m(x), ref, atol=1e-8, rtol=0)
    # a real ReLU (no prepare): the least-squares fit is closer than the weight product
    errs = {}
    for refit in (False, True):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)).double()
        with torch.no_grad():
            orig = m(x)
        prepare(m)
        if not refit:
            _set_alphas(m, 1.0)
        collapse_layers(m, CollapseConfig(refit=refit), data=data)
        with torch.no_grad():
            errs[refit] = float((m(x) - orig).pow(2).mean())
    assert errs[True] < 0.5 * errs[False], errs
    with pytest.raises(ValueError, match="pass data"):
        collapse_layers(_mlp(False), CollapseConfig(refit=True))
