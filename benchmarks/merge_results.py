"""Merge fold_bench.py result files (one per model) into one results JSON.

Run: python benchmarks/merge_results.py OUT.json IN1.json IN2.json ...
Each input keeps its own command, date, git revision and machine under "runs".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    out, *inputs = argv
    merged: dict = {"models": {}, "runs": []}
    for p in inputs:
        r = json.loads(Path(p).read_text())
        for key in (
            "command",
            "date",
            "git",
            "machine",
            "seed",
            "n_test",
            "calibration",
            "deep_inversion",
        ):
            merged.setdefault(key, r.get(key))
        merged["runs"].append(
            {k: r.get(k) for k in ("command", "date", "git", "machine")}
            | {"models": list(r["models"])}
        )
        merged["models"].update(r["models"])
        if "full_resnet18_fold_time" in r:
            merged["full_resnet18_fold_time"] = r["full_resnet18_fold_time"]
    merged["command"] = " ; ".join(run["command"] for run in merged["runs"])
    from netfold.atomic import write_json

    write_json(out, merged)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
