"""The repair registry: a registered repair is accepted by FoldConfig, validated by what it
declares it needs, and run by the pipeline (prepare on the original model, apply after the
write under the snapshot).

Run: python -m pytest tests/test_repairs.py -q
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import netfold
from netfold import FoldConfig, config
from netfold.fold import repairs
from netfold.fold.repairs import Repair, get_repair, register


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double()


@pytest.fixture
def registered():
    """Register repairs for one test and remove them afterwards."""
    names: list[str] = []

    def add(r: Repair) -> Repair:
        names.append(r.name)
        return register(r)

    yield add
    for n in names:
        repairs._REGISTRY.pop(n, None)
        config.REPAIRS = tuple(x for x in config.REPAIRS if x != n)


def test_builtins_declare_what_they_need() -> None:
    assert {n: get_repair(n).needs for n in ("none", "ar", "dir", "data")} == {
        "none": "nothing",
        "ar": "nothing",
        "dir": "synthetic",
        "data": "data",
    }
    assert get_repair("ar").features == "ar" and get_repair("none").features == "naive"
    with pytest.raises(ValueError, match="unknown repair 'nope'"):
        get_repair("nope")


def test_a_registered_repair_is_accepted_and_run_in_order(registered) -> None:
    with pytest.raises(ValueError, match="unknown repair"):
        FoldConfig(repair="halve-bias")
    calls: list[tuple[str, float]] = []

    def prepare(ctx: repairs.RepairContext) -> None:
        # on the original model: the first Linear still has 16 rows
        calls.append(("prepare", float(ctx.model[0].weight.shape[0])))
        ctx.extra["seen"] = sorted(ctx.state)

    def apply(ctx: repairs.RepairContext) -> None:
        calls.append(("apply", float(ctx.model[0].weight.shape[0])))
        with torch.no_grad():
            ctx.model[2].bias.mul_(0.5)

    register_ = registered(Repair("halve-bias", "nothing", "test", prepare=prepare, apply=apply))
    assert "halve-bias" in config.REPAIRS and get_repair("halve-bias") is register_
    model = _mlp()
    bias = model[2].bias.detach().clone()
    x = torch.randn(4, 6, dtype=torch.float64)
    report = netfold.fold(model, FoldConfig(ratio=0.5, repair="halve-bias"), example_inputs=x)
    assert calls == [("prepare", 16.0), ("apply", 8.0)]
    assert report.groups[0].width_after == 8
    torch.testing.assert_close(model[2].bias, 0.5 * bias, atol=1e-12, rtol=0)


def test_a_failing_apply_rolls_back(registered) -> None:
    def apply(ctx: repairs.RepairContext) -> None:
        raise RuntimeError("simulated repair failure")

    registered(Repair("boom", "nothing", "test", apply=apply))
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="simulated"):
        netfold.fold(
            model,
            FoldConfig(ratio=0.5, repair="boom"),
            example_inputs=torch.zeros(2, 6, dtype=torch.float64),
        )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model[0].out_features == 16


def test_needs_are_checked_before_the_model_changes(registered) -> None:
    called = []
    registered(Repair("calib", "data", "test", apply=lambda ctx: called.append(1)))
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="repair='calib' needs calibration inputs"):
        netfold.fold(
            model, FoldConfig(repair="calib"), example_inputs=torch.zeros(2, 6, dtype=torch.float64)
        )
    with pytest.raises(ValueError, match="data= is only used by repair='data'"):
        netfold.fold(model, FoldConfig(repair="none"), data=torch.zeros(4, 6, dtype=torch.float64))
    assert not called
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_traced_only_repair_is_refused_for_hf_families(registered) -> None:
    transformers = pytest.importorskip("transformers")
    registered(Repair("cnn-only", "nothing", "test", families=False))
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="repair='cnn-only' supports traced CNNs"):
        netfold.fold(model, FoldConfig(repair="cnn-only"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_register_refuses_unknown_needs() -> None:
    with pytest.raises(ValueError, match="needs must be one of"):
        register(Repair("bad", "everything", "test"))
    assert "bad" not in config.REPAIRS
