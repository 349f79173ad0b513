"""Does the data-free allocation error rank layers like their measured perplexity cost?

For every MLP of SmolLM2-135M, fold it alone to 50% and compute the error used by
``allocation="cost"`` (median over tokens of ||MLP_folded(x) - MLP(x)||^2 / ||r||^2, r the
residual stream) on the model's own sampled text (data-free) and on the calibration split;
compare its rank with the perplexity increase measured by benchmarks/llm_layer_scan.py.

Run:
    OMP_NUM_THREADS=1 python benchmarks/llm_sensitivity_check.py \
        > benchmarks/results/llm_sensitivity_check.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers

from netfold.config import FoldConfig, LLMConfig
from netfold.data.text import calibration_windows
from netfold.families.llama import (
    find_llm_groups,
    mlp_error_curves,
    self_generated_ids,
)
from netfold.hub import load_smollm2

SCAN = Path(__file__).parent / "results" / "llm_layer_scan.jsonl"


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    model, tok = load_smollm2()
    scan = {}
    for line in SCAN.read_text().splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            if r["kind"] == "mlp":
                scan[r["layer"]] = r["ppl"]
    llm = LLMConfig()
    sources = {
        "self_generated": self_generated_ids(model, llm.synth_sequences, llm.synth_length, 0),
        "calibration_split": calibration_windows(tok, 512, 2),
    }
    groups = [g for g in find_llm_groups(model) if g.name.endswith(".mlp")]
    out = {"layers": sorted(scan), "scan_ppl": [scan[i] for i in sorted(scan)]}
    for name, ids in sources.items():
        wcfg = FoldConfig(llm=LLMConfig(features="weights"))  # as measured
        curves = mlp_error_curves(model, groups, wcfg, ids, grid=(0.5,))
        err = [curves[f"model.layers.{i}.mlp"][1][1] for i in sorted(scan)]
        out[name] = {"error_at_50pct": err, "spearman_vs_scan": spearman(err, out["scan_ppl"])}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
