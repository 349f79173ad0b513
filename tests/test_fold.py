"""Tests of netfold.fold on CNNs and MLPs (random weights, offline).

Run: python -m pytest tests/test_fold.py -q
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torchvision

import netfold
from netfold.graph.surgery import copy_channels
from netfold.models import build_model


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 5)
    ).eval()


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _plant_duplicates(model: nn.Module, groups, distinct: dict[str, int]) -> None:
    """Make channel i a copy of channel i % d in every listed group (rows, per-channel
    parameters and consumer columns), so the group folds exactly to d channels."""
    for g in groups:
        if g.name in distinct:
            copy_channels(model, g, torch.arange(g.size) % distinct[g.name])


# ---------------------------------------------------------------- identity at ratio 0
@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn", "mobilenet_v2", "mlp"])
@pytest.mark.parametrize("repair", ["none", "ar"])
def test_ratio_zero_is_bit_identical(arch, repair):
    if arch == "mlp":
        model, x = _mlp(), torch.randn(8, 20)
    else:
        model = _randomise_bn(getattr(torchvision.models, arch)(num_classes=10))
        x = torch.randn(2, 3, 32, 32)
    before = copy.deepcopy(model.state_dict())
    ref = model(x)
    report = netfold.fold(model, netfold.FoldConfig(ratio=0.0, repair=repair), example_inputs=x)
    assert _state_equal(model.state_dict(), before)
    assert torch.equal(model(x), ref)
    assert report.params_after == report.params_before
    assert report.sparsity == 0.0


# ---------------------------------------------------------------- exact folds
@pytest.mark.parametrize("repair", ["none", "ar"])
@pytest.mark.parametrize("arch", ["resnet18_cifar", "vgg11_bn_cifar", "mlp"])
def test_planted_duplicates_fold_exactly(arch, repair):
    torch.manual_seed(1)
    if arch == "mlp":
        model, x = _mlp(), torch.randn(16, 20)
    else:
        # float64: the logits of these random nets reach ~1e2, float32 rounding alone is ~1e-5
        model = _randomise_bn(
            build_model(arch, in_channels=3, num_classes=10, width=0.125)
        ).double()
        x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    groups = netfold.find_groups(model, x)
    foldable = [g for g in groups if g.foldable]
    distinct = {g.name: max(1, g.size // 2) for g in foldable}
    _plant_duplicates(model, groups, distinct)
    ref = model(x).detach()
    ratios = {g.name: 1.0 - distinct[g.name] / g.size for g in foldable}
    report = netfold.fold(
        model,
        netfold.FoldConfig(ratio=0.0, ratios=ratios, repair=repair, n_init=2),
        example_inputs=x,
    )
    assert all(g.width_after == distinct[g.name] for g in report.groups)
    assert report.params_after < report.params_before
    out = model(x)
    assert (out - ref).abs().max().item() < 1e-5


def test_negative_control_without_duplicates_is_not_exact():
    torch.manual_seed(1)
    model = _randomise_bn(build_model("resnet18_cifar", in_channels=3, num_classes=10, width=0.125))
    x = torch.randn(4, 3, 32, 32)
    ref = model(x).detach()
    netfold.fold(model, netfold.FoldConfig(ratio=0.5, repair="none", n_init=2), example_inputs=x)
    assert (model(x) - ref).abs().max().item() > 1e-3


# ---------------------------------------------------------------- shapes at ratio 0.5
def _expected_params(model: nn.Module, report) -> int:
    """Recount parameters from the modules' own width attributes (independent of tensors)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += m.out_channels * (m.in_channels // m.groups) * kh * kw + (
                m.out_channels if m.bias is not None else 0
            )
        elif isinstance(m, nn.Linear):
            total += m.out_features * m.in_features + (m.out_features if m.bias is not None else 0)
        elif isinstance(m, nn.BatchNorm2d):
            total += 2 * m.num_features
    return total


@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn", "mobilenet_v2", "resnet50"])
def test_torchvision_fold_half(arch):
    model = _randomise_bn(getattr(torchvision.models, arch)(num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    report = netfold.fold(
        model, netfold.FoldConfig(ratio=0.5, repair="ar", n_init=1, max_iter=5), example_inputs=x
    )
    out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    assert (
        report.params_after
        == _expected_params(model, report)
        == sum(p.numel() for p in model.parameters())
    )
    for g in report.groups:
        assert g.width_after == round(g.width_before * 0.5)
    # conv params shrink ~ (1 - r)^2 on both sides, the classifier only on its inputs
    assert 0.6 < report.sparsity < 0.8, report.sparsity
    assert report.flops_after < 0.5 * report.flops_before


def test_depthwise_stays_consistent():
    model = _randomise_bn(torchvision.models.mobilenet_v2(num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    netfold.fold(
        model, netfold.FoldConfig(ratio=0.3, repair="none", n_init=1, max_iter=3), example_inputs=x
    )
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels == m.weight.shape[0]


def test_classifier_outputs_never_folded():
    model = _mlp()
    netfold.fold(model, netfold.FoldConfig(ratio=0.9), example_inputs=torch.randn(4, 20))
    assert model[-1].out_features == 5
    assert model[0].in_features == 20


# ---------------------------------------------------------------- determinism
def test_same_seed_same_result():
    base = _randomise_bn(build_model("resnet18_cifar", in_channels=1, num_classes=10, width=0.125))
    x = torch.randn(2, 1, 32, 32)
    outs = []
    for _ in range(2):
        m = copy.deepcopy(base)
        netfold.fold(m, netfold.FoldConfig(ratio=0.4, seed=3), example_inputs=x)
        outs.append((m.state_dict(), m(x)))
    assert _state_equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


# ---------------------------------------------------------------- repairs with data
def test_repair_data_and_dir_run_and_reset_bn():
    torch.manual_seed(0)
    model = _randomise_bn(build_model("resnet18_cifar", in_channels=1, num_classes=10, width=0.125))
    x = torch.randn(64, 1, 32, 32)
    m_data = copy.deepcopy(model)
    netfold.fold(
        m_data, netfold.FoldConfig(ratio=0.5, repair="data", n_init=2), example_inputs=x[:2], data=x
    )
    # after re-estimation on x, the BN that follows the stem sees zero-mean inputs on x
    bn = (
        m_data.bn1
        if hasattr(m_data, "bn1")
        else next(m for m in m_data.modules() if isinstance(m, nn.BatchNorm2d))
    )
    feats = {}
    h = bn.register_forward_hook(lambda mod, i, o: feats.setdefault("in", i[0]))
    m_data(x)
    h.remove()
    mean = feats["in"].mean((0, 2, 3))
    torch.testing.assert_close(bn.running_mean, mean, atol=1e-4, rtol=1e-4)
    m_dir = copy.deepcopy(model)
    cfg = netfold.FoldConfig(
        ratio=0.5,
        repair="dir",
        n_init=2,
        deep_inversion=netfold.DeepInversionConfig(batch_size=16, steps=3),
    )
    rep = netfold.fold(m_dir, cfg, example_inputs=x[:2])
    assert rep.params_after < rep.params_before
    assert torch.isfinite(m_dir(x)).all()


def test_repair_data_without_bn_matches_member_statistics():
    """REPAIR on a BN-free MLP: merged channels get the mean of their members' mean/std."""
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(512, 20)
    orig = copy.deepcopy(model)
    rep = netfold.fold(model, netfold.FoldConfig(ratio=0.5, repair="data", n_init=2), data=x)
    assert rep.groups[0].width_after == 32
    with torch.no_grad():
        h_orig = orig[0](x)
        h_new = model[0](x)
    labels = torch.tensor(rep.groups[0].labels)
    counts = torch.bincount(labels, minlength=32).double()

    def cluster_mean(v):  # (64,) -> (32,) mean over each cluster's members
        return torch.zeros(32, dtype=torch.float64).index_add_(0, labels, v.double()) / counts

    torch.testing.assert_close(
        h_new.std(0, unbiased=False).double(),
        cluster_mean(h_orig.std(0, unbiased=False)),
        rtol=1e-4,
        atol=1e-5,
    )
    torch.testing.assert_close(
        h_new.mean(0).double(), cluster_mean(h_orig.mean(0)), rtol=1e-4, atol=1e-5
    )


def test_ar_reduces_variance_collapse():
    """Fold-AR keeps the last layer's variance closer to the original than Fold-naive."""
    from netfold.eval.variance import variance_ratio

    torch.manual_seed(0)
    base = _randomise_bn(build_model("resnet18_cifar", in_channels=1, num_classes=10, width=0.25))
    x = torch.randn(64, 1, 32, 32)
    vr = {}
    for repair in ("none", "ar"):
        m = copy.deepcopy(base)
        netfold.fold(
            m, netfold.FoldConfig(ratio=0.5, repair=repair, n_init=2), example_inputs=x[:2]
        )
        vr[repair] = variance_ratio(base, m, x)["<classifier input>"]
    # random weights are nearly uncorrelated: naive folding collapses the variance (~0.01),
    # AR overshoots mildly (~2); compare on a log scale
    assert abs(math.log(vr["ar"])) < abs(math.log(vr["none"])), vr


# ---------------------------------------------------------------- target sparsity
@pytest.mark.parametrize("target", [0.3, 0.6])
def test_target_sparsity(target):
    model = _randomise_bn(build_model("vgg11_bn_cifar", in_channels=1, num_classes=10, width=0.25))
    rep = netfold.fold(
        model, netfold.FoldConfig(target_sparsity=target, repair="none", n_init=1, max_iter=5)
    )
    assert abs(rep.sparsity - target) < 0.01, rep.sparsity


@pytest.mark.parametrize("allocation", ["uniform", "cost"])
def test_round_to_gives_multiples_and_meets_budget(allocation):
    model = _randomise_bn(build_model("resnet18_cifar", in_channels=1, num_classes=10, width=0.5))
    x = torch.randn(1, 1, 32, 32)
    cfg = dict(repair="none", n_init=1, max_iter=5, allocation=allocation)
    plain = netfold.fold(
        copy.deepcopy(model), netfold.FoldConfig(ratio=0.3, **cfg), example_inputs=x
    )
    # negative control: exact ratios give widths that are not multiples of 8 (32 -> 22)
    assert any(g.width_after % 8 for g in plain.groups if g.width_after < g.width_before)
    rep = netfold.fold(model, netfold.FoldConfig(ratio=0.3, round_to=8, **cfg), example_inputs=x)
    folded = [g for g in rep.groups if g.width_after < g.width_before]
    assert folded and all(g.width_after % 8 == 0 for g in folded), [
        (g.name, g.width_after) for g in folded
    ]
    assert abs(rep.sparsity - plain.sparsity) < 0.03, (rep.sparsity, plain.sparsity)
    assert model(x).shape == (1, 10)


def test_round_to_width_rule():
    from netfold.api import width_for

    cfg = netfold.FoldConfig(round_to=8)
    assert width_for(64, 0.3, cfg) == 48  # 44.8 -> 45 -> 48
    assert width_for(64, 0.0, cfg) == 64  # identity stays the identity
    assert width_for(64, 0.99, cfg) == 8  # never below one multiple
    assert width_for(6, 0.5, cfg) == 6  # narrower than round_to: keeps its width
    assert width_for(64, 0.9, netfold.FoldConfig(round_to=8, min_channels=11)) == 16
    assert width_for(64, 0.3, netfold.FoldConfig()) == 45
    with pytest.raises(ValueError, match="round_to"):
        netfold.FoldConfig(round_to=0)


def test_per_layer_ratios_and_skip():
    model = _randomise_bn(build_model("vgg11_bn_cifar", in_channels=1, num_classes=10, width=0.25))
    x = torch.randn(2, 1, 32, 32)
    rep = netfold.fold(
        model,
        netfold.FoldConfig(
            ratio=0.5, ratios={"features.0": 0.25}, skip=("classifier.*",), n_init=1
        ),
        example_inputs=x,
    )
    widths = {g.name: (g.width_before, g.width_after) for g in rep.groups}
    first = next(iter(widths))
    assert widths[first] == (16, 12)
    for name, (b, a) in widths.items():
        if name.startswith("classifier"):
            assert a == b
        elif name != first:
            assert a == round(b * 0.5)


# ---------------------------------------------------------------- bad input changes nothing
class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:  # data-dependent control flow
            h = h.relu()
        return self.out(h)


@pytest.mark.parametrize(
    "make_cfg, kwargs, exc, words",
    [
        (lambda: netfold.FoldConfig(ratio=1.0), {}, ValueError, "ratio"),
        (lambda: netfold.FoldConfig(ratio=-0.1), {}, ValueError, "ratio"),
        (lambda: netfold.FoldConfig(method="nope"), {}, ValueError, "method"),
        (lambda: netfold.FoldConfig(repair="nope"), {}, ValueError, "repair"),
        (lambda: netfold.FoldConfig(min_channels=0), {}, ValueError, "min_channels"),
        (lambda: netfold.FoldConfig(repair="data"), {}, ValueError, "data"),
        (lambda: netfold.FoldConfig(target_sparsity=0.999), {}, ValueError, "unreachable"),
    ],
)
def test_bad_input_raises_and_changes_nothing(make_cfg, kwargs, exc, words):
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=words):
        netfold.fold(model, make_cfg(), example_inputs=torch.randn(2, 20), **kwargs)
    assert _state_equal(model.state_dict(), before)


def test_nan_weights_rejected():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"2\.weight.*NaN"):
        netfold.fold(model, netfold.FoldConfig(ratio=0.5))
    after = model.state_dict()
    assert after.keys() == before.keys()
    # NaN != NaN, so compare with the NaN replaced by the same number on both sides
    assert all(torch.equal(after[k].nan_to_num(7.0), before[k].nan_to_num(7.0)) for k in before)
    assert model[0].out_features == 64


def test_untraceable_model_raises_type_error():
    model = _Untraceable()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="cannot trace"):
        netfold.fold(model, netfold.FoldConfig(ratio=0.5), example_inputs=torch.randn(2, 4))
    assert _state_equal(model.state_dict(), before)


def test_dir_without_batchnorm_rejected():
    model = _mlp()
    with pytest.raises(ValueError, match="BatchNorm"):
        netfold.fold(model, netfold.FoldConfig(repair="dir"))


def test_failure_during_write_rolls_back(monkeypatch):
    """An exception after the write started restores every tensor and width."""
    from netfold.fold import repairs

    model = _randomise_bn(build_model("resnet18_cifar", in_channels=1, num_classes=10, width=0.125))
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(8, 1, 32, 32)

    def boom(*a, **k):
        raise RuntimeError("simulated failure during repair")

    monkeypatch.setattr(repairs, "repair_with_batch", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        netfold.fold(
            model,
            netfold.FoldConfig(ratio=0.5, repair="data", n_init=1),
            example_inputs=x[:2],
            data=x,
        )
    assert _state_equal(model.state_dict(), before)
    assert model(x).shape == (8, 10)
    assert model.conv1.out_channels == 8


def test_unknown_op_freezes_group_and_reports_it():
    class WithCat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(6, 8)
            self.c = nn.Linear(6, 8)
            self.d = nn.Linear(8, 8)
            self.out = nn.Linear(24, 3)

        def forward(self, x):
            h = torch.cat([self.a(x), self.b(x), self.d(torch.relu(self.c(x)))], dim=1)
            return self.out(torch.relu(torch.cumsum(h, dim=1)))  # cumsum mixes channels

    model = WithCat().eval()
    rep = netfold.fold(
        model, netfold.FoldConfig(ratio=0.5, n_init=1), example_inputs=torch.randn(2, 6)
    )
    skipped = dict(rep.skipped)
    assert "cumsum" in skipped["a"]
    assert model.a.out_features == 8 and model.out.in_features == 24
    assert model.c.out_features == 4 and model.d.in_features == 4  # c's group is independent
    assert model(torch.randn(3, 6)).shape == (3, 3)


# ---------------------------------------------------------------- merge: float64 reference
def _merge_model() -> nn.Module:
    """conv -> BN -> PReLU -> depthwise conv -> BN -> flatten -> Linear (4 columns per
    channel), and a BN-free Linear -> Linear pair; float64, trained-like BN statistics."""
    torch.manual_seed(0)
    m = nn.Module()
    m.conv = nn.Conv2d(3, 8, 3, bias=True)
    m.bn = nn.BatchNorm2d(8, eps=1e-3)
    m.act = nn.PReLU(8)
    m.dw = nn.Conv2d(8, 8, 3, groups=8, bias=True)
    m.bn2 = nn.BatchNorm2d(8)
    m.fc = nn.Linear(8 * 4, 5)
    m.lin1 = nn.Linear(6, 7)
    m.lin2 = nn.Linear(7, 3)
    m = m.double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (m.bn, m.bn2):
            bn.weight.copy_(0.5 + torch.rand(8, generator=g, dtype=torch.float64))
            bn.bias.copy_(torch.randn(8, generator=g, dtype=torch.float64))
            bn.running_mean.copy_(torch.randn(8, generator=g, dtype=torch.float64))
            bn.running_var.copy_(0.1 + 3 * torch.rand(8, generator=g, dtype=torch.float64))
        m.act.weight.copy_(torch.rand(8, generator=g, dtype=torch.float64))
        # correlated members (mean cosine ~0.8, inside the AR clamp) and an anti-correlated
        # pair (negative mean cosine, clamped to 0) so every branch of the AR scale matters
        for layer, same, anti in ((m.conv, [0, 2, 5], [1, 4]), (m.lin1, [0, 3, 6], [1, 2])):
            w = layer.weight
            base = w[same[0]].clone()
            for i in same:
                w[i] = (
                    base
                    + 0.5 * torch.randn(base.shape, generator=g, dtype=torch.float64) * base.std()
                )
            w[anti[1]] = (
                -w[anti[0]]
                + 0.1 * torch.randn(base.shape, generator=g, dtype=torch.float64) * base.std()
            )
    return m.eval()


def _merge_groups():
    from netfold.graph.groups import ChannelGroup, Consumer

    conv = ChannelGroup(
        name="conv",
        size=8,
        producers=["conv"],
        channel_ops=["bn", "act", "dw", "bn2"],
        consumers=[Consumer("fc", 4)],
        bn_of={"conv": "bn"},
    )
    lin = ChannelGroup(name="lin1", size=7, producers=["lin1"], consumers=[Consumer("lin2", 1)])
    return conv, lin


CONV_LABELS = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2])  # clusters of 3, 2 and 3 channels
LIN_LABELS = torch.tensor([0, 1, 1, 0, 2, 1, 0])  # 3, 3 and 1


def _members(labels: torch.Tensor) -> list[list[int]]:
    return [
        [i for i in range(len(labels)) if int(labels[i]) == c] for c in range(int(labels.max()) + 1)
    ]


def _mean_cos(rows: list[torch.Tensor]) -> float:
    """Mean cosine similarity over ordered pairs i != j (1 for a single row)."""
    if len(rows) == 1:
        return 1.0
    vals = []
    for i, a in enumerate(rows):
        for j, b in enumerate(rows):
            if i != j:
                vals.append(float(a.flatten() @ b.flatten() / (a.norm() * b.norm())))
    return sum(vals) / len(vals)


def _reference_merge(m: nn.Module, mode: str, bn_var: str = "inverse_sigma") -> dict:
    """The merged tensors written out member by member from ALGORITHMS.md, loop by loop.

    ``bn_var``: "inverse_sigma" (the merged channel normalises by the mean of its members'
    1 / sigma) or "mean_var" (the wrong rule, a negative control).
    """
    out: dict[str, dict[str, torch.Tensor]] = {}

    def mean(ts):
        return sum(ts) / len(ts)

    cl = _members(CONV_LABELS)
    sig = [math.sqrt(float(m.bn.running_var[i]) + m.bn.eps) for i in range(8)]
    W, b = m.conv.weight.detach(), m.conv.bias.detach()
    if mode == "ar":  # BN normalisation folded into the conv first
        out["conv"] = {
            "weight": torch.stack([mean([W[i] / sig[i] for i in c]) for c in cl]),
            "bias": torch.stack([mean([b[i] / sig[i] for i in c]) for c in cl]),
        }
    else:
        out["conv"] = {
            "weight": torch.stack([mean([W[i] for i in c]) for c in cl]),
            "bias": torch.stack([mean([b[i] for i in c]) for c in cl]),
        }
    for name in ("bn", "bn2"):
        bn = getattr(m, name)
        s = [math.sqrt(float(bn.running_var[i]) + bn.eps) for i in range(8)]
        gamma = torch.stack([mean([bn.weight[i] for i in c]) for c in cl]).detach()
        if mode == "ar" and name == "bn":
            mu = torch.tensor(
                [mean([float(bn.running_mean[i]) / s[i] for i in c]) for c in cl],
                dtype=torch.float64,
            )
            var = torch.full((3,), 1.0 - bn.eps, dtype=torch.float64)
            scale = [
                math.sqrt(
                    len(c) / (1 + (len(c) - 1) * min(max(_mean_cos([W[i] for i in c]), 0), 1))
                )
                for c in cl
            ]
            gamma = gamma * torch.tensor(scale, dtype=torch.float64)
        else:
            mu = torch.tensor(
                [mean([float(bn.running_mean[i]) for i in c]) for c in cl], dtype=torch.float64
            )
            if bn_var == "inverse_sigma":
                var = torch.tensor(
                    [1.0 / mean([1.0 / s[i] for i in c]) ** 2 - bn.eps for c in cl],
                    dtype=torch.float64,
                )
            else:
                var = torch.tensor(
                    [mean([float(bn.running_var[i]) for i in c]) for c in cl], dtype=torch.float64
                )
        out[name] = {
            "weight": gamma,
            "bias": torch.stack([mean([bn.bias[i] for i in c]) for c in cl]).detach(),
            "running_mean": mu.double(),
            "running_var": var.double(),
        }
    out["act"] = {"weight": torch.stack([mean([m.act.weight[i] for i in c]) for c in cl]).detach()}
    out["dw"] = {
        "weight": torch.stack([mean([m.dw.weight[i] for i in c]) for c in cl]).detach(),
        "bias": torch.stack([mean([m.dw.bias[i] for i in c]) for c in cl]).detach(),
    }
    F = m.fc.weight.detach().reshape(5, 8, 4)  # channel i owns columns 4i..4i+3 (flatten)
    out["fc"] = {"weight": torch.stack([sum(F[:, i] for i in c) for c in cl], 1).reshape(5, 12)}
    ll = _members(LIN_LABELS)
    W1, b1 = m.lin1.weight.detach(), m.lin1.bias.detach()
    rows = []
    for c in ll:
        r = mean([W1[i] for i in c])
        if mode == "ar":  # no BN: merged row keeps the members' mean squared norm
            f = math.sqrt(mean([float(W1[i] @ W1[i]) for i in c]) / float(r @ r))
            r = r * min(max(f, 1.0), math.sqrt(len(c)))
        rows.append(r)
    out["lin1"] = {
        "weight": torch.stack(rows),
        "bias": torch.stack([mean([b1[i] for i in c]) for c in ll]),
    }
    W2 = m.lin2.weight.detach()
    out["lin2"] = {"weight": torch.stack([sum(W2[:, i] for i in c) for c in ll], 1)}
    return out


@pytest.mark.parametrize("mode", ["naive", "ar"])
def test_merge_matches_float64_reference_for_every_tensor_kind(mode):
    from netfold.fold.merge import merge_group

    m = _merge_model()
    before = copy.deepcopy(m.state_dict())
    conv, lin = _merge_groups()
    state: dict = {}
    merge_group(state, m, conv, CONV_LABELS, 3, mode)
    merge_group(state, m, lin, LIN_LABELS, 3, mode)
    assert _state_equal(m.state_dict(), before)  # functional: the model is untouched
    ref = _reference_merge(m, mode)
    assert set(state) == set(ref)
    for mod, tensors in ref.items():
        assert set(state[mod]) == set(tensors), mod
        for t, want in tensors.items():
            got = state[mod][t]
            assert got.dtype == torch.float64 and got.shape == want.shape, (mod, t)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{mod}.{t}")
    # negative control: the mean-variance BN rule is measurably different from the code's
    wrong = _reference_merge(m, mode, bn_var="mean_var")
    assert (wrong["bn2"]["running_var"] - state["bn2"]["running_var"]).abs().max() > 1e-2
    if mode == "ar":  # the Fold-AR scale is really applied (> 1 for these clusters)
        plain = _reference_merge(m, "naive")
        gain = state["bn"]["weight"] / plain["bn"]["weight"]
        assert 1.02 < float(gain[0]) < 1.3 and float(gain[1]) == pytest.approx(2**0.5, rel=1e-12)
        f = state["lin1"]["weight"].norm(dim=1) / plain["lin1"]["weight"].norm(dim=1)
        assert 1.02 < float(f[0]) < 1.3 and float(f[2]) == pytest.approx(1.0, rel=1e-12)


# ---------------------------------------------------------------- repair on trained-like BN
def _trained_like_cnn() -> nn.Sequential:
    """float64 conv-BN-ReLU-conv-BN-ReLU-pool-Linear with BN statistics far from 0/1 and
    ``num_batches_tracked`` > 0, as after training."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 4),
    ).double()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for bn in (m[1], m[4]):
            n = bn.num_features
            bn.running_mean.copy_(3.0 + torch.randn(n, generator=g, dtype=torch.float64))
            bn.running_var.copy_(5.0 + 4 * torch.rand(n, generator=g, dtype=torch.float64))
            bn.weight.copy_(0.5 + torch.rand(n, generator=g, dtype=torch.float64))
            bn.bias.copy_(torch.randn(n, generator=g, dtype=torch.float64))
            bn.num_batches_tracked.fill_(37)
            bn.momentum = 0.1
    return m.eval()


def test_repair_with_batch_reestimates_bn_statistics_and_fuses_repair():
    """After the repair pass each BN's running stats are exactly the batch statistics of its
    input (cumulative average restarted at 0), computed here independently in float64, and
    the REPAIR correction of a BN-free producer is fused into its weight and bias."""
    import torch.nn.functional as F

    from netfold.fold.repair import repair_with_batch

    m = _trained_like_cnn()
    x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tmean = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    tstd = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    W8, b8 = m[8].weight.detach().clone(), m[8].bias.detach().clone()

    # independent forward in train-mode BN semantics (batch statistics, biased variance)
    def bn_train(h, bn):
        mu = h.mean((0, 2, 3))
        var_b = h.var((0, 2, 3), unbiased=False)
        y = (h - mu[:, None, None]) / torch.sqrt(var_b + bn.eps)[:, None, None]
        return (
            y * bn.weight.detach()[:, None, None] + bn.bias.detach()[:, None, None],
            mu,
            h.var((0, 2, 3), unbiased=True),
        )

    h1 = F.conv2d(x, m[0].weight.detach(), m[0].bias.detach(), padding=1)
    y1, mu1, var1 = bn_train(h1, m[1])
    h2 = F.conv2d(F.relu(y1), m[3].weight.detach(), m[3].bias.detach(), padding=1)
    y2, mu2, var2 = bn_train(h2, m[4])
    z = F.relu(y2).mean((2, 3)) @ W8.t() + b8
    scale = tstd / z.std(0, unbiased=False)
    shift = tmean - z.mean(0) * scale

    snapshot = dict(m.state_dict())  # references, as a rollback snapshot would hold them
    copies = {k: v.clone() for k, v in snapshot.items()}
    report = repair_with_batch(m, x, {"8": (tmean, tstd)})
    assert _state_equal(snapshot, copies)  # fresh buffers: the old tensors are not written
    for bn, mu, var in ((m[1], mu1, var1), (m[4], mu2, var2)):
        torch.testing.assert_close(bn.running_mean, mu, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-10, atol=1e-10)
        assert int(bn.num_batches_tracked) == 1
        assert bn.momentum == 0.1 and not bn.training  # settings restored
    assert not m.training
    torch.testing.assert_close(m[8].weight, W8 * scale[:, None], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m[8].bias, b8 * scale + shift, rtol=1e-10, atol=1e-10)
    assert report["8"] == pytest.approx(float(scale.log().abs().mean()), rel=1e-9)
    # negative control: a stale count (no reset) would average with the old statistics
    stale = mu1 / 38.0
    assert (m[1].running_mean - stale).abs().max() > 0.1


def test_repair_without_reset_keeps_bn_statistics():
    from netfold.fold.repair import repair_with_batch

    m = _trained_like_cnn()
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    repair_with_batch(m, x, {}, reset_bn=False)
    assert _state_equal(m.state_dict(), before)


@pytest.mark.parametrize("mode", ["naive", "ar"])
def test_group_features_layout_matches_reference(mode):
    """The clustering features, column block by column block, from ALGORITHMS.md: producer
    rows (divided by the paired BN's sigma for Fold-AR) and bias, per-channel BN/PReLU/
    depthwise parameters, 1/sigma of unpaired BNs, consumer columns (all ``repeat`` columns
    of a channel in one row)."""
    from netfold.fold.merge import group_features

    m = _merge_model()
    conv, lin = _merge_groups()
    got = group_features(m, conv, mode)
    W = m.conv.weight.detach().reshape(8, -1)
    b = m.conv.bias.detach()
    s1 = torch.sqrt(m.bn.running_var + m.bn.eps)
    s2 = torch.sqrt(m.bn2.running_var + m.bn2.eps)
    blocks = [W / s1[:, None], (b / s1)[:, None]] if mode == "ar" else [W, b[:, None]]
    blocks += [m.bn.weight[:, None], m.bn.bias[:, None]]
    if mode != "ar":
        blocks.append((1 / s1)[:, None])
    blocks += [m.act.weight[:, None], m.dw.weight.reshape(8, -1), m.dw.bias[:, None]]
    blocks += [m.bn2.weight[:, None], m.bn2.bias[:, None], (1 / s2)[:, None]]
    F = m.fc.weight.detach().reshape(5, 8, 4)
    blocks.append(torch.stack([F[:, i].reshape(-1) for i in range(8)]))
    want = torch.cat([t.detach() for t in blocks], 1)
    assert got.shape == want.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got = group_features(m, lin, mode)
    want = torch.cat([m.lin1.weight, m.lin1.bias[:, None], m.lin2.weight.t()], 1).detach()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_collect_inputs_accepts_tensors_batches_and_loaders():
    from netfold.fold.repair import collect_inputs

    x = torch.arange(40.0).reshape(10, 4)
    y = torch.arange(10)
    assert torch.equal(collect_inputs(x, max_samples=3), x[:3])
    assert torch.equal(collect_inputs((x, y)), x)  # one (x, y) batch
    assert torch.equal(collect_inputs([x[:4], x[4:]]), x)
    assert torch.equal(collect_inputs([(x[:4], y[:4]), (x[4:], y[4:])], max_samples=6), x[:6])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    assert torch.equal(collect_inputs(loader, max_samples=5), x[:5])
    assert torch.equal(collect_inputs(loader, max_samples=6), x[:6])
    assert torch.equal(collect_inputs(loader, max_samples=7), x[:7])  # a third batch is read
    x12 = torch.arange(48.0).reshape(12, 4)
    for max_samples, batches in ((6, 2), (7, 3), (12, 4)):  # reads only the batches it needs
        pulled = []

        def batches_of_3(pulled=pulled):
            for i in range(4):
                pulled.append(i)
                yield x12[3 * i : 3 * i + 3]

        assert torch.equal(
            collect_inputs(batches_of_3(), max_samples=max_samples), x12[:max_samples]
        )
        assert len(pulled) == batches
    one_d = [torch.arange(3.0), torch.arange(3.0, 6.0)]  # two batches of 1-D inputs
    assert torch.equal(collect_inputs(one_d), torch.arange(6.0))
    with pytest.raises(RuntimeError):  # lengths differ: not one (x, y) batch but two batches
        collect_inputs((x, y[:7]))
    with pytest.raises(ValueError, match="no data"):
        collect_inputs(None)
    with pytest.raises(ValueError, match="empty"):
        collect_inputs([])
    with pytest.raises(TypeError, match="data must be"):
        collect_inputs(3)
    with pytest.raises(TypeError, match="batches must be"):
        collect_inputs([[1, 2]])


def test_producer_stats_are_float64_per_channel_moments():
    from netfold.fold.repair import producer_stats

    m = _trained_like_cnn()
    m.train()
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    st = producer_stats(m, ["0", "8"], x)
    assert m.training  # mode restored
    h = torch.nn.functional.conv2d(x, m[0].weight, m[0].bias, padding=1).detach()
    torch.testing.assert_close(st["0"][0], h.mean((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st["0"][1], h.std((0, 2, 3), unbiased=False), rtol=1e-12, atol=1e-12)
    m.eval()
    out = m(x).detach()
    torch.testing.assert_close(st["8"][0], out.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st["8"][1], out.std(0, unbiased=False), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- DIR on a trained model
def _trained_digits_cnn():
    """A conv-BN CNN trained for 6 epochs on scikit-learn's bundled 8x8 digits (~2 s);
    returns the model and the held-out (x, y) split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(6):
        p = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(p), 64):
            b = p[i : i + 64]
            loss = nn.functional.cross_entropy(model(X[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), X[te], y[te]


@pytest.mark.slow
def test_dir_beats_no_repair_on_a_trained_model():
    """Deep-Inversion repair recovers accuracy that plain folding loses. Measured on this
    model (397 held-out digits, dense 0.99): ratio 0.5: none 0.81, dir 0.96; ratio 0.75:
    none 0.62, dir 0.76."""
    model, x, y = _trained_digits_cnn()

    def acc(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(x).argmax(1) == y).float().mean())

    assert acc(model) > 0.95
    for ratio in (0.5, 0.75):
        res = {}
        for repair in ("none", "dir"):
            m = copy.deepcopy(model)
            cfg = netfold.FoldConfig(
                ratio=ratio,
                repair=repair,
                n_init=2,
                deep_inversion=netfold.DeepInversionConfig(
                    batch_size=64, steps=100, num_classes=10
                ),
            )
            netfold.fold(m, cfg, example_inputs=x[:2])
            res[repair] = acc(m)
        assert res["dir"] > res["none"] + 0.08, (ratio, res)
    assert res["dir"] > 0.65  # ratio 0.75


def test_group_features_promote_to_the_widest_dtype():
    """Features of a group whose tensors differ in dtype come out in the widest one,
    whichever block (first or later) carries it."""
    from netfold.fold.merge import group_features
    from netfold.graph.groups import ChannelGroup, Consumer

    for first, second in ((torch.float64, torch.float32), (torch.float32, torch.float64)):
        m = nn.Module()
        m.a = nn.Linear(3, 4, bias=False).to(first)
        m.b = nn.Linear(4, 2, bias=False).to(second)
        g = ChannelGroup(name="a", size=4, producers=["a"], consumers=[Consumer("b")])
        X = group_features(m, g, "naive")
        assert X.dtype == torch.float64
        want = torch.cat([m.a.weight.double(), m.b.weight.double().t()], 1).detach()
        torch.testing.assert_close(X, want, rtol=0, atol=0)


@pytest.mark.parametrize(("eps", "var"), [(1e-5, 1.0 - 1e-5), (1.0, 0.0), (1.5, 1.0)])
def test_ar_paired_bn_gets_unit_normalisation(eps, var):
    """With Fold-AR the BN normalisation moves into the conv, so the merged BN must divide by
    sqrt(running_var + eps) = 1: running_var = 1 - eps, which is valid (>= 0) up to eps = 1.
    Beyond that no variance can do it and the code falls back to running_var = 1."""
    from netfold.fold.merge import merge_group

    m = _merge_model()
    m.bn.eps = eps
    conv, _ = _merge_groups()
    state: dict = {}
    merge_group(state, m, conv, CONV_LABELS, 3, "ar")
    torch.testing.assert_close(
        state["bn"]["running_var"], torch.full((3,), var, dtype=torch.float64), rtol=0, atol=1e-15
    )


def test_repair_pass_feeds_corrected_outputs_forward():
    """REPAIR on an early producer corrects its output during the same pass, so the BN after
    it records the corrected statistics; dropout is off during the pass even for a model in
    train mode, modes are restored and no hook is left behind."""
    from netfold.fold.repair import producer_stats, repair_with_batch

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.BatchNorm1d(3), nn.Linear(3, 2))
    m = m.double().train()
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    tmean = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    tstd = torch.tensor([0.1, 3.0, 0.7], dtype=torch.float64)  # scales below and above 1
    with torch.no_grad():
        h = m[0](x)
    scale = tstd / h.std(0, unbiased=False)
    assert bool((scale < 1).any() and (scale > 1).any())
    report = repair_with_batch(m, x, {"0": (tmean, tstd)})
    assert report["0"] == pytest.approx(float(scale.log().abs().mean()), rel=1e-9)
    torch.testing.assert_close(m[2].running_mean, tmean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m[2].running_var, tstd**2 * 64 / 63, rtol=1e-10, atol=1e-10)
    assert m.training and m[1].training and m[2].training  # the caller's modes
    assert all(not mod._forward_hooks for mod in m.modules())
    producer_stats(m, ["0", "3"], x)
    assert all(not mod._forward_hooks for mod in m.modules())
    assert m.training
