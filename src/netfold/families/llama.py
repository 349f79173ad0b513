"""Hugging Face decoders: the fold entry point, and save / load of folded decoders.

Every supported decoder family is one row of :mod:`netfold.families.table` (Llama, Mistral,
Qwen2, Qwen3, Gemma, Gemma2, Gemma3, Phi-3, GPT-2, OPT); :mod:`netfold.families.decoders`
turns a row into groups, split views and attribute / config sync, and
:mod:`netfold.fold.decoder` folds. This module binds the two (:data:`HOOKS`) and keeps the
names callers import from here.

The residual stream (hidden size) is never folded. After surgery the attention modules'
head-count attributes, the MLP's intermediate size and the config agree with the tensors.
Uniform widths go into the family's stock config fields, so ``from_pretrained`` reloads the
saved folder; per-layer widths are recorded as ``config.netfold_layer_widths`` (a list, one
``{"intermediate_size", "num_attention_heads", "num_key_value_heads"}`` per layer), which
:func:`netfold.hub.load_pretrained` (and ``netfold.load``) reads. Families whose config has no
``head_dim`` (GPT-2, OPT) record folded head counts this way too, since transformers would
derive a wrong head dimension from them.

Config extension: when the installed transformers refuses the folded head counts as stock
fields (Llama and Gemma configs require ``hidden_size % num_attention_heads == 0`` even with an
explicit ``head_dim``; decided by validating the config, not by model type), the stock fields
keep the unfolded head counts, ``netfold_layer_widths`` records the actual widths of every layer
and ``netfold_config_extension`` says why. Such a folder reloads with ``netfold.load``
(stock ``from_pretrained`` would see the unfolded shapes and refuse the weights).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import FoldConfig
from ..fold import decoder as D
from ..fold.decoder import (  # noqa: F401 - re-exported: callers import them from here
    ALLOC_GRID,
    DecoderHooks,
    embedding_params,
    feature_kind,
    group_ratio,
    self_generated_ids,
    width_at,
)
from ..fold.views import Overlay
from ..report import Report
from .decoders import (  # noqa: F401 - re-exported
    LAYER_WIDTHS_KEY,
    STOCK_ATTR,
    AttrSnapshot,
    check_supported,
    family_of,
    find_llm_groups,
    is_hf_decoder,
    layer_widths,
    layers_of,
    mlp_norms,
    resize_layers,
    splits,
    sync_decoder,
)
from .table import DECODERS

#: Decoder ``model_type`` values (one table row each; see :mod:`netfold.families.table`).
SUPPORTED = tuple(t for f in DECODERS for t in f.model_types)
CONFIG_EXTENSION_KEY = "netfold_config_extension"
_STOCK_FIELDS = ("intermediate_size", "num_attention_heads", "num_key_value_heads")


def _layers(model: nn.Module) -> nn.ModuleList:
    return layers_of(model)


# Looked up at call time, so a patched module attribute (tests) is what a fold calls.
HOOKS = DecoderHooks(
    check=lambda m: check_supported(m),
    groups=lambda m, heads: find_llm_groups(m, heads),
    splits=lambda m: splits(m),
    mlp_norms=lambda m: mlp_norms(m),
    sync=lambda m: sync_decoder(m),
    snapshot=lambda m: AttrSnapshot(m),
)


def fold_decoder(model: nn.Module, config: FoldConfig, **kw: Any) -> Report:
    """Fold a supported Hugging Face decoder in place; see :func:`netfold.fold.decoder.fold_decoder`.

    The Report says how the folded widths will save (``extra["save_format"]``): in the stock
    config fields, or, when the installed transformers refuses them (a head count that no
    longer divides the hidden size), through the netfold config extension, with a warning.
    """
    report = D.fold_decoder(model, config, HOOKS, **kw)
    try:
        note = _saved_config(model)[1]
    except ValueError as e:  # not even the extension fits: saving will raise the same
        note = f"cannot be saved with the installed transformers: {e}"
    report.extra["save_format"] = "stock config" if note is None else "netfold extension"
    if note is not None:
        report.warnings.append(note)
    return report


def collect_mlp_inputs(model: nn.Module, data: Any, **kw: Any) -> dict[str, Any]:
    """Normalised MLP inputs per layer, {group: (S, hidden)} (the family's MLP norm outputs)."""
    return D.collect_mlp_inputs(model, data, mlp_norms(model), **kw)


def plan_llm_widths(model, groups, config, widths=None, ids=None) -> dict[str, int]:
    """Units kept per group; see :func:`netfold.fold.decoder.plan_llm_widths`."""
    return D.plan_llm_widths(model, groups, config, widths, ids, hooks=HOOKS)


def mlp_error_curves(model, groups, config, ids, grid=ALLOC_GRID):
    """Folding error per MLP group and width; see :func:`netfold.fold.decoder.mlp_error_curves`."""
    return D.mlp_error_curves(model, groups, config, ids, grid, hooks=HOOKS)


def allocate_by_cost(model, groups, config, target_params, ids, curves=None):
    """Per-layer MLP widths from folding errors; see :func:`netfold.fold.decoder.allocate_by_cost`."""
    return D.allocate_by_cost(model, groups, config, target_params, ids, curves, hooks=HOOKS)


def _cluster_protected(X: torch.Tensor, k: int, prot: torch.Tensor, config: FoldConfig):
    return D._cluster_protected(X, k, prot, config)


def overlay(model: nn.Module) -> Overlay:
    """The model with fused / transposed projections visible as Linear parts (group names)."""
    return Overlay(model, splits(model))


# ------------------------------------------------------------------------------ save/load


class ConfigExtensionWarning(UserWarning):
    """The folded widths were saved through netfold's config extension, not stock fields."""


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def config_error(cfg: Any) -> str | None:
    """Why the installed transformers would refuse to save or load ``cfg`` (None: it accepts it).

    Runs the config class's own validation and rebuilds it from its dict, the two steps
    ``save_pretrained`` / ``from_pretrained`` take, on a copy.
    """
    try:
        c = copy.deepcopy(cfg)
        if hasattr(c, "validate"):
            c.validate()
        type(cfg).from_dict(c.to_dict())
    except Exception as e:  # noqa: BLE001 - any refusal means "not accepted"
        return _one_line(e)
    return None


def _saved_config(model: nn.Module) -> tuple[Any, str | None]:
    """The config to write, and the reason when the netfold extension had to be used.

    Stock fields carry the folded widths when the installed transformers accepts them. When it
    does not (Llama / Gemma configs require ``hidden_size % num_attention_heads == 0`` even with
    an explicit ``head_dim``), the stock fields keep the unfolded head counts (which it accepts)
    and the actual widths go to ``netfold_layer_widths``, read by :func:`netfold.hub.load_pretrained`.
    """
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, CONFIG_EXTENSION_KEY):
        delattr(cfg, CONFIG_EXTENSION_KEY)
    qc = getattr(cfg, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)) == "gguf":
        del cfg.quantization_config  # weights are dequantized floats: a plain model now
    why = config_error(cfg)
    if why is None:
        return cfg, None
    try:
        widths = layer_widths(model)
    except ValueError:
        raise ValueError(f"the installed transformers refuses this config: {why}") from None
    hd = int(getattr(cfg, "head_dim", None) or _layers(model)[0].self_attn.head_dim)
    candidates = []
    stock = getattr(model, STOCK_ATTR, None)
    if isinstance(stock, dict):
        candidates.append(stock)
    nh = cfg.hidden_size // hd
    nkv = widths[0]["num_key_value_heads"]
    candidates.append(
        {"num_attention_heads": nh, "num_key_value_heads": nkv if nh % nkv == 0 else nh}
    )
    for stock_fields in candidates:
        ext = copy.deepcopy(cfg)
        for k, v in stock_fields.items():
            setattr(ext, k, v)
        ext.head_dim = hd
        setattr(ext, LAYER_WIDTHS_KEY, widths)
        note = (
            f"folded widths saved as the netfold config extension ({LAYER_WIDTHS_KEY}); stock "
            f"fields rejected by transformers: {why}; reload with netfold.load"
        )
        setattr(ext, CONFIG_EXTENSION_KEY, note)
        if config_error(ext) is None:
            return ext, note
    raise ValueError(f"the installed transformers refuses this config: {why}")


def config_extension(directory: str | os.PathLike) -> str | None:
    """The note a save left when it used the netfold config extension (None: stock config)."""
    import json

    p = Path(directory) / "config.json"
    try:
        note = json.loads(p.read_text()).get(CONFIG_EXTENSION_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return note if isinstance(note, str) else None


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer: Any = None,
    *,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """``model.save_pretrained`` (safetensors, the model's dtype), atomically, plus extras.

    The folder is written as a temporary sibling and swapped in (see :mod:`netfold.atomic`):
    the path always holds the previous complete save or this one, never a mix. Also written:
    the tokenizer when given, ``metadata`` as ``netfold_metadata.json``, and the sha256 of every
    weight file (``netfold_checksums.json``, verified by :func:`netfold.hub.load_pretrained`).

    Folded widths that the installed transformers refuses as stock config fields are saved
    through the netfold config extension (a :class:`ConfigExtensionWarning` says so and
    ``config.json`` gets a ``netfold_config_extension`` note, see :func:`config_extension`).
    A model loaded from a GGUF file (dequantized by transformers) saves as a plain model.

    Raises:
        ValueError: a non-finite tensor (named), or an existing folder that is not a save.
            Raised before anything is written.
        TypeError: metadata is not JSON-serialisable.
    """
    import json
    import warnings

    from ..atomic import atomic_directory
    from ..io import check_finite, replaceable, write_checksums

    if metadata is not None:
        json.dumps(metadata)  # TypeError before anything is written
    check_finite(model.state_dict(), "save_pretrained")
    cfg, note = _saved_config(model)
    quantizer = getattr(model, "hf_quantizer", None)
    gguf = quantizer is not None and not hasattr(cfg, "quantization_config")
    with atomic_directory(directory, replaceable=replaceable) as tmp:
        old_cfg = model.config
        model.config = cfg
        if gguf:
            model.hf_quantizer = None
        try:
            model.save_pretrained(tmp)
        finally:
            model.config = old_cfg
            if gguf:
                model.hf_quantizer = quantizer
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if metadata:
            (tmp / "netfold_metadata.json").write_text(
                json.dumps(metadata, indent=1, sort_keys=True)
            )
        write_checksums(tmp)
    if note:
        warnings.warn(f"{directory}: {note}", ConfigExtensionWarning, stacklevel=2)
    return Path(directory)
