"""Bad input gets one clear error naming the argument, before the model changes; encoders fold
through ``netfold.fold``.

Run: PYTHONPATH=$PWD/src .venv/bin/pytest -q tests/test_errors.py
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn

import netfold
from netfold import FoldConfig
from netfold.config import DEFAULT_RATIO, LLMConfig
from netfold.eval.cost import count_params
from netfold.families.encoders import find_attention
from netfold.families.llama import is_hf_decoder
from netfold.io import build

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------- helpers
def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return build("netfold:small_cnn", {"width": 0.25}).eval()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        # untouched tensors, not recomputed ones: equality is exact on any CPU
        assert after[k].shape == v.shape and torch.equal(after[k], v), k


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


X = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------- config
def test_ratio_with_target_sparsity_is_refused_and_defaults_round_trip() -> None:
    with pytest.raises(ValueError, match="either ratio .* or target_sparsity"):
        FoldConfig(ratio=0.3, target_sparsity=0.2)
    # explicitly giving the default value is still two budgets
    with pytest.raises(ValueError, match="not both"):
        FoldConfig(ratio=DEFAULT_RATIO, target_sparsity=0.2)
    c = FoldConfig()
    assert c.ratio == DEFAULT_RATIO == 0.5
    assert FoldConfig.from_json(c.to_json()) == c
    t = FoldConfig(target_sparsity=0.2)
    assert t.ratio is None and t.to_dict()["ratio"] is None
    assert FoldConfig.from_json(t.to_json()) == t
    # the placeholder a target-solved config hands to cost allocation for unpinned groups
    assert t.ratio_for("g", ["m"]) == DEFAULT_RATIO
    assert t.ratio_for("g", ["m"], default=0.1) == 0.1
    with pytest.raises(TypeError, match="n_init must be an int"):
        FoldConfig(n_init=2.5)
    with pytest.raises(TypeError, match="from_dict needs a dict"):
        FoldConfig.from_dict([("ratio", 0.5)])


# ------------------------------------------------------------------------------- model
def test_meta_device_model_is_refused() -> None:
    with torch.device("meta"):
        m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(ValueError, match="not materialised") as e:
        netfold.fold(m, FoldConfig())
    assert "'0.weight'" in _one_line_error(e)
    # one parameter on meta is enough
    m = _cnn()
    m.fc.bias = nn.Parameter(torch.empty(10, device="meta"))
    with pytest.raises(ValueError, match="'fc.bias' is on the meta device"):
        netfold.fold(m, FoldConfig())


# ------------------------------------------------------------------------------- data
@pytest.mark.parametrize(
    ("data", "match"),
    [
        (torch.empty(0, 1, 16, 16), "data is empty"),
        ([], "data"),
        (X.clone().index_fill_(0, torch.tensor([3]), float("nan")), "data contains NaN or inf"),
        (X.clone().index_fill_(0, torch.tensor([5]), float("inf")), "data contains NaN or inf"),
        (X.double(), r"data must have dtype torch.float32 .* got torch.float64"),
        ((X * 10).long(), r"data must have dtype torch.float32 .* got torch.int64"),
        (torch.randn(8, 3, 16, 16), r"data must have shape \(N, 1, 16, 16\) like example_inputs"),
    ],
    ids=["empty", "empty-list", "nan", "inf", "float64", "int64", "shape"],
)
def test_bad_calibration_data_names_data_not_weights(data, match) -> None:
    m = _cnn()
    before = _snapshot(m)
    with pytest.raises((ValueError, TypeError), match=match) as e:
        netfold.fold(m, FoldConfig(repair="data"), example_inputs=X[:2], data=data)
    msg = _one_line_error(e)
    assert "weight" not in msg and "tensor 'conv" not in msg  # not blamed on the model
    _assert_unchanged(m, before)


def test_data_shape_checked_against_the_model_without_example_inputs() -> None:
    m = _cnn()
    m.train()  # a trial forward must not update BatchNorm statistics
    before = _snapshot(m)
    with pytest.raises(ValueError, match=r"data of shape \(8, 3, 16, 16\) does not fit") as e:
        netfold.fold(m, FoldConfig(repair="data"), data=torch.randn(8, 3, 16, 16))
    assert "(N, 1, H, W)" in _one_line_error(e)
    _assert_unchanged(m, before)
    assert m.training
    # negative control: data of the right shape folds, and takes the place of example_inputs
    rep = netfold.fold(m, FoldConfig(repair="data", n_init=1), data=X)
    assert rep.params_after < rep.params_before


@pytest.mark.parametrize("repair", ["none", "ar", "dir"])
def test_data_a_repair_would_ignore_is_refused(repair) -> None:
    m = _cnn()
    before = _snapshot(m)
    with pytest.raises(ValueError, match=f"data= is only used by repair='data'; repair='{repair}'"):
        netfold.fold(m, FoldConfig(repair=repair), data=X)
    _assert_unchanged(m, before)


# ------------------------------------------------------------------------------- patterns
@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (FoldConfig(ratios={"conv9*": 0.2}), "ratios pattern 'conv9\\*' matches no foldable group"),
        (FoldConfig(skip=("layer4.*",)), "skip pattern 'layer4.\\*' matches no group"),
        # the output layer's group exists but can never fold: a ratio for it would be ignored
        (FoldConfig(ratios={"fc": 0.2}), "ratios pattern 'fc' matches no foldable group"),
    ],
)
def test_patterns_that_match_nothing_are_refused(cfg, match) -> None:
    m = _cnn()
    before = _snapshot(m)
    with pytest.raises(ValueError, match=match) as e:
        netfold.fold(m, cfg, example_inputs=X[:2])
    assert "groups: conv1, conv2+1" in _one_line_error(e)
    _assert_unchanged(m, before)


def test_patterns_that_match_apply() -> None:
    # negative control of the above: real names are accepted and do what they say
    m = _cnn()
    cfg = FoldConfig(ratio=0.0, ratios={"conv3": 0.5}, skip=("fc",))
    rep = netfold.fold(m, cfg, example_inputs=X[:2])
    assert {g.name: g.width_after for g in rep.groups} == {
        "conv1": 8,
        "conv2+1": 16,
        "block.conv1": 16,
        "conv3": 16,
    }


# ------------------------------------------------------------------------------- report
def test_cnn_report_fields() -> None:
    m = _cnn()
    n0 = count_params(m)
    rep = netfold.fold(m, FoldConfig(ratio=0.5), example_inputs=X[:2])
    assert rep.operation == "fold"
    assert rep.params_before == n0 == 10_946
    assert rep.params_after == count_params(m) == 2_886
    assert rep.sparsity == pytest.approx(1 - 2_886 / 10_946, abs=1e-12)
    widths = {g.name: (g.width_before, g.width_after) for g in rep.groups}
    assert widths == {
        "conv1": (8, 4),
        "conv2+1": (16, 8),
        "block.conv1": (16, 8),
        "conv3": (32, 16),
    }
    # the widths are the model's: each group's producers now have that many output channels
    assert m.conv1.out_channels == 4 and m.block.conv1.out_channels == 8
    assert m.conv3.out_channels == 16 and m.fc.in_features == 16
    assert rep.skipped == [("fc", "model output")]
    assert all(len(g.labels) == g.width_before for g in rep.groups)
    assert all(set(g.labels) == set(range(g.width_after)) for g in rep.groups)
    assert rep.flops_after < rep.flops_before
    d = rep.to_dict()
    assert d["sparsity"] == rep.sparsity and d["skipped"] == [["fc", "model output"]]
    assert d["config"]["ratio"] == 0.5 and d["config"]["target_sparsity"] is None


# ------------------------------------------------------------------------------- encoders
def _hf(kind: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    common = dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    if kind == "bert":
        m = transformers.BertModel(transformers.BertConfig(**common))
    elif kind == "roberta":
        m = transformers.RobertaModel(transformers.RobertaConfig(**common))
    elif kind == "xlm-roberta":
        m = transformers.XLMRobertaModel(transformers.XLMRobertaConfig(**common))
    elif kind == "distilbert":
        cfg = transformers.DistilBertConfig(
            vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=40
        )
        m = transformers.DistilBertModel(cfg)
    else:
        cfg = transformers.ViTConfig(
            image_size=16, patch_size=4, num_channels=1, num_labels=3, **common
        )
        m = transformers.ViTForImageClassification(cfg)
    return m.to(dtype).eval()


IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))


def _run(m: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        if m.config.model_type == "vit":
            return m(pixel_values=X[:2].to(m.dtype)).logits
        return m(input_ids=IDS).last_hidden_state


ENCODERS = ["bert", "roberta", "xlm-roberta", "distilbert", "vit"]
# (params before, params after ratio 0.5): MLP 64 -> 32 channels, attention 4 -> 2 heads
ENCODER_PARAMS = {
    "bert": (22_752, 14_400),
    "roberta": (22_752, 14_400),
    "xlm-roberta": (22_752, 14_400),
    "distilbert": (21_632, 13_280),
    "vit": (18_371, 10_019),
}


@pytest.mark.parametrize("kind", ENCODERS)
def test_encoders_fold_through_netfold_fold(kind) -> None:
    m = _hf(kind)
    ref = _run(m)
    before = _snapshot(m)
    rep = netfold.fold(m, FoldConfig(ratio=0.0))
    _assert_unchanged(m, before)  # ratio 0: bit-identical tensors ...
    assert torch.equal(_run(m), ref)  # ... and the same computation, in the same process
    assert rep.params_after == rep.params_before == ENCODER_PARAMS[kind][0]

    rep = netfold.fold(m, FoldConfig(ratio=0.5))
    assert (rep.params_before, rep.params_after) == ENCODER_PARAMS[kind]
    assert count_params(m) == ENCODER_PARAMS[kind][1]
    heads = [g for g in rep.groups if g.width_before == 32]
    mlp = [g for g in rep.groups if g.width_before == 64]
    assert len(heads) == 2 and all(g.width_after == 16 for g in heads)  # 4 -> 2 heads of 8
    assert len(mlp) == 2 and all(g.width_after == 32 for g in mlp)
    out = _run(m)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, ref, atol=1e-3)  # it really folded
    # every head-count attribute the attention modules carry agrees with the folded tensors
    for a in find_attention(m):
        attn = m.get_submodule(a.attn)
        counts = [getattr(attn, n, None) for n in ("num_attention_heads", "num_heads", "n_heads")]
        assert [c for c in counts if c is not None] == [2], (a.attn, counts)


@pytest.mark.parametrize("kind", ["distilbert", "vit"])
def test_folded_encoder_save_reload(kind, tmp_path) -> None:
    m = _hf(kind)
    netfold.fold(m, FoldConfig(ratio=0.5))
    netfold.save(m, tmp_path / "m")
    r = netfold.load(tmp_path / "m")
    assert count_params(r) == ENCODER_PARAMS[kind][1]
    torch.testing.assert_close(_run(r), _run(m), atol=1e-5, rtol=1e-5)


def test_is_hf_decoder_is_true_for_llama_family_only() -> None:
    assert is_hf_decoder(_llama())
    assert not is_hf_decoder(_hf("bert")) and not is_hf_decoder(_hf("vit"))
    assert not is_hf_decoder(_cnn())


def test_encoder_planted_duplicate_heads_fold_exactly_through_netfold_fold() -> None:
    m = _hf("bert", torch.float64)
    with torch.no_grad():
        for layer in m.encoder.layer:
            for lin in (layer.attention.self.query, layer.attention.self.key):
                lin.weight[8:16] = lin.weight[0:8]
                lin.bias[8:16] = lin.bias[0:8]
            v = layer.attention.self.value
            v.weight[8:16], v.bias[8:16] = v.weight[0:8], v.bias[0:8]
    ref = _run(m)
    wrong = copy.deepcopy(m)
    cfg = FoldConfig(ratio=0.25, skip=("*intermediate.dense",))  # heads only: 4 -> 3
    netfold.fold(m, cfg)
    assert m.encoder.layer[0].attention.self.query.out_features == 24
    torch.testing.assert_close(_run(m), ref, atol=1e-10, rtol=0)
    # negative control: one more head merged (two different heads averaged) is not exact
    netfold.fold(wrong, FoldConfig(ratio=0.5, skip=("*intermediate.dense",)))
    assert (_run(wrong) - ref).abs().max() > 1e-4


def test_unsupported_hf_model_names_its_type_and_the_supported_ones() -> None:
    cfg = transformers.GPTNeoXConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    m = transformers.GPTNeoXForCausalLM(cfg).eval()
    before = _snapshot(m)
    with pytest.raises(ValueError, match="model_type='gpt_neox'") as e:
        netfold.fold(m, FoldConfig())
    msg = _one_line_error(e)
    assert (
        "GPTNeoXForCausalLM" in msg
        and "'gemma3_text'" in msg
        and "'bert'" in msg
        and "'llama'" in msg
        and "'vit'" in msg
    )
    _assert_unchanged(m, before)


def test_encoder_refuses_data_and_unmatched_patterns() -> None:
    m = _hf("bert")
    before = _snapshot(m)
    with pytest.raises(ValueError, match="data= is not used when folding encoders"):
        netfold.fold(m, FoldConfig(), data=IDS)
    with pytest.raises(ValueError, match="skip pattern 'model.layers.\\*' matches no group"):
        netfold.fold(m, FoldConfig(skip=("model.layers.*",)))
    with pytest.raises(ValueError, match="widths= is supported for decoder LLMs only"):
        netfold.fold(m, FoldConfig(), widths={"encoder.layer.0.attention.self": 2})
    _assert_unchanged(m, before)


# ------------------------------------------------------------------------------- LLM data
def _llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (torch.full((2, 8), 64), r"data holds token ids in \[64, 64\], outside the vocabulary"),
        (torch.full((2, 8), -1), r"data holds token ids in \[-1, -1\]"),
        (torch.zeros(2, 8), "data must hold integer token ids, got dtype torch.float32"),
        (torch.zeros(16, dtype=torch.long), r"data must be token ids of shape \(n, seqlen\)"),
        (torch.zeros(0, 8, dtype=torch.long), "data is empty"),
        ([torch.zeros(1, 8, dtype=torch.long), torch.full((1, 8), 99)], r"data\[1\] holds token"),
        ([], "data must be token ids"),
    ],
    ids=["over-vocab", "negative", "float", "1d", "empty", "list-item", "empty-list"],
)
def test_llm_token_ids_are_checked(data, match) -> None:
    m = _llama()
    before = _snapshot(m)
    with pytest.raises(ValueError, match=match) as e:
        netfold.fold(m, FoldConfig(ratio=0.5, repair="data"), data=data)
    _one_line_error(e)
    _assert_unchanged(m, before)


def test_llm_data_refused_only_where_ignored() -> None:
    m = _llama()
    before = _snapshot(m)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    weights = LLMConfig(features="weights")
    with pytest.raises(ValueError, match="data= would be ignored"):
        netfold.fold(m, FoldConfig(ratio=0.5, repair="ar", llm=weights), data=ids)
    with pytest.raises(ValueError, match="data= would be ignored"):
        netfold.fold(m, FoldConfig(ratio=0.5, method="magnitude-l1"), data=ids)
    with pytest.raises(ValueError, match="ratios pattern 'layers.9.\\*' matches no foldable"):
        netfold.fold(m, FoldConfig(ratios={"layers.9.*": 0.1}))
    _assert_unchanged(m, before)
    # negative control: with activation features ('auto') the ids are read, so they are welcome
    rep = netfold.fold(m, FoldConfig(ratio=0.5, llm=LLMConfig(fold_attention=False)), data=ids)
    assert rep.extra["features"] == "activations"
