"""Model families as data: one row per Hugging Face ``model_type``, no math.

A decoder row (:class:`DecoderFamily`) names, relative to one decoder layer, the modules the
fold pipeline reads and rewrites: the attention projections (separate q/k/v/o, or a fused
qkv to split into row blocks), the MLP projections (gate/up/down, a fused gate_up, or a plain
fc1/fc2 pair), the activation module, the norm in front of the MLP and in front of attention,
whether weights are stored transposed (GPT-2's ``Conv1D``), which attention attributes carry
head counts, and which config fields hold the widths. Encoders: the ``model_type`` values
:mod:`netfold.families.encoders` folds and the MLP / attention layouts it scans for
(:data:`MLP_LAYOUTS`, :data:`ATTENTION_LAYOUTS`, also read by LayerCollapse).

Adding a decoder family is one row here plus a tiny-config test (tests/test_families.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "ATTENTION_LAYOUTS",
    "DECODERS",
    "MLP_LAYOUTS",
    "ENCODER_MODEL_TYPES",
    "Attention",
    "AttnLayout",
    "DecoderFamily",
    "Mlp",
    "decoder_family",
    "supported_model_types",
]


@dataclass(frozen=True)
class Attention:
    """Attention modules of a decoder layer, paths relative to the layer.

    Attributes:
        module: the attention module (holds the head-count attributes).
        q, k, v, o: projection paths; ``q``/``k``/``v`` are None when ``qkv`` is fused.
        qkv: a fused projection whose output rows are [q | k | v] (Phi-3 ``qkv_proj``, GPT-2
            ``c_attn``), split into three row blocks, folded, and re-fused.
        head_dim_attr: attribute of ``module`` with the head dimension.
        heads_attrs / kv_heads_attrs: attributes of ``module`` set to the folded query / KV head
            counts (only those the module has are written).
        width_attrs: attributes of ``module`` set to query heads x head_dim (GPT-2's
            ``split_size``, the width of each of c_attn's q / k / v blocks).
        frozen: why heads are not folded for this family (None: they fold).
    """

    module: str = "self_attn"
    q: str | None = "self_attn.q_proj"
    k: str | None = "self_attn.k_proj"
    v: str | None = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    qkv: str | None = None
    head_dim_attr: str = "head_dim"
    heads_attrs: tuple[str, ...] = ("num_heads",)
    kv_heads_attrs: tuple[str, ...] = ("num_key_value_heads",)
    width_attrs: tuple[str, ...] = ()
    frozen: str | None = None


@dataclass(frozen=True)
class Mlp:
    """MLP modules of a decoder layer, paths relative to the layer.

    Attributes:
        up: the (up) producer; for a plain MLP the only producer (``fc1`` / ``c_fc``).
        gate: the gate producer of a gated MLP (``act(gate x) * (up x)``); None for a plain MLP.
        gate_up: a fused gated producer whose output rows are [gate | up] (Phi-3); then
            ``gate`` and ``up`` are None.
        down: the consumer.
        act: the activation module applied to the gate (or to fc1's output).
        size_attr: attribute of ``module`` holding the intermediate size, if any.
        module: the module holding ``size_attr`` (None: no such module).
    """

    down: str = "mlp.down_proj"
    up: str | None = "mlp.up_proj"
    gate: str | None = "mlp.gate_proj"
    gate_up: str | None = None
    act: str = "mlp.act_fn"
    module: str | None = "mlp"
    size_attr: str | None = "intermediate_size"

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.gate_up is not None


@dataclass(frozen=True)
class DecoderFamily:
    """One decoder family: where everything is, as data.

    Attributes:
        name: readable family name.
        model_types: Hugging Face ``config.model_type`` values this row covers.
        layers: path of the ``nn.ModuleList`` of decoder layers, from the model root.
        attention / mlp: the layer's modules.
        attn_norm / mlp_norm: the norms whose outputs feed attention / the MLP (Gemma2/3 and
            later read ``pre_feedforward_layernorm``; ``post_attention_layernorm`` there
            normalises the attention output).
        norm_offset: the norm scales by ``offset + weight`` (Gemma's RMSNorm: 1 + w).
        transposed: weights are stored (in, out) (GPT-2 ``Conv1D``), not (out, in).
        config_fields: canonical width name -> the config field holding it (None: no field;
            e.g. MHA models have no ``num_key_value_heads``).
        head_dim_in_config: the config has an explicit ``head_dim``; without it transformers
            derives the head dimension from hidden_size / heads, so folded head counts can only
            be saved through the netfold config extension.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    attention: Attention = field(default_factory=Attention)
    mlp: Mlp = field(default_factory=Mlp)
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    norm_offset: float = 0.0
    transposed: bool = False
    config_fields: tuple[tuple[str, str | None], ...] = (
        ("intermediate_size", "intermediate_size"),
        ("num_attention_heads", "num_attention_heads"),
        ("num_key_value_heads", "num_key_value_heads"),
    )
    head_dim_in_config: bool = True

    def config_field(self, width: str) -> str | None:
        """The config field holding canonical width ``width`` (None: the config has none)."""
        return dict(self.config_fields)[width]


_GEMMA_FFN = "pre_feedforward_layernorm"  # Gemma2/3: the MLP reads this norm, not post_attention

#: Every decoder family netfold folds, one row each.
DECODERS: tuple[DecoderFamily, ...] = (
    DecoderFamily("Llama", ("llama",)),
    DecoderFamily("Mistral", ("mistral",)),
    DecoderFamily("Qwen2", ("qwen2",)),
    # q_norm / k_norm act on head_dim (shared by all heads): whole-head folding keeps them.
    DecoderFamily("Qwen3", ("qwen3",)),
    DecoderFamily("Gemma", ("gemma",), norm_offset=1.0),
    DecoderFamily("Gemma2", ("gemma2",), mlp_norm=_GEMMA_FFN, norm_offset=1.0),
    DecoderFamily("Gemma3", ("gemma3_text",), mlp_norm=_GEMMA_FFN, norm_offset=1.0),
    DecoderFamily(
        "Phi-3",
        ("phi3",),
        attention=Attention(
            q=None,
            k=None,
            v=None,
            qkv="self_attn.qkv_proj",
            frozen=(
                "Phi3Attention splits qkv_proj with config.num_attention_heads (shared by every "
                "layer), so per-layer head counts cannot be expressed; heads are kept"
            ),
        ),
        mlp=Mlp(
            up=None, gate=None, gate_up="mlp.gate_up_proj", act="mlp.activation_fn", size_attr=None
        ),
    ),
    DecoderFamily(
        "GPT-2",
        ("gpt2",),
        layers="transformer.h",
        attention=Attention(
            module="attn",
            q=None,
            k=None,
            v=None,
            o="attn.c_proj",
            qkv="attn.c_attn",
            kv_heads_attrs=(),
            width_attrs=("split_size",),
        ),
        mlp=Mlp(down="mlp.c_proj", up="mlp.c_fc", gate=None, act="mlp.act", size_attr=None),
        attn_norm="ln_1",
        mlp_norm="ln_2",
        transposed=True,
        config_fields=(
            ("intermediate_size", "n_inner"),
            ("num_attention_heads", "n_head"),
            ("num_key_value_heads", None),
        ),
        head_dim_in_config=False,
    ),
    DecoderFamily(
        "OPT",
        ("opt",),
        layers="model.decoder.layers",
        attention=Attention(o="self_attn.out_proj", kv_heads_attrs=()),
        mlp=Mlp(down="fc2", up="fc1", gate=None, act="activation_fn", module=None, size_attr=None),
        attn_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm",
        config_fields=(
            ("intermediate_size", "ffn_dim"),
            ("num_attention_heads", "num_attention_heads"),
            ("num_key_value_heads", None),
        ),
        head_dim_in_config=False,
    ),
)

#: Encoder ``model_type`` values folded by :mod:`netfold.families.encoders`, which finds
#: their blocks by scanning module names for the layouts below (so any model nesting them,
#: e.g. sentence-transformers' BERT or a classification head, is covered).
ENCODER_MODEL_TYPES: tuple[str, ...] = ("bert", "roberta", "xlm-roberta", "distilbert", "vit")

#: (first Linear, activation, second Linear, optional modules between act and second),
#: relative to the module that holds the MLP.
MLP_LAYOUTS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    # Hugging Face BERT, RoBERTa, and ViT in transformers < 5 (BertIntermediate / BertOutput).
    ("intermediate.dense", "intermediate.intermediate_act_fn", "output.dense", ()),
    # Hugging Face ViT in transformers >= 5 (ViTMLP).
    ("mlp.fc1", "mlp.activation_fn", "mlp.fc2", ()),
    # Hugging Face DistilBERT (FFN).
    ("ffn.lin1", "ffn.activation", "ffn.lin2", ()),
    # timm Mlp (ViT, MLP-Mixer) and netfold's Mixer: fc1, act, drop1, norm, fc2.
    ("fc1", "act", "fc2", ("drop1", "norm")),
)


@dataclass(frozen=True)
class AttnLayout:
    """An encoder attention layout, paths relative to a transformer layer: ``attn`` holds the
    head-count attributes and ``head_dim_attr``; q/k/v/o are the projections."""

    attn: str
    q: str
    k: str
    v: str
    o: str
    head_dim_attr: str


#: Attention layouts relative to a transformer layer.
ATTENTION_LAYOUTS: tuple[AttnLayout, ...] = (
    # BERT / RoBERTa: BertSelfAttention + BertSelfOutput.
    AttnLayout(
        "attention.self",
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention_head_size",
    ),
    # ViT, transformers >= 5.
    AttnLayout(
        "attention",
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
        "attention.o_proj",
        "head_dim",
    ),
    # DistilBERT: heads are inferred from attention_head_size in forward (view(..., -1, hd)).
    AttnLayout(
        "attention",
        "attention.q_lin",
        "attention.k_lin",
        "attention.v_lin",
        "attention.out_lin",
        "attention_head_size",
    ),
    # ViT, transformers < 5.
    AttnLayout(
        "attention.attention",
        "attention.attention.query",
        "attention.attention.key",
        "attention.attention.value",
        "attention.output.dense",
        "attention_head_size",
    ),
)

#: Head-count attributes synced after folding heads (those a module has).
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads")
HEAD_WIDTH_ATTRS = ("all_head_size",)


_BY_TYPE: dict[str, DecoderFamily] = {t: f for f in DECODERS for t in f.model_types}


def supported_model_types() -> tuple[str, ...]:
    """Every Hugging Face ``model_type`` netfold folds (decoders, then encoders)."""
    return tuple(_BY_TYPE) + ENCODER_MODEL_TYPES


def decoder_family(model_type: str | None) -> DecoderFamily | None:
    """The decoder row for ``model_type`` (None when it is not a known decoder)."""
    return _BY_TYPE.get(model_type) if isinstance(model_type, str) else None
