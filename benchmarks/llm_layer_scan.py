"""Per-layer sensitivity of SmolLM2-135M: fold ONE group, measure perplexity (uses eval text).

A diagnostic, not a method: each decoder layer's MLP is folded to 50% (repair none) or its
attention from 9 to 6 query heads, everything else dense, and perplexity is measured on the
first 1024-token window of the Python-docs evaluation split. One JSON line per run.

Run:
    OMP_NUM_THREADS=1 python benchmarks/llm_layer_scan.py --layers 0,1,2 \
        > benchmarks/results/llm_layer_scan.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import transformers

import netfold
from netfold import FoldConfig
from netfold.data.text import load_text
from netfold.eval.perplexity import perplexity
from netfold.hub import load_smollm2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", default=",".join(str(i) for i in range(30)))
    ap.add_argument("--kinds", default="mlp,self_attn")
    args = ap.parse_args()
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    base, tok = load_smollm2()
    ids = tok(load_text("pydocs"), return_tensors="pt").input_ids[0]
    print("dense", perplexity(base, tok, ids=ids, seqlen=1024, max_windows=1), flush=True)
    for layer in (int(v) for v in args.layers.split(",")):
        for kind, ratio in (("mlp", 0.5), ("self_attn", 0.34)):
            if kind not in args.kinds.split(","):
                continue
            m = copy.deepcopy(base)
            cfg = FoldConfig(
                ratio=0.0, ratios={f"model.layers.{layer}.{kind}": ratio}, repair="none", n_init=1
            )
            netfold.fold(m, cfg)
            ppl = perplexity(m, tok, ids=ids, seqlen=1024, max_windows=1)
            print(json.dumps(dict(layer=layer, kind=kind, ppl=round(ppl, 3))), flush=True)


if __name__ == "__main__":
    main()
