"""Tests of the data-free statistics repair (repair="stats", netfold.fold.stats_repair).

Run: python -m pytest tests/test_stats_repair.py -q
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn

import netfold
from netfold.fold import stats_repair as stats_mod
from netfold.fold.stats_repair import Moments, gaussian_moments, propagate, stats_repair_state

torch.set_num_threads(1)
F64 = torch.float64


def _set_bn_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Store the exact BatchNorm statistics of ``x`` (cumulative average, one pass)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def _gaussian_inputs(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n samples of N(mu, Sigma) in R^d with a correlated Sigma: (x (n, d), mu (d,), Sigma)."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(d, d, generator=g, dtype=F64) / d**0.5 + torch.eye(d, dtype=F64)
    mu = torch.randn(d, generator=g, dtype=F64) * 0.5
    x = torch.randn(n, d, generator=g, dtype=F64) @ L.t() + mu
    return x, mu, L @ L.t()


def _dup_mlp() -> tuple[nn.Module, torch.Tensor]:
    """Linear-BN-ReLU x2 + head; channels 4..7 of the first layer duplicate channels 0..3."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(6, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 5),
        nn.BatchNorm1d(5),
        nn.ReLU(),
        nn.Linear(5, 3),
    ).to(F64)
    with torch.no_grad():
        m[0].weight[4:] = m[0].weight[:4]
        m[0].bias[4:] = m[0].bias[:4]
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.5, 0.5)
        m[1].weight[4:] = m[1].weight[:4]
        m[1].bias[4:] = m[1].bias[:4]
    x = _gaussian_inputs(4096, 6, seed=1)[0]
    return _set_bn_stats(m, x), x


def _fold_first(model: nn.Module, x: torch.Tensor, **ablation) -> nn.Module:
    m = copy.deepcopy(model)
    cfg = netfold.FoldConfig(ratio=0.0, ratios={"0": 0.5}, repair="stats")
    if ablation:
        orig = stats_mod.stats_repair_state
        stats_mod.stats_repair_state = functools.partial(orig, **ablation)
        try:
            netfold.fold(m, cfg, example_inputs=x[:2])
        finally:
            stats_mod.stats_repair_state = orig
    else:
        netfold.fold(m, cfg, example_inputs=x[:2])
    return m


def test_exact_fold_stays_exact_and_uncorrelated_control_breaks_it() -> None:
    """(a) Duplicate channels: merged variance = member variance, the folded net = the original."""
    model, x = _dup_mlp()
    folded = _fold_first(model, x)
    assert folded[0].out_features == 4
    bn, bn0 = folded[1], model[1]
    # each merged channel is one duplicate pair (correlation 1): its statistics are the members'
    torch.testing.assert_close(
        bn.running_var.sort().values, bn0.running_var[:4].sort().values, rtol=1e-9, atol=0
    )
    torch.testing.assert_close(
        bn.running_mean.sort().values, bn0.running_mean[:4].sort().values, rtol=1e-9, atol=1e-12
    )
    # the layer reading the merged channels keeps its stored statistics
    torch.testing.assert_close(folded[4].running_var, model[4].running_var, rtol=1e-6, atol=0)
    with torch.no_grad():
        y0, y1 = model(x[:256]), folded(x[:256])
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-8)

    # Negative control: members taken as uncorrelated halve the merged variance.
    wrong = _fold_first(model, x, uncorrelated=True)
    torch.testing.assert_close(
        wrong[1].running_var.sort().values,
        0.5 * bn0.running_var[:4].sort().values,
        rtol=1e-9,
        atol=0,
    )
    with torch.no_grad():
        err = float((wrong(x[:256]) - y0).abs().max())
    assert err > 1e-2, err  # measured 1.36 (the exact fold: 7e-16)


def _chain() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(6, 10),
        nn.BatchNorm1d(10),
        nn.ReLU(),
        nn.Linear(10, 7),
        nn.BatchNorm1d(7),
        nn.ReLU(),
        nn.Linear(7, 3),
    ).to(F64)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_propagation_matches_monte_carlo_on_gaussian_inputs() -> None:
    """(b) Linear-BN-ReLU chain on Gaussian inputs: propagated = sampled moments."""
    x, mu, sigma = _gaussian_inputs(400_000, 6, seed=2)
    model = _set_bn_stats(_chain(), x[:200_000])
    x2 = x[200_000:]  # fresh samples for the Monte-Carlo reference
    feats: dict[str, torch.Tensor] = {}
    hooks = [
        model[i].register_forward_hook(lambda mod, inp, out, i=i: feats.__setitem__(str(i), out))
        for i in (2, 3)
    ]
    with torch.no_grad():
        model(x2)
    for h in hooks:
        h.remove()
    relu1, pre_bn2 = feats["2"], feats["3"]

    prop = propagate(model, x[:2], input_moments=[Moments(mu, sigma)])
    got = prop.bn_inputs["4"]
    assert _rel_err(got.mean, pre_bn2.mean(0)) < 0.01  # measured 3.0e-3
    assert _rel_err(got.cov, torch.cov(pre_bn2.t())) < 0.01  # measured 4.8e-3
    relu = gaussian_moments(prop.bn_anchored["1"].mean, prop.bn_anchored["1"].cov, torch.relu)
    assert relu.mean.shape == (10,)
    ref_cov = torch.cov(relu1.t())
    assert _rel_err(prop.outputs["3"].mean, pre_bn2.mean(0)) < 0.01
    assert ref_cov.shape == (10, 10)

    # Negative control: the same propagation from white inputs misses the sampled covariance.
    white = propagate(model, x[:2])
    assert _rel_err(white.bn_inputs["4"].cov, torch.cov(pre_bn2.t())) > 0.1  # measured 0.39


def test_relu_moments_match_sampling() -> None:
    """Rectified-Gaussian moments of correlated channels (with a duplicate) vs 400k samples."""
    g = torch.Generator().manual_seed(7)
    L = torch.randn(5, 5, generator=g, dtype=F64)
    cov = L @ L.t() + 0.1 * torch.eye(5, dtype=F64)
    cov = torch.cat([torch.cat([cov, cov[:, :1]], 1), torch.cat([cov[:1], cov[:1, :1]], 1)], 0)
    mean = torch.tensor([0.5, -1.0, 0.0, 2.0, -0.3, 0.5], dtype=F64)
    got = gaussian_moments(mean, cov, torch.relu, is_relu=True)
    z = torch.randn(400_000, 5, generator=g, dtype=F64) @ torch.linalg.cholesky(cov[:5, :5]).t()
    s = torch.relu(torch.cat([z, z[:, :1]], 1) + mean)
    assert _rel_err(got.mean, s.mean(0)) < 0.01
    assert _rel_err(got.cov, torch.cov(s.t())) < 0.01
    # the duplicate channel's row equals its twin's: correlation exactly 1
    torch.testing.assert_close(got.cov[5], got.cov[0], rtol=1e-7, atol=1e-12)
    generic = gaussian_moments(mean, cov, torch.nn.functional.gelu)
    sg = torch.nn.functional.gelu(torch.cat([z, z[:, :1]], 1) + mean)
    assert _rel_err(generic.cov, torch.cov(sg.t())) < 0.02


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 4),
    ).to(F64)


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    """(n, 1, 12, 12) spatially correlated images (blurred noise plus a per-image offset)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 12, 12, generator=g, dtype=F64)
    k = torch.ones(1, 1, 3, 3, dtype=F64) / 9
    x = nn.functional.conv2d(x, k, padding=1) * 3 + torch.randn(n, 1, 1, 1, generator=g, dtype=F64)
    return x


def _bn_stats(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (m.running_mean.clone(), m.running_var.clone())
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def _distance(a, b) -> float:
    """Mean |log var ratio| + |mean difference| / std, summed over BatchNorms."""
    total = 0.0
    for (ma, va), (mb, vb) in zip(a, b, strict=True):
        total += float((va.log() - vb.log()).abs().mean())
        total += float(((ma - mb).abs() / vb.sqrt()).mean())
    return total


def _fold_cnn(repair: str, x: torch.Tensor, **ablation) -> nn.Module:
    model = _set_bn_stats(_cnn(), x)
    cfg = netfold.FoldConfig(ratio=0.5, repair=repair)
    data = x if repair == "data" else None
    if ablation:
        orig = stats_mod.stats_repair_state
        stats_mod.stats_repair_state = functools.partial(orig, **ablation)
        try:
            netfold.fold(model, cfg, example_inputs=x[:2], data=data)
        finally:
            stats_mod.stats_repair_state = orig
    else:
        netfold.fold(model, cfg, example_inputs=x[:2], data=data)
    return model


@pytest.fixture(scope="module")
def cnn_distances() -> dict[str, float]:
    x = _smooth_images(512, seed=0)
    ref = _bn_stats(_fold_cnn("data", x))
    return {
        "none": _distance(_bn_stats(_fold_cnn("none", x)), ref),
        "stats": _distance(_bn_stats(_fold_cnn("stats", x)), ref),
        "uncorrelated": _distance(_bn_stats(_fold_cnn("stats", x, uncorrelated=True)), ref),
    }


def test_stats_closer_to_data_repair_than_none(cnn_distances) -> None:
    """(c) The predicted BatchNorm statistics are near what a calibration pass measures."""
    d = cnn_distances
    assert d["stats"] < 0.5 * d["none"], d  # measured 0.62 vs 1.82


def test_uncorrelated_control_fails_the_same_check(cnn_distances) -> None:
    """(d) Identity correlation inside clusters: the check of (c) fails."""
    d = cnn_distances
    assert not d["uncorrelated"] < 0.5 * d["none"], d  # measured 1.17 vs 0.5 * 1.82
    assert d["uncorrelated"] > 1.5 * d["stats"], d


def test_unsupported_op_raises_before_touching_the_model() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 8)
            self.bn = nn.BatchNorm1d(8)
            self.fc2 = nn.Linear(8, 2)

        def forward(self, x):
            h = self.bn(self.fc1(x))
            return self.fc2(h * h)

    model = Odd().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="repair='stats' cannot propagate"):
        netfold.fold(
            model, netfold.FoldConfig(ratio=0.5, repair="stats"), example_inputs=torch.randn(2, 4)
        )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_stats_repair_state_leaves_model_untouched() -> None:
    model, x = _dup_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, _ = stats_repair_state(model, {}, {}, x[:2])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # nothing folded: every BatchNorm keeps its stored statistics
    torch.testing.assert_close(new["1"]["running_var"], model[1].running_var, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        new["4"]["running_mean"], model[4].running_mean, rtol=1e-12, atol=1e-12
    )


def test_hugging_face_families_refuse_stats_repair() -> None:
    from types import SimpleNamespace

    model = nn.Linear(4, 4)
    model.config = SimpleNamespace(model_type="llama")
    with pytest.raises(ValueError, match="repair='stats' supports traced CNNs"):
        netfold.fold(model, netfold.FoldConfig(repair="stats"))


class _InvertedResidual(nn.Module):
    """MobileNetV2-style block: 1x1 expand, depthwise 3x3, 1x1 project, residual; ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(8, 24, 1), nn.BatchNorm2d(24), nn.ReLU6())
        self.dw = nn.Sequential(
            nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(24, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.project(self.dw(self.expand(h)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def test_mobilenet_style_block_closer_to_data_than_none() -> None:
    """Depthwise convs, ReLU6 (2-D quadrature) and a residual stream fold with repair='stats'."""
    x = _smooth_images(256, seed=1)
    torch.manual_seed(0)
    base = _set_bn_stats(_InvertedResidual().to(F64), x)
    stats, dw = {}, {}
    for repair in ("data", "none", "stats"):
        m = copy.deepcopy(base)
        cfg = netfold.FoldConfig(ratio=0.5, repair=repair)
        netfold.fold(m, cfg, example_inputs=x[:2], data=x if repair == "data" else None)
        assert m.dw[0].groups == m.dw[0].out_channels == 12
        stats[repair], dw[repair] = _bn_stats(m), m.dw[0].weight.detach()
    # the depthwise conv is a per-channel op (its BatchNorm is repaired), not a BN-free producer
    torch.testing.assert_close(dw["stats"], dw["none"], rtol=0, atol=0)
    d_none = _distance(stats["none"], stats["data"])
    d_stats = _distance(stats["stats"], stats["data"])
    assert d_stats < 0.7 * d_none, (d_stats, d_none)  # measured 0.65 vs 3.82
