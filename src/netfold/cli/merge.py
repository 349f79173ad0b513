"""``netfold merge``: several models of one architecture into one, saved.

netfold merge A/ B/ [C/ ...] --method fold --data fashion-mnist --out DIR
"""

from __future__ import annotations

import argparse

import torch

from .. import hub
from ..config import DeepInversionConfig
from ..merge.config import MERGE_OUTPUTS
from .common import (
    check_dataset,
    check_fits,
    check_output,
    dataset,
    input_shape_arg,
    no_data,
    parse_input_shape,
    positive,
    resolve_input_shape,
)

__all__ = ["add_merge_parser", "cmd_merge"]


def add_merge_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``netfold merge`` on a subparsers object."""
    p = sub.add_parser("merge", help="merge models of one architecture into one (saved copy)")
    p.add_argument("models", nargs="+", help="two or more saved netfold folders or checkpoints")
    p.add_argument(
        "--method",
        choices=("fold", "weight-matching", "zipit", "average"),
        default="fold",
        help="k-means over all models' channels, weight matching, ZipIt!, or plain averaging",
    )
    p.add_argument(
        "--repair",
        choices=("none", "data", "dir"),
        default="none",
        help="statistics repair of the merged model (data: needs --data; dir: deep inversion)",
    )
    p.add_argument(
        "--width", type=float, default=1.0, help="merged width as a multiple of one model's"
    )
    p.add_argument("--zip-layers", type=int, help="zipit: merge only the first N groups")
    p.add_argument(
        "--outputs",
        choices=MERGE_OUTPUTS,
        default="average",
        help="average the models' outputs (same task), or keep each model's head and "
        "concatenate their outputs (models trained on disjoint label sets)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of k-means and synthetic data")
    p.add_argument("--data", help="fashion-mnist (accuracy, repair, ZipIt! activations) or none")
    p.add_argument("--calib", type=int, default=512, help="calibration images")
    p.add_argument(
        "--dir-steps", type=int, default=DeepInversionConfig.steps, help="deep inversion steps"
    )
    p.add_argument(
        "--dir-batch", type=int, default=DeepInversionConfig.batch_size, help="deep inversion batch"
    )
    p.add_argument("--no-verify", action="store_true", help="skip checksum checks on load")
    input_shape_arg(p)
    p.add_argument("--out", help="directory to save the merged model")
    p.set_defaults(func=cmd_merge)
    return p


def cmd_merge(args: argparse.Namespace) -> int:
    """``netfold merge A B [C ...]``: several models of one architecture into one, saved."""
    from ..eval.accuracy import evaluate_accuracy
    from ..merge import MergeConfig, merge

    # Every option is checked before any model is loaded.
    check_output(args.out, "--out")
    positive(args, "calib")
    if len(args.models) < 2:
        raise ValueError(f"merge needs at least two models, got {len(args.models)}")
    data_name = no_data(args.data)
    check_dataset(data_name)
    shape_arg = parse_input_shape(args.input_shape)
    if args.repair == "data" and data_name is None:
        raise ValueError("--repair data needs calibration images: pass --data fashion-mnist")
    cfg = MergeConfig(
        method=args.method,
        repair=args.repair,
        width=args.width,
        seed=args.seed,
        zip_layers=args.zip_layers,
        outputs=args.outputs,
        deep_inversion=DeepInversionConfig(
            steps=args.dir_steps, batch_size=args.dir_batch, seed=args.seed
        ),
    )
    models, infos = [], []
    for spec in args.models:
        model, _, info = hub.load(spec, verify=not args.no_verify)
        if info.kind == "tokens":
            raise ValueError(f"{spec}: merge takes traced CNNs / MLPs, not token models")
        models.append(model)
        infos.append(info)
    test, calib = dataset(data_name, args.calib)
    if shape_arg is None and calib is not None:
        shape, note = tuple(calib.shape[1:]), f"from --data {data_name}"
    else:
        shape, note = resolve_input_shape(infos[0], shape_arg)
    example = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
    example = example.to(infos[0].dtype)
    for spec, model in zip(args.models, models):
        check_fits(model, example, f"{spec}: the {note}")
    print(f"input shape {shape} ({note})")
    # ZipIt! matches on activations whenever images are at hand; REPAIR needs them.
    use_data = calib if (args.repair == "data" or args.method == "zipit") else None
    merged, report = merge(models, cfg, example_inputs=example, data=use_data)
    print(report)
    if test is not None and cfg.outputs == "concat":
        print("  accuracy not measured: concatenated heads answer disjoint label sets")
    elif test is not None:
        accs = [evaluate_accuracy(m, *test) for m in models]
        acc = evaluate_accuracy(merged, *test)
        print("  accuracy " + " / ".join(f"{100 * a:.2f}%" for a in accs) + f" -> {100 * acc:.2f}%")
        report.extra.update(accuracy_models=accs, accuracy_merged=acc)
    if args.out:
        hub.save(
            merged, args.out, metadata={"report": report.to_dict(), "input_shape": list(shape)}
        )
        print(f"saved to {args.out}")
    return 0
