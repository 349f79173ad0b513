"""Write a Llama-shaped checkpoint of random weights as sharded safetensors, shard by shard.

Run:
    python benchmarks/make_synthetic_llama.py --shape llama2-7b
    python benchmarks/make_synthetic_llama.py --shape llama3-8b
    python benchmarks/make_synthetic_llama.py --tiny --out /tmp/tiny-llama
    python benchmarks/make_synthetic_llama.py --layers 4 --hidden 256 --out /tmp/x

Shapes: ``llama2-7b`` (hidden 4096, 32 layers, 32 heads MHA, FFN 11008, vocab 32000) and
``llama3-8b`` (hidden 4096, 32 layers, 32 query / 8 KV heads, FFN 14336, vocab 128256);
``--tiny`` is hidden 64, 3 layers, 4 / 2 heads, FFN 176, vocab 256. The folder (default
``~/.cache/netfold/synthetic/<shape>``, outside git) holds ``config.json`` (LlamaForCausalLM,
model_type llama), ``model-0000i-of-0000n.safetensors`` shards of at most ``--shard-gb`` GB and
``model.safetensors.index.json``, like a Hugging Face hub folder.

The weights are random but not featureless, so clustering has something to find:

- projections are N(0, std^2) with std = 0.02 / sqrt(1 + l / 8) for layer l (later layers have
  smaller weights), o_proj / down_proj further divided by sqrt(2 L) (GPT-2's residual scaling);
- every output row of a projection is scaled by a log-normal factor (sigma 0.35), so channel
  norms spread as in trained models; a handful of MLP channels per layer get 6-10x gains (the
  "super weights" netfold protects);
- a quarter of each MLP's channels are noisy copies of other channels (10% noise), and so are
  an eighth of the query heads: redundancy of the kind folding removes;
- RMSNorm weights are 1 + N(0, 0.05^2) (near 1); embeddings N(0, 0.02^2).

Every tensor comes from its own generator seeded by (seed, tensor name), so any subset of the
model can be regenerated and the output is identical whatever the shard size. Only one tensor is
held in memory at a time; the folder is written as a temporary sibling and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zlib
from pathlib import Path

import torch

SHAPES: dict[str, dict[str, int | float]] = {
    "llama2-7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "llama2-70b": dict(
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=32000,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=176,
        vocab_size=256,
        max_position_embeddings=256,
        rope_theta=10000.0,
    ),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DEFAULT_ROOT = Path.home() / ".cache" / "netfold" / "synthetic"


def tensor_shapes(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a LlamaForCausalLM of shape ``s``, in the order a hub folder stores them."""
    h, f, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    hd = h // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (q, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, q)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (f, h)),
            (f"{p}.mlp.up_proj.weight", (f, h)),
            (f"{p}.mlp.down_proj.weight", (h, f)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def _gen(seed: int, name: str, salt: str = "") -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32((name + salt).encode()))


def _duplicates(n: int, frac: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(copies, sources): ``frac`` of ``n`` units become noisy copies of other units."""
    perm = torch.randperm(n, generator=g)
    m = int(n * frac)
    return perm[:m], perm[m : 2 * m] if 2 * m <= n else perm[m:][torch.arange(m) % (n - m)]


def make_tensor(name: str, shape: tuple[int, ...], s: dict, seed: int) -> torch.Tensor:
    """One tensor (float32) of the synthetic model, from (seed, name) alone."""
    g = _gen(seed, name)
    L = s["num_hidden_layers"]
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 0.02 * torch.randn(shape, generator=g)
    layer = int(name.split(".")[2])
    std = 0.02 / (1.0 + layer / 8.0) ** 0.5
    if "o_proj" in name or "down_proj" in name:
        std /= (2.0 * L) ** 0.5
    w = torch.randn(shape, generator=g) * std
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight")):
        w *= torch.exp(0.35 * torch.randn(shape[0], 1, generator=g))
    if name.endswith("up_proj.weight"):
        w *= torch.exp(0.35 * torch.randn(shape[0], 1, generator=g))
    # redundancy and super channels are shared by the tensors of one MLP / attention block
    prefix = name.rsplit(".", 2)[0]
    gb = _gen(seed, prefix, "block")
    if ".mlp." in name:
        n = s["intermediate_size"]
        copies, src = _duplicates(n, 0.25, gb)
        sup = torch.randperm(n, generator=gb)[: max(1, n // 2000)]
        gain = 6.0 + 4.0 * torch.rand(sup.numel(), generator=gb)
        if name.endswith("down_proj.weight"):
            w[:, copies] = w[:, src] * (
                1 + 0.1 * torch.randn(w.shape[0], copies.numel(), generator=g)
            )
            w[:, sup] *= gain
        else:
            w[copies] = w[src] * (1 + 0.1 * torch.randn(copies.numel(), w.shape[1], generator=g))
    elif ".self_attn." in name and name.endswith(("q_proj.weight", "o_proj.weight")):
        nh, hd = s["num_attention_heads"], s["hidden_size"] // s["num_attention_heads"]
        gs = nh // s["num_key_value_heads"]
        # copies stay inside their KV group, so query-head folding can use them
        pairs = [(j * gs + a, j * gs + a + 1) for j in range(nh // gs) for a in range(0, gs - 1, 8)]
        if gs == 1:  # MHA: copies across heads
            pairs = [(a, a + 1) for a in range(0, nh - 1, 8)]
        for dst, src_h in pairs:
            if name.endswith("q_proj.weight"):
                rows = w[src_h * hd : (src_h + 1) * hd]
                w[dst * hd : (dst + 1) * hd] = rows * (
                    1 + 0.1 * torch.randn(rows.shape, generator=g)
                )
            else:
                cols = w[:, src_h * hd : (src_h + 1) * hd]
                w[:, dst * hd : (dst + 1) * hd] = cols * (
                    1 + 0.1 * torch.randn(cols.shape, generator=g)
                )
    return w


def tensor_chunks(name: str, shape: tuple[int, ...], s: dict, seed: int):
    """``make_tensor`` in row blocks for the embedding / head (a 128k x 4096 float32 table is
    2 GB); other tensors whole. The blocks come from the same seeded generator, in order."""
    if name not in ("model.embed_tokens.weight", "lm_head.weight"):
        yield make_tensor(name, shape, s, seed)
        return
    g = _gen(seed, name)
    for r in range(0, shape[0], 8192):
        yield 0.02 * torch.randn((min(8192, shape[0] - r), *shape[1:]), generator=g)


def shard_plan(
    shapes: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: int
) -> list[list[str]]:
    """Tensor names per shard, in order, each shard at most ``shard_bytes`` (or one tensor)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_checkpoint(
    out: str | os.PathLike,
    shape: dict,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    shard_bytes: int = 5 * 10**9,
    tie_word_embeddings: bool = False,
    progress: bool = False,
) -> Path:
    """Write the synthetic checkpoint into ``out`` (atomically; ``out`` must not exist).

    Returns:
        The folder.

    Raises:
        ValueError: ``out`` exists, or inconsistent shape fields.
    """
    from transformers import LlamaConfig

    from netfold.atomic import atomic_directory
    from netfold.fold.stream import ST_NAMES, tensor_bytes, write_safetensors

    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists; delete it or choose another --out")
    s = dict(shape)
    if s["hidden_size"] % s["num_attention_heads"] or (
        s["num_attention_heads"] % s["num_key_value_heads"]
    ):
        raise ValueError(f"head counts do not divide: {s}")
    shapes = tensor_shapes(s)
    if tie_word_embeddings:
        shapes = [x for x in shapes if x[0] != "lm_head.weight"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = shard_plan(shapes, itemsize, shard_bytes)
    by_name = dict(shapes)
    files = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    if len(plan) == 1:
        files = ["model.safetensors"]
    weight_map: dict[str, str] = {}
    total = 0
    cfg = LlamaConfig(
        **{k: v for k, v in s.items()},
        head_dim=s["hidden_size"] // s["num_attention_heads"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        dtype=dtype,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    with atomic_directory(out) as tmp:
        for names, fname in zip(plan, files):
            t0 = time.perf_counter()
            entries = []
            for n in names:
                nbytes = itemsize * int(torch.Size(by_name[n]).numel())

                def write(f, n=n) -> None:
                    for block in tensor_chunks(n, by_name[n], s, seed):
                        f.write(tensor_bytes(block.to(dtype)))

                entries.append((n, ST_NAMES[dtype], by_name[n], nbytes, write))
                weight_map[n] = fname
                total += nbytes
            # tensor by tensor: one tensor in memory at a time, not the shard
            write_safetensors(tmp / fname, entries, {"format": "pt"})
            if progress:
                print(
                    f"  {fname}: {len(names)} tensors, {time.perf_counter() - t0:.1f} s", flush=True
                )
        if len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        cfg.save_pretrained(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    p.add_argument("--tiny", action="store_true", help="the tiny shape (hidden 64, 3 layers)")
    p.add_argument("--layers", type=int, help="override num_hidden_layers")
    p.add_argument("--hidden", type=int, help="override hidden_size (FFN scales along: 2.6875x)")
    p.add_argument("--heads", type=int, help="override num_attention_heads")
    p.add_argument("--kv-heads", type=int, help="override num_key_value_heads")
    p.add_argument("--ffn", type=int, help="override intermediate_size")
    p.add_argument("--vocab", type=int, help="override vocab_size")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gb", type=float, default=5.0, help="largest shard size (GB)")
    p.add_argument("--tie", action="store_true", help="tie the LM head to the embedding")
    p.add_argument("--out", help=f"output folder (default {DEFAULT_ROOT}/<shape>)")
    a = p.parse_args(argv)
    name = "tiny" if a.tiny else a.shape
    s = dict(SHAPES[name])
    if a.hidden:
        s["intermediate_size"] = int(round(a.hidden * 2.6875 / 16)) * 16
        s["hidden_size"] = a.hidden
    for key, val in (
        ("num_hidden_layers", a.layers),
        ("num_attention_heads", a.heads),
        ("num_key_value_heads", a.kv_heads),
        ("intermediate_size", a.ffn),
        ("vocab_size", a.vocab),
    ):
        if val:
            s[key] = val
    out = Path(a.out) if a.out else DEFAULT_ROOT / name
    t0 = time.perf_counter()
    write_checkpoint(
        out,
        s,
        dtype=DTYPES[a.dtype],
        seed=a.seed,
        shard_bytes=int(a.shard_gb * 1e9),
        tie_word_embeddings=a.tie,
        progress=True,
    )
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s: {s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
