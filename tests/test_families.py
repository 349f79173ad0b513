"""Every decoder family of the table on a tiny random float64 config.

For each family: ratio 0 is the identity (bit-exact); planted duplicate MLP channels (and
heads, where the family folds them) fold exactly, while the same fold without planting does
not (negative control); config and module attributes agree with the tensors; a save reloads
with identical outputs, uniform widths and per-layer widths alike.

Run: python -m pytest tests/test_families.py -q
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import netfold  # noqa: E402
from netfold import FoldConfig  # noqa: E402
from netfold.config import LLMConfig  # noqa: E402
from netfold.families.decoders import family_of, layer_widths, layers_of  # noqa: E402
from netfold.families.table import DECODERS, decoder_family  # noqa: E402

T = transformers
VOCAB = 64


def _llama_like(cfg_cls, model_cls, **extra):
    def build():
        cfg = cfg_cls(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **extra,
        )
        return model_cls(cfg)

    return build


BUILDERS = {
    "llama": _llama_like(T.LlamaConfig, T.LlamaForCausalLM, tie_word_embeddings=True),
    "mistral": _llama_like(T.MistralConfig, T.MistralForCausalLM),
    "qwen2": _llama_like(T.Qwen2Config, T.Qwen2ForCausalLM),
    "qwen3": _llama_like(T.Qwen3Config, T.Qwen3ForCausalLM),
    "gemma": _llama_like(T.GemmaConfig, T.GemmaForCausalLM),
    "gemma2": _llama_like(T.Gemma2Config, T.Gemma2ForCausalLM, sliding_window=4),
    "gemma3_text": _llama_like(T.Gemma3TextConfig, T.Gemma3ForCausalLM, sliding_window=4),
    "phi3": _llama_like(T.Phi3Config, T.Phi3ForCausalLM),
    "gpt2": lambda: T.GPT2LMHeadModel(
        T.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_inner=48,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        )
    ),
    "opt": lambda: T.OPTForCausalLM(
        T.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ),
}
TYPES = sorted(BUILDERS)
X = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def test_every_table_row_has_a_test() -> None:
    assert {t for f in DECODERS for t in f.model_types} == set(BUILDERS)


def tiny(mt: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # buffers (Gemma's embedding scale) in float64 too
    try:
        model = BUILDERS[mt]().eval()
    finally:
        torch.set_default_dtype(old)
    assert model.config.model_type == mt
    with torch.no_grad():  # random init is near zero: make every part matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=X).logits


def _lin(m: torch.nn.Module, transposed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias) as views of the module's own storage."""
    w = m.weight.data
    b = None if getattr(m, "bias", None) is None else m.bias.data
    return (w.t() if transposed else w), b


def plant(model: torch.nn.Module, heads: bool) -> None:
    """MLP channels I/2.. copy 0.. (producer rows, biases and down columns: the merged
    channel must carry the sum of both outputs, so exactness needs the summed column). With
    ``heads``: within each KV group the second query head copies the first (GQA); for MHA
    families (one query head per KV head) KV heads 1 and 3 copy 0 and 2 (q, k, v rows)."""
    fam = family_of(model)
    a, p, t = fam.attention, fam.mlp, fam.transposed
    for layer, w in zip(layers_of(model, fam), layer_widths(model)):
        n = w["intermediate_size"]
        h = n // 2
        rows = []
        if p.gate_up:
            W, _ = _lin(layer.get_submodule(p.gate_up), t)
            rows = [(W[:n], None), (W[n:], None)]
        else:
            rows = [_lin(layer.get_submodule(x), t) for x in (p.gate, p.up) if x]
        D, _ = _lin(layer.get_submodule(p.down), t)
        with torch.no_grad():
            for W, b in rows:
                W[h:] = W[:h]
                if b is not None:
                    b[h:] = b[:h]
            D[:, h:] = D[:, :h]
        if not heads:
            continue
        hd = int(getattr(layer.get_submodule(a.module), a.head_dim_attr))
        nh, nkv = w["num_attention_heads"], w["num_key_value_heads"]
        if a.qkv:  # fused [q | k | v] rows
            W, b = _lin(layer.get_submodule(a.qkv), t)
            bounds = (0, nh * hd, (nh + nkv) * hd, (nh + 2 * nkv) * hd)
            q, k, v = (
                (W[lo:hi], None if b is None else b[lo:hi])
                for lo, hi in zip(bounds[:-1], bounds[1:])
            )
        else:
            q, k, v = (_lin(layer.get_submodule(x), t) for x in (a.q, a.k, a.v))
        pairs = [(1, 0), (3, 2)]
        with torch.no_grad():
            if nh == nkv:  # MHA: whole KV heads (their query heads with them)
                mats = [q, k, v]
            else:
                mats = [q]
            for W, b in mats:
                for dst, src in pairs:
                    W[dst * hd : (dst + 1) * hd] = W[src * hd : (src + 1) * hd]
                    if b is not None:
                        b[dst * hd : (dst + 1) * hd] = b[src * hd : (src + 1) * hd]


def folds_heads(mt: str) -> bool:
    return decoder_family(mt).attention.frozen is None


@pytest.mark.parametrize("mt", TYPES)
def test_ratio_zero_is_bit_identical(mt: str) -> None:
    model = tiny(mt)
    ref = logits(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    netfold.fold(model, FoldConfig(ratio=0.0))
    assert torch.equal(logits(model), ref)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("mt", TYPES)
def test_planted_duplicates_fold_exactly(mt: str) -> None:
    heads = folds_heads(mt)
    model = tiny(mt)
    plant(model, heads)
    ref = logits(model)
    cfg = FoldConfig(ratio=0.5, llm=LLMConfig(protect=0.0))
    report = netfold.fold(model, cfg)
    assert report.params_after < report.params_before
    torch.testing.assert_close(logits(model), ref, atol=1e-10, rtol=0)
    widths = layer_widths(model)
    assert all(w["intermediate_size"] == 24 for w in widths)
    if heads:
        assert all(w["num_attention_heads"] == 2 for w in widths)
    else:
        assert all(w["num_attention_heads"] == 4 for w in widths)
        assert any(mt in r or "heads are kept" in r for _, r in report.skipped)
    # negative control: the same fold of the same model without planting is not exact
    other = tiny(mt)
    ref2 = logits(other)
    netfold.fold(other, cfg)
    assert (logits(other) - ref2).abs().max() > 1e-4


@pytest.mark.parametrize("mt", TYPES)
def test_config_and_attributes_follow_the_tensors(mt: str) -> None:
    model = tiny(mt)
    fam = family_of(model)
    netfold.fold(model, FoldConfig(ratio=0.5, llm=LLMConfig(protect=0.0)))
    w = layer_widths(model)[0]
    inter_field = fam.config_field("intermediate_size")
    assert getattr(model.config, inter_field) == w["intermediate_size"] == 24
    for layer in layers_of(model, fam):
        attn = layer.get_submodule(fam.attention.module)
        for attr in fam.attention.heads_attrs:
            if hasattr(attn, attr):
                assert getattr(attn, attr) == w["num_attention_heads"]
        if hasattr(attn, "num_key_value_groups"):
            assert attn.num_key_value_groups == w["num_attention_heads"] // w["num_key_value_heads"]
        if fam.mlp.module and fam.mlp.size_attr:
            assert getattr(layer.get_submodule(fam.mlp.module), fam.mlp.size_attr) == 24
    heads_field = fam.config_field("num_attention_heads")
    if fam.head_dim_in_config:
        assert getattr(model.config, heads_field) == w["num_attention_heads"]
    elif folds_heads(mt):
        # no head_dim in this config: folded head counts live in the extension only
        assert getattr(model.config, heads_field) == 4
        assert model.config.netfold_layer_widths[0] == w


@pytest.mark.parametrize("mt", TYPES)
@pytest.mark.parametrize("uniform", [True, False])
def test_save_reload_identical(mt: str, uniform: bool, tmp_path) -> None:
    import warnings

    model = tiny(mt)
    fam = family_of(model)
    ratios = {} if uniform else {f"{fam.layers}.0.mlp": 0.5}
    netfold.fold(model, FoldConfig(ratio=0.25, ratios=ratios, llm=LLMConfig(protect=0.0)))
    widths = layer_widths(model)
    assert (widths[0] == widths[1]) == uniform
    ref = logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        netfold.save(model, tmp_path / "m")
    back = netfold.load(tmp_path / "m")
    assert type(back) is type(model)
    assert next(back.parameters()).dtype == torch.float64
    assert layer_widths(back) == widths
    torch.testing.assert_close(logits(back), ref, atol=1e-12, rtol=0)


def test_gemma2_mlp_features_read_the_pre_feedforward_norm() -> None:
    """Gemma2's MLP reads pre_feedforward_layernorm; post_attention_layernorm normalises the
    attention output. Activation features must come from the former."""
    from netfold.families.llama import collect_mlp_inputs

    model = tiny("gemma2")
    seen = []
    layer = model.model.layers[0]

    def grab(_m, inp, _out):
        seen.append(inp[0].detach().reshape(-1, inp[0].shape[-1]))

    h = layer.mlp.register_forward_hook(grab)
    try:
        x = collect_mlp_inputs(model, X)["model.layers.0.mlp"]
    finally:
        h.remove()
    torch.testing.assert_close(x, torch.cat(seen).to(torch.float64), atol=1e-6, rtol=0)
    # negative control: the post-attention norm's output is something else
    other = []

    def grab_post(_m, _inp, out):
        other.append(out.detach().reshape(-1, out.shape[-1]))

    h = layer.post_attention_layernorm.register_forward_hook(grab_post)
    try:
        for j in range(X.shape[0]):
            model(input_ids=X[j : j + 1])
    finally:
        h.remove()
    assert (torch.cat(other).to(torch.float64) - x).abs().max() > 1e-3


@pytest.mark.parametrize("mt", TYPES)
def test_planner_counts_the_folded_parameters(mt: str) -> None:
    """The one parameter counter (fold/plan.py, through the Overlay for fused or transposed
    projections) predicts the parameters a decoder fold leaves, MLP and head groups alike."""
    from netfold.eval.cost import count_params
    from netfold.families.llama import HOOKS, find_llm_groups, overlay
    from netfold.fold.decoder import plan_llm_widths
    from netfold.fold.plan import params_after, params_removed

    model = tiny(mt)
    groups = [g for g in find_llm_groups(model, "query") if g.foldable]
    cfg = FoldConfig(ratio=0.5, llm=LLMConfig(protect=0.0))
    widths = plan_llm_widths(model, groups, cfg, hooks=HOOKS)
    assert any(g.name.endswith("mlp") for g in groups if g.name in widths)
    predicted = params_after(model, groups, widths, overlay(model))
    view = overlay(model)
    removed = sum(
        params_removed(model, g, widths[g.name], view) for g in groups if g.name in widths
    )
    dense = count_params(model)
    assert predicted == dense - removed < dense
    netfold.fold(model, cfg)
    assert count_params(model) == predicted
    # negative control: the counter sees a different plan
    fewer = {n: w - 1 if w > 1 else w for n, w in widths.items()}
    assert params_after(tiny(mt), groups, fewer, overlay(tiny(mt))) < predicted
