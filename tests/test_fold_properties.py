"""Property test: random small float64 nets built from a vocabulary of op kinds fold correctly.

For every generated model: ratio 0 is bit-identical; planted duplicate channels in every
foldable group fold exactly (frozen groups are reported with a reason and left alone); the
folded model runs with the parameter count and widths its Report states; a failure injected
after the first write leaves the model bit-identical.

Run: python -m pytest tests/test_fold_properties.py -q
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_trace import _randomise_bn, assert_same_state, fold_planted, module_state
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.shufflenetv2 import channel_shuffle

import netfold
import netfold.api as api
from netfold.fold import run as fold_run
from netfold.graph.surgery import get_module

HW = 4  # every block keeps the 4x4 spatial size


class Blk(nn.Module):
    """One block: submodules plus a forward function ``fn(self, x)`` (traced through by fx)."""

    def __init__(self, fn, **mods: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        for k, m in mods.items():
            self.add_module(k, m)

    def forward(self, x):
        return self.fn(self, x)


def _seq_op(kind: str):
    """LSTM / GRU / MHA over the H*W positions, added back to the map."""

    def fn(s, x):
        h = x.flatten(2).transpose(1, 2)
        y = s.m(h, h, h)[0] if kind == "mha" else s.m(h)[0]
        return x + y.transpose(1, 2).reshape(x.shape)

    return fn


def block(kind: str, c: int, o: int) -> tuple[nn.Module, int]:
    """A block of ``kind`` reading ``c`` channels; returns it and its output width (``o`` or c)."""
    conv = nn.Conv2d
    if kind == "conv1x1":
        return Blk(lambda s, x: s.a(x), a=conv(c, o, 1)), o
    if kind == "conv3x3":
        return Blk(lambda s, x: s.a(x), a=conv(c, o, 3, padding=1)), o
    if kind == "grouped":
        return Blk(lambda s, x: s.a(x), a=conv(c, o, 3, padding=1, groups=2)), o
    if kind == "depthwise":
        return Blk(lambda s, x: s.a(x), a=conv(c, c, 3, padding=1, groups=c)), c
    unary = {
        "bn": nn.BatchNorm2d(c),
        "relu": nn.ReLU(),
        "gelu": nn.GELU(),
        "silu": nn.SiLU(),
        "hardswish": nn.Hardswish(),
        "tanh": nn.Tanh(),
        "maxpool": nn.MaxPool2d(3, 1, 1),
        "dropout": nn.Dropout(0.2),
        "prelu": nn.PReLU(c),
        "groupnorm": nn.GroupNorm(2, c),
        "tv_se": torchvision.ops.SqueezeExcitation(c, 2),
        "basic": BasicBlock(c, c),
        "inverted": InvertedResidual(c, c, 1, 2),
    }
    if kind in unary:
        return unary[kind], c
    if kind == "bottleneck":
        down = nn.Sequential(conv(c, 8, 1, bias=False), nn.BatchNorm2d(8))
        return Bottleneck(c, 2, downsample=down), 8
    fns = {
        "avgpool": lambda s, x: F.avg_pool2d(x, 3, 1, 1),
        "residual": lambda s, x: x + s.b(torch.relu(s.a(x))),
        "gate_mul": lambda s, x: x * torch.sigmoid(s.g(x)),
        "se": lambda s, x: x * torch.sigmoid(s.f2(torch.relu(s.f1(x.mean((2, 3), keepdim=True))))),
        "shuffle": lambda s, x: channel_shuffle(x, 2),
        "fire": lambda s, x: torch.cat([torch.relu(s.e1(x)), torch.relu(s.e3(x))], 1),
        "cat_self": lambda s, x: s.a(torch.cat([x, x], 1)),
        "chunk": lambda s, x: torch.cat(x.chunk(2, 1)[::-1], 1),
        "split": lambda s, x: torch.cat(torch.split(x, [1, c - 1], 1)[::-1], 1),
        "topk": lambda s, x: x * torch.topk(x, 2, dim=1).values.sum(1, keepdim=True),
        "max1": lambda s, x: x * x.max(dim=1, keepdim=True)[0],
        "sort": lambda s, x: x + torch.sort(x, dim=1)[0],
        "argmax": lambda s, x: x * torch.argmax(x, 1, keepdim=True).to(x.dtype),
        "permute": lambda s, x: x.permute(0, 2, 3, 1).permute(0, 3, 1, 2),
        "softmax": lambda s, x: torch.softmax(x, 1),
        "layer_norm": lambda s, x: F.layer_norm(x, (c, HW, HW)),
        "lstm": _seq_op("lstm"),
        "gru": _seq_op("gru"),
        "mha": _seq_op("mha"),
    }
    mods: dict[str, nn.Module] = {}
    out = c
    if kind == "residual":
        mods = {"a": conv(c, o, 1), "b": conv(o, c, 3, padding=1)}
    elif kind == "gate_mul":
        mods = {"g": conv(c, c, 1)}
    elif kind == "se":
        mods = {"f1": conv(c, 2, 1), "f2": conv(2, c, 1)}
    elif kind == "fire":
        mods = {"e1": conv(c, o // 2, 1), "e3": conv(c, o - o // 2, 3, padding=1)}
        out = o
    elif kind == "cat_self":
        mods, out = {"a": conv(2 * c, o, 1)}, o
    elif kind == "lstm":
        mods = {"m": nn.LSTM(c, c, batch_first=True)}
    elif kind == "gru":
        mods = {"m": nn.GRU(c, c, batch_first=True)}
    elif kind == "mha":
        mods = {"m": nn.MultiheadAttention(c, 2, batch_first=True)}
    return Blk(fns[kind], **mods), out


KINDS = [
    "conv1x1", "conv3x3", "grouped", "depthwise", "bn", "relu", "gelu", "silu", "hardswish",
    "tanh", "maxpool", "avgpool", "dropout", "prelu", "groupnorm", "tv_se", "basic",
    "inverted", "bottleneck", "residual", "gate_mul", "se", "shuffle", "fire", "cat_self",
    "chunk", "split", "topk", "max1", "sort", "argmax", "permute", "softmax", "layer_norm",
    "lstm", "gru", "mha",
]  # fmt: skip


class Net(nn.Module):
    def __init__(self, spec: list[tuple[str, int]], head: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        blocks, c = [], 8
        for kind, o in spec:
            b, c = block(kind, c, o)
            blocks.append(b)
        self.blocks = nn.Sequential(*blocks)
        self.head_kind = head
        self.head = nn.Linear(c if head == "gap" else c * HW * HW, 3)

    def forward(self, x):
        h = self.blocks(torch.relu(self.stem(x)))
        if self.head_kind == "gap":
            h = F.adaptive_avg_pool2d(h, 1)
        return self.head(torch.flatten(h, 1))


def test_vocabulary_covers_thirty_kinds_and_each_builds():
    assert len(KINDS) >= 30
    x = torch.randn(2, 3, HW, HW)
    for kind in KINDS:
        net = Net([(kind, 6)], "gap").eval()
        assert net(x).shape == (2, 3), kind
        netfold.find_groups(net, x)


def _make(spec, head, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise_bn(Net(spec, head)).to(torch.float64).eval()


SPEC = st.lists(st.tuples(st.sampled_from(KINDS), st.sampled_from([4, 6, 8])), max_size=4)


@settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(spec=SPEC, head=st.sampled_from(["gap", "flat"]), seed=st.integers(0, 3))
def test_random_nets_fold_correctly(spec, head, seed):
    check_net(spec, head, seed)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_folds_correctly_between_foldable_layers(kind):
    """Each op kind at least once, between a foldable stem and a residual conv block."""
    check_net([("conv1x1", 6), (kind, 4), ("residual", 4)], "flat", 0)


def check_net(spec: list[tuple[str, int]], head: str, seed: int) -> None:
    """All four properties of the module docstring on ``Net(spec, head)``."""
    x = torch.randn(4, 3, HW, HW, generator=torch.Generator().manual_seed(seed)).double()

    # ratio 0 is the identity, bit for bit
    model = _make(spec, head, seed)
    before, ref = module_state(model), model(x).detach()
    netfold.fold(model, netfold.FoldConfig(ratio=0.0, n_init=1), example_inputs=x)
    assert_same_state(module_state(model), before)
    assert torch.equal(model(x), ref)

    # planted duplicates fold exactly; frozen groups carry a reason
    model = _make(spec, head, seed)
    original = copy.deepcopy(model)
    groups = netfold.find_groups(model, x)
    assert all(g.frozen_reasons for g in groups if not g.foldable and g.producers)
    err, rep, distinct = fold_planted(model, x, seed=seed)
    scale = 1.0 + float(model(x).detach().abs().max())
    assert err <= 1e-9 * scale, (spec, head, err)

    # the folded model has the widths and parameter count the Report states
    assert rep.params_after == sum(p.numel() for p in model.parameters())
    widths = {g.name: g.width_after for g in rep.groups if g.width_after < g.width_before}
    assert widths == distinct
    assert rep.params_after == api.params_after(original, groups, widths)
    by_name = {g.name: g for g in groups}
    for name, k in widths.items():
        for p in by_name[name].producers:
            assert get_module(model, p).weight.shape[0] == k

    # a failure right after the first write leaves the model bit-identical
    model = _make(spec, head, seed)
    before, ref = module_state(model), model(x).detach()
    real = fold_run.apply_tensors

    def write_then_fail(*a, **k):
        real(*a, **k)
        raise RuntimeError("simulated failure after the write")

    with mock.patch.object(fold_run, "apply_tensors", write_then_fail):
        try:
            netfold.fold(model, netfold.FoldConfig(ratio=0.5, n_init=1), example_inputs=x)
            assert not any(g.foldable for g in groups)  # nothing written, nothing to fail
        except RuntimeError as e:
            assert "simulated" in str(e)
    assert_same_state(module_state(model), before)
    assert torch.equal(model(x), ref)
