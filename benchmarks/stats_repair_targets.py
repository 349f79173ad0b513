"""Which BatchNorm target for repair="stats": sequential (folded pass) vs static (members only).

Run: python benchmarks/stats_repair_targets.py   (prints one line per model and ratio; the
table is in docs/repair.md). Uses the checkpoints of benchmarks/stats_repair_bench.py.
"""

import copy
import functools

import torch

import netfold
import netfold.api
from netfold.data.fashion_mnist import calibration_batches, load_fashion_mnist
from netfold.eval.accuracy import evaluate_accuracy
from netfold.eval.variance import bn_distance, bn_stats
from netfold.models.train import get_trained


def main() -> None:
    x, y = load_fashion_mnist("test")
    x, y = x[:4000], y[:4000]
    calib = torch.cat(calibration_batches(n_batches=8, batch_size=64))
    orig = netfold.api.stats_repair_state
    for name, ep, ratios in (
        ("vgg11_bn_cifar", None, (0.25, 0.35, 0.45)),
        ("resnet18_cifar", 1, (0.25, 0.35, 0.45)),
    ):
        model, _ = get_trained(name, epochs=ep, progress=False)
        groups = netfold.find_groups(model, calib[:2])
        for ratio in ratios:
            row = []
            for label, rep, kw in (
                ("data", "data", {}),
                ("stats", "stats", {}),
                ("static", "stats", {"static": True}),
            ):
                m = copy.deepcopy(model)
                netfold.api.stats_repair_state = functools.partial(orig, **kw)
                try:
                    netfold.fold(
                        m,
                        netfold.FoldConfig(ratio=ratio, repair=rep),
                        example_inputs=calib[:2],
                        data=calib if rep == "data" else None,
                        groups=groups,
                    )
                finally:
                    netfold.api.stats_repair_state = orig
                st = bn_stats(m)
                if label == "data":
                    ref = st
                row.append(
                    f"{label} {100 * evaluate_accuracy(m, x, y):.2f}% d={bn_distance(st, ref):.3f}"
                )
            print(name, ratio, " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
