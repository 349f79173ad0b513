"""timm models fold through the tracer: functional BatchNorm (timm's BatchNormAct2d), channels-last
LayerNorm behind permutes (ConvNeXt), layer-scale gammas, squeeze-excite gates, ViT's class token
and position embedding, grouped / depthwise convs.

The first half checks each construct on a small hand-built model (no timm needed); the second
half runs the timm zoo (skipped when timm is missing).

Exactness. Merging duplicated channels is exact through every op followed here except a
LayerNorm over the channel axis: it normalises across channels, and the folded tensor's k
channels have the original n channels' mean and variance only when every cluster has the same
size. The tracer folds such a LayerNorm anyway (as a per-channel op, weight/bias by the cluster
mean; ``ChannelGroup.approximations`` says so): planted duplicates with equal multiplicity fold
exactly through it, unequal multiplicity does not (tested both ways), and groups that pass no
LayerNorm fold exactly for any multiplicity.

Run: python -m pytest tests/test_timm.py -q
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import netfold
from netfold.graph.surgery import copy_channels, get_module

torch.set_num_threads(1)
F64 = torch.float64
REL = 1e-9  # relative tolerance of the exact paths (float64)


# ---------------------------------------------------------------- helpers
def _twins(n: int, align: int, d: int, skew: bool = False) -> torch.Tensor:
    """src (n,): channel i becomes a copy of channel src[i]; d distinct channels kept per group.

    Copies stay inside the ``align`` conv blocks. Each distinct channel appears equally often
    when the block size is a multiple of d / align; ``skew`` makes the multiplicities unequal
    (the first distinct channel of each block takes every spare slot).
    """
    bs, db = n // align, d // align
    i = torch.arange(n)
    local = i % bs
    if skew:
        local = torch.where(local < db, local, torch.zeros_like(local))
    else:
        local = local % db
    return (i // bs) * bs + local


def plant(model: nn.Module, groups, src_of: dict) -> None:
    """Copy channels ``src_of[name]`` in every listed group (netfold's copy_channels)."""
    for g in groups:
        if g.name in src_of:
            copy_channels(model, g, src_of[g.name])


def randomise(model: nn.Module, groups, seed: int = 0) -> nn.Module:
    """Non-trivial norms and per-channel parameters (random init leaves BN an identity, timm's
    layer-scale at 1e-6 and the class token near 0, which would hide a wrong merge)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                for t, lo, hi in (("weight", 0.5, 1.5), ("bias", -0.5, 0.5)):
                    p = getattr(m, t, None)
                    if p is not None:
                        p.copy_(lo + (hi - lo) * torch.rand(p.shape, generator=g, dtype=p.dtype))
                if getattr(m, "running_mean", None) is not None:
                    n = m.running_mean.shape[0]
                    m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                    m.running_var.copy_(0.5 + torch.rand(n, generator=g))
        for grp in groups:
            for cp in grp.channel_params:
                t = getattr(get_module(model, cp.module), cp.tensor)
                t.copy_(0.5 + torch.rand(t.shape, generator=g, dtype=t.dtype))
    return model.eval()


def fold_twins(model: nn.Module, x: torch.Tensor, skew_ln: bool = False, skew_other=False):
    """Plant duplicates (half of each foldable group), fold to the distinct width, return the
    relative output error and the report. ``skew_*``: unequal multiplicities in the groups that
    pass a channel LayerNorm / in the others."""
    groups = netfold.find_groups(model, x)
    foldable = [g for g in groups if g.foldable and g.size >= 2 * g.align]
    distinct = {g.name: (g.size // g.align // 2) * g.align for g in foldable}
    src = {
        g.name: _twins(
            g.size,
            g.align,
            distinct[g.name],
            skew=skew_ln if g.approximations else skew_other,
        )
        for g in foldable
    }
    plant(model, groups, src)
    with torch.no_grad():
        ref = model(x)
    ratios = {g.name: 1.0 - distinct[g.name] / g.size for g in foldable}
    cfg = netfold.FoldConfig(ratio=0.0, ratios=ratios, repair="none", n_init=1, max_iter=5)
    rep = netfold.fold(model, cfg, example_inputs=x, groups=groups)
    with torch.no_grad():
        out = model(x)
    assert {g.name: g.width_after for g in rep.groups} == distinct
    return ((out - ref).abs().max() / ref.abs().max()).item(), rep, groups


def _perturb_first_copy(model: nn.Module, groups, name: str) -> None:
    """Negative control: nudge one producer row of a planted group (its twin now differs)."""
    g = next(g for g in groups if g.name == name)
    w = get_module(model, g.producers[0]).weight
    with torch.no_grad():
        w[-1].add_(0.5 * w[-1].abs().max())


# ---------------------------------------------------------------- hand-built timm constructs
class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass calling F.batch_norm, then an activation."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.act = nn.ReLU()

    def forward(self, x):
        training = self.training
        if training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training, 0.1, self.eps
        )
        return self.act(x)


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: LayerNorm over channels of an NCHW map, through a permute."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SE(nn.Module):
    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(c, r, 1)
        self.conv_expand = nn.Conv2d(r, c, 1)

    def forward(self, x):
        s = self.conv_expand(F.relu(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class ToyBlocks(nn.Module):
    """stem -> BNAct -> [dw conv, LayerNorm2d, 1x1 mlp, layer scale (C,1,1), residual] -> SE
    -> grouped conv -> head. Channel widths are even so planted twins tile every group."""

    def __init__(self, gamma_shape=(8, 1, 1)) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = BNAct(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = LayerNorm2d(8)
        self.fc1 = nn.Conv2d(8, 16, 1)
        self.fc2 = nn.Conv2d(16, 8, 1)
        self.gamma = nn.Parameter(torch.full(gamma_shape, 1e-2))
        self.gamma_is_3d = len(gamma_shape) == 3
        self.expand = nn.Conv2d(8, 12, 1)
        self.bn2 = BNAct(12)
        self.se = SE(12, 4)
        self.grouped = nn.Conv2d(12, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.bn(self.stem(x))
        y = self.fc2(F.gelu(self.fc1(self.norm(self.dw(h)))))
        h = h + y * (self.gamma if self.gamma_is_3d else self.gamma.reshape(1, -1, 1, 1))
        h = self.se(self.bn2(self.expand(h)))
        return self.head(self.grouped(h).mean((2, 3)))


def _toy(gamma_shape=(8, 1, 1)) -> ToyBlocks:
    torch.manual_seed(0)
    m = ToyBlocks(gamma_shape).to(F64)
    return randomise(m, netfold.find_groups(m, torch.randn(2, 3, 8, 8, dtype=F64)))


def test_toy_groups_name_every_construct():
    groups = {g.name: g for g in netfold.find_groups(_toy(), torch.randn(2, 3, 8, 8, dtype=F64))}
    stream = groups["stem+1"]  # stem and fc2 produce the residual stream
    assert stream.foldable and stream.producers == ["stem", "fc2"]
    assert {"bn", "dw", "norm"} <= set(stream.channel_ops)  # functional BN, depthwise, LN2d
    assert [(p.module, p.tensor, p.axis) for p in stream.channel_params] == [("", "gamma", 0)]
    assert stream.approximations and "norm" in stream.approximations[0]
    assert groups["fc1"].foldable and not groups["fc1"].approximations
    # squeeze-excite: the reduce conv's output is its own group; the expand conv produces into
    # the gated tensor's space
    assert groups["se.conv_reduce"].foldable
    gated = groups["expand+1"]
    assert gated.producers == ["expand", "se.conv_expand"] and "bn2" in gated.channel_ops
    assert gated.bn_of == {"expand": "bn2"} and gated.align == 2 and not gated.approximations


@pytest.mark.parametrize("gamma_shape", [(8, 1, 1), (8,)])
def test_toy_planted_twins_fold_exactly_and_a_nudged_twin_does_not(gamma_shape):
    x = torch.randn(4, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    err, rep, _ = fold_twins(_toy(gamma_shape), x)
    assert err < REL, err
    assert len(rep.groups) == 5  # stream, fc1, expand (+SE expand), SE reduce, grouped
    # negative control: the same fold after one twin moved is no longer exact
    model = _toy(gamma_shape)
    groups = netfold.find_groups(model, x)
    src = {
        g.name: _twins(g.size, g.align, g.size // 2)
        for g in groups
        if g.foldable and g.size >= 2 * g.align
    }
    plant(model, groups, src)
    _perturb_first_copy(model, groups, "stem+1")
    ref = model(x).detach()
    ratios = dict.fromkeys(src, 0.5)
    netfold.fold(
        model,
        netfold.FoldConfig(ratio=0.0, ratios=ratios, repair="none", n_init=1),
        example_inputs=x,
    )
    assert ((model(x) - ref).abs().max() / ref.abs().max()).item() > 1e-6


def test_channel_layernorm_is_exact_only_for_equal_cluster_sizes():
    """Unequal multiplicities through the LayerNorm are not exact (the recorded approximation);
    the same skew in groups that pass no LayerNorm still folds exactly."""
    x = torch.randn(4, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    err_ln, _, _ = fold_twins(_toy(), x, skew_ln=True)
    assert err_ln > 1e-4, err_ln  # 3 copies of one channel, 1 of another: LN stats move
    err_other, _, _ = fold_twins(_toy(), x, skew_other=True)
    assert err_other < REL, err_other


def test_parameter_read_elsewhere_freezes_its_group():
    class Reads(ToyBlocks):
        def forward(self, x):
            return super().forward(x) + self.gamma.sum()  # a read merging would not update

    torch.manual_seed(0)
    groups = {g.name: g for g in netfold.find_groups(Reads(), torch.randn(2, 3, 8, 8))}
    assert not groups["stem+1"].foldable
    assert any("gamma is also read by Tensor.sum" in r for r in groups["stem+1"].frozen_reasons)
    assert groups["fc1"].foldable


def test_unattributed_per_channel_constant_freezes():
    class Buf(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(self.a(x) * torch.sigmoid(self.a.bias).reshape(1, -1, 1, 1))

    groups = {g.name: g for g in netfold.find_groups(Buf(), torch.randn(2, 3, 4, 4))}
    assert not groups["a"].foldable  # sigmoid(bias) is no view of one parameter: never guessed


class Masked(nn.Module):
    """conv -> residual add of a masked branch -> head; ``full`` draws the mask per element."""

    def __init__(self, full: bool = False) -> None:
        super().__init__()
        self.full = full
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        y = self.b(h)
        if self.full:
            mask = torch.rand_like(y)
        else:  # timm's drop_path in training: one draw per sample, via x.new_empty()
            mask = y.new_empty((y.shape[0], 1, 1, 1)).bernoulli_(0.9).div_(0.9)
        return self.head((h + y * mask).mean((2, 3)))


def test_drop_path_mask_in_train_mode_keeps_the_stream_foldable():
    groups = {g.name: g for g in netfold.find_groups(Masked().train(), torch.randn(2, 3, 4, 4))}
    assert groups["a+1"].foldable, groups["a+1"].frozen_reasons
    # a full-width random mask is no per-sample draw: it is never guessed through
    groups = {g.name: g for g in netfold.find_groups(Masked(True), torch.randn(2, 3, 4, 4))}
    assert not groups["a+1"].foldable


def test_find_groups_in_train_mode_leaves_functional_bn_statistics_alone():
    model = _toy().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    netfold.find_groups(model, torch.randn(2, 3, 8, 8, dtype=F64))
    after = model.state_dict()
    assert model.training
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_permute_round_trip_and_token_layout_are_followed():
    class Tokens(nn.Module):
        """ViT-like: patches (N, C, H, W) -> (N, HW, C), class token, position embedding,
        Linear MLP over the last axis, the class token read by x[:, 0]."""

        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Conv2d(3, 6, 2, stride=2)
            self.cls = nn.Parameter(torch.randn(1, 1, 6))
            self.pos = nn.Parameter(torch.randn(1, 5, 6))
            self.norm = nn.LayerNorm(6)
            self.fc1 = nn.Linear(6, 10)
            self.fc2 = nn.Linear(10, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            t = self.proj(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
            t = t + self.fc2(F.gelu(self.fc1(self.norm(t))))
            return self.head(t[:, 0])

    torch.manual_seed(0)
    model = Tokens().to(F64).eval()
    x = torch.randn(3, 3, 4, 4, dtype=F64)
    groups = {g.name: g for g in netfold.find_groups(model, x)}
    stream = groups["proj+1"]
    assert stream.foldable and stream.channel_ops == ["norm"]
    assert sorted((p.tensor, p.axis) for p in stream.channel_params) == [("cls", 2), ("pos", 2)]
    assert [c.module for c in stream.consumers] == ["fc1", "head"]
    err, rep, _ = fold_twins(model, x)
    assert err < REL and model.pos.shape == (1, 5, 3) and model.cls.shape == (1, 1, 3)


@pytest.mark.parametrize(
    "in_shape, out_shape, axis",
    [
        ((2, 6, 3, 4), (2, 72), 1),  # flatten: 12 columns per channel
        ((2, 6, 3, 4), (2, 6, 12), 1),  # ViT patches: flatten(2)
        ((2, 6, 3, 4), (2, 18, 4), 1),  # channel merged with H
        ((2, 3, 4, 6), (6, 4, 6), 3),  # batch and H merged before channels-last C
        ((8, 6), (2, 4, 1, 6), 1),  # rows split into (batch, tokens)
        ((2, 5, 6), (2, 5, 2, 3), 2),  # split into heads: not followed
        ((2, 6, 4), (2, 4, 6), 1),  # a reshape that is no transpose: scrambles channels
        ((2, 6, 4), (12, 4), 1),  # channel merged under the batch
    ],
)
def test_reshape_axis_matches_real_reshapes(in_shape, out_shape, axis):
    """The tracer's reshape rule against torch itself: label every entry by its channel."""
    from netfold.graph.trace import _reshape_axis

    shape = [1] * len(in_shape)
    shape[axis] = in_shape[axis]
    ch = torch.arange(in_shape[axis]).reshape(shape).expand(in_shape).reshape(out_shape)
    got = _reshape_axis(in_shape, out_shape, axis)
    # ground truth: some output axis b with every channel in m contiguous columns
    truth = None
    for b in range(len(out_shape)):
        if out_shape[b] % in_shape[axis]:
            continue
        m = out_shape[b] // in_shape[axis]
        want = torch.arange(in_shape[axis]).repeat_interleave(m)
        view = [1] * len(out_shape)
        view[b] = out_shape[b]
        if torch.equal(ch, want.reshape(view).expand(out_shape)):
            truth = (b, m)
            break
    assert got == truth


@pytest.mark.parametrize(
    "idx, in_shape, out_shape, axis, new_axis",
    [
        ((slice(None), 0), (2, 5, 6), (2, 6), 2, 1),  # ViT class token
        ((Ellipsis, 0), (2, 6, 3, 4), (2, 6, 3), 1, 1),
        ((0,), (2, 6, 3, 4), (6, 3, 4), 1, 0),
        ((slice(None), None), (2, 6, 3), (2, 1, 6, 3), 1, 2),
        ((slice(None), slice(0, 3)), (2, 6, 3), (2, 3, 3), 1, None),  # a channel slice
        ((slice(None), slice(None), 1), (2, 6, 3), (2, 6), 1, 1),
    ],
)
def test_index_moves_or_refuses_the_channel_axis(idx, in_shape, out_shape, axis, new_axis):
    from netfold.graph.trace import _index, _Val

    assert tuple(torch.zeros(in_shape)[idx].shape) == out_shape  # the cases are real indexing
    got = _index(_Val(0, axis), idx, in_shape, out_shape)
    assert (got.axis if got is not None else None) == new_axis


# ---------------------------------------------------------------- the timm zoo
ZOO = [
    "resnet18",
    "convnext_atto",
    "mobilenetv3_small_050",
    "efficientnet_b0",
    "regnetx_002",
    "vit_tiny_patch16_224",
]
# Reasons a timm group may stay frozen: the model's ends and ViT's attention heads (qkv split
# into heads by a reshape, the attention output read back through scaled_dot_product_attention).
ALLOWED = ("model input", "model output", "splits the channel axis", "scaled_dot_product_attention")


def _timm_model(name: str) -> nn.Module:
    timm_ = pytest.importorskip("timm")
    torch.manual_seed(0)
    kw = {"img_size": 64} if name.startswith("vit") else {}
    return timm_.create_model(name, pretrained=False, **kw).eval()


@pytest.mark.parametrize("name", ZOO)
def test_timm_loses_35_percent_with_nothing_frozen_by_an_understood_op(name):
    model = _timm_model(name)
    x = torch.randn(2, 3, 64, 64)
    groups = netfold.find_groups(model, x)
    for g in groups:
        for r in g.frozen_reasons:
            assert any(a in r for a in ALLOWED), (g.name, r)
    cfg = netfold.FoldConfig(ratio=0.3, repair="none", n_init=1, max_iter=5)
    rep = netfold.fold(model, cfg, example_inputs=x, groups=groups)
    assert rep.sparsity >= 0.35, rep.sparsity
    assert rep.params_after == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert model(x).shape == (2, 1000)


@pytest.mark.parametrize("name", ZOO)
def test_timm_planted_twins_fold_exactly(name):
    x = torch.randn(2, 3, 64, 64, dtype=F64, generator=torch.Generator().manual_seed(1))
    model = _timm_model(name).to(F64)
    model = randomise(model, netfold.find_groups(model, x))
    err, rep, groups = fold_twins(model, x)
    assert err < REL, err
    assert rep.sparsity > 0.3
    ln = [g for g in groups if g.approximations]
    # only the LayerNorm models carry the approximation, and it is exact here because every
    # cluster holds two twins (equal sizes keep the LayerNorm's mean and variance)
    assert bool(ln) == (name in ("convnext_atto", "vit_tiny_patch16_224"))
    assert all(g.size % 2 == 0 and g.align == 1 for g in ln)


@pytest.mark.parametrize("name", ["convnext_atto", "efficientnet_b0"])
def test_timm_nudged_twin_is_not_exact(name):
    """Negative control for the check above: one twin moved by half its row's largest entry."""
    x = torch.randn(2, 3, 64, 64, dtype=F64, generator=torch.Generator().manual_seed(1))
    model = _timm_model(name).to(F64)
    groups = netfold.find_groups(model, x)
    model = randomise(model, groups)
    foldable = [g for g in groups if g.foldable and g.size >= 2 * g.align]
    src = {g.name: _twins(g.size, g.align, (g.size // g.align // 2) * g.align) for g in foldable}
    plant(model, groups, src)
    target = max(foldable, key=lambda g: g.size)
    _perturb_first_copy(model, groups, target.name)
    ref = model(x).detach()
    ratios = {g.name: 1.0 - (g.size // g.align // 2) * g.align / g.size for g in foldable}
    cfg = netfold.FoldConfig(ratio=0.0, ratios=ratios, repair="none", n_init=1, max_iter=5)
    netfold.fold(model, cfg, example_inputs=x, groups=groups)
    assert ((model(x) - ref).abs().max() / ref.abs().max()).item() > 1e-6


def test_timm_convnext_layernorm_skew_is_approximate():
    """ConvNeXt's stream passes channels-last LayerNorms: unequal twins there are not exact,
    the same skew in its MLP hidden groups (no LayerNorm) is."""
    x = torch.randn(2, 3, 64, 64, dtype=F64, generator=torch.Generator().manual_seed(1))
    model = _timm_model("convnext_atto").to(F64)
    model = randomise(model, netfold.find_groups(model, x))
    err, _, _ = fold_twins(copy.deepcopy(model), x, skew_ln=True)
    assert err > 1e-6, err
    err, _, _ = fold_twins(model, x, skew_other=True)
    assert err < REL, err


def test_timm_groups_follow_se_layer_scale_and_vit_stream():
    """Where each construct lands: SE expand conv in the gated space, SE reduce conv its own
    group; ConvNeXt's gamma and channels-last LayerNorms in the stream; ViT's class token and
    position embedding in its stream, MLP hidden channels foldable, heads frozen."""
    x = torch.randn(2, 3, 64, 64)
    by_prod = {}
    for name in ("efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224"):
        for g in netfold.find_groups(_timm_model(name), x):
            for p in g.producers:
                by_prod[(name, p)] = g
    se = by_prod[("efficientnet_b0", "blocks.1.0.se.conv_expand")]
    assert se.foldable and se.producers == ["blocks.1.0.conv_pw", "blocks.1.0.se.conv_expand"]
    assert {"blocks.1.0.bn1", "blocks.1.0.conv_dw", "blocks.1.0.bn2"} <= set(se.channel_ops)
    assert se.bn_of == {"blocks.1.0.conv_pw": "blocks.1.0.bn1"}  # BatchNormAct2d, functional
    red = by_prod[("efficientnet_b0", "blocks.1.0.se.conv_reduce")]
    assert red.foldable and red.producers == ["blocks.1.0.se.conv_reduce"]
    cnx = by_prod[("convnext_atto", "stages.1.blocks.0.mlp.fc2")]
    assert cnx.foldable and "stages.1.blocks.0.norm" in cnx.channel_ops
    assert {p.qualname for p in cnx.channel_params} == {
        "stages.1.blocks.0.gamma",
        "stages.1.blocks.1.gamma",
    }
    # the two blocks' channels-last LayerNorms and the next stage's downsample LayerNorm
    assert len(cnx.approximations) == 3
    vit = by_prod[("vit_tiny_patch16_224", "blocks.0.mlp.fc2")]
    assert vit.foldable and len(vit.producers) == 25 and len(vit.approximations) == 25
    assert {p.qualname for p in vit.channel_params} == {"cls_token", "pos_embed"}
    assert by_prod[("vit_tiny_patch16_224", "blocks.0.mlp.fc1")].foldable
    qkv = by_prod[("vit_tiny_patch16_224", "blocks.0.attn.qkv")]
    assert not qkv.foldable and "attention heads" in qkv.frozen_reasons[0]


def test_report_warns_when_a_folded_group_is_approximate():
    x = torch.randn(2, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(2))
    rep = netfold.fold(
        _toy(), netfold.FoldConfig(ratio=0.5, repair="none", n_init=1), example_inputs=x
    )
    approx = [w for w in rep.warnings if "folds approximately" in w]
    assert len(approx) == 1 and "stem+1" in approx[0] and "norm" in approx[0]
    # a group that passes no LayerNorm folds without such a warning; nothing folded, none
    rep0 = netfold.fold(_toy(), netfold.FoldConfig(ratio=0.0, repair="none"), example_inputs=x)
    assert not [w for w in rep0.warnings if "folds approximately" in w]
