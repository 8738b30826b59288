"""Pieces shared by ``transnext detect`` and ``transnext segment``: the ``train`` action and common flags."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _config_cls(task: str) -> Any:
    from ..dense.config import DetectionConfig, SegmentationConfig

    return DetectionConfig if task == "detect" else SegmentationConfig


def add_common_flags(p: argparse.ArgumentParser, amp: bool = True, strict: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    if amp:
        p.add_argument("--amp", default=None, choices=("auto", "none", "bf16", "fp16"), help="autocast for inference (default: none)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if strict:
        p.add_argument("--strict-data", action="store_true",
                       help="stop at the first unusable annotation, image or label map instead of skipping and counting it")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks instead of one-line errors")


def add_predict_flags(p: argparse.ArgumentParser) -> None:
    """``--batch-size`` and the progress switch of ``predict``."""
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (images of one size are batched together)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def report_predictions(records: list[dict[str, Any]], line: Any, output: str, what: str) -> int:
    """Print one line per image (``line(record)``) and the unreadable files; 1 when no image could be read."""
    failed = [r for r in records if "error" in r]
    for r in records:
        print(f"{r['path']}: ERROR {r['error']}" if "error" in r else line(r))
    print(f"{what} in {output}")
    if failed:
        print(f"{len(failed)} of {len(records)} file(s) could not be read as images and were skipped", file=sys.stderr)
    return 1 if records and len(failed) == len(records) else 0


def add_demo_parser(sub: Any, task: str) -> argparse.ArgumentParser:
    """The ``demo`` action; its help quotes the demo recipe itself, so the numbers cannot drift from what runs."""
    from ..dense.config import DENSE_RECIPES

    r = DENSE_RECIPES[f"{task}_demo"]
    if task == "detect":
        what, size = "Mask R-CNN", f"{r['max_size']} px scenes"
    else:
        what, size = "UPerNet", f"{r['crop_size']} px crops"
    text = (f"train and score a small {what} on embedded demo scenes ({r['epochs']} epochs, {size}, batch {r['batch_size']}; "
            "minutes on a CPU)")
    p = sub.add_parser("demo", help=text, description=text)
    p.add_argument("--output", default=f"runs/{task}_demo", metavar="DIR")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (recipe {task}_demo: {r['epochs']})")
    p.add_argument("--config", default=None, metavar="FILE", help=f"YAML/TOML/JSON overrides of the {task}_demo recipe")
    p.add_argument("--resume", default=None, help="continue an interrupted demo ('auto')")
    p.add_argument("--num-predict", type=int, default=6, help="held-out images to draw predictions for")
    if task == "detect":
        d = DENSE_RECIPES["detect_demo_dino"]
        p.add_argument("--model", choices=("mask_rcnn", "dino"), default="mask_rcnn",
                       help=f"detector: mask_rcnn (recipe detect_demo) or dino (recipe detect_demo_dino: {d['epochs']} epochs, "
                            f"{d['max_size']} px, batch {d['batch_size']}; output runs/detect_demo_dino unless --output)")
    else:
        m = DENSE_RECIPES["segment_demo_mask2former"]
        p.add_argument("--model", choices=("upernet", "mask2former"), default="upernet",
                       help=f"segmenter: upernet (recipe segment_demo) or mask2former (recipe segment_demo_mask2former: "
                            f"{m['epochs']} epochs, {m['crop_size']} px crops, batch {m['batch_size']}; output "
                            "runs/segment_demo_mask2former unless --output)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return p


def add_train_parser(sub: Any, task: str) -> None:
    from ..engine.config import add_config_arguments
    from ..recipes import list_recipes, published_text

    recipes = list_recipes(task)  # the registry's training recipes of this task (transnext.recipes)
    published = {k: published_text(k) for k in recipes}
    p = sub.add_parser("train", help="train with a reference recipe or any settings (shared engine: resume, DDP, AMP, curves)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.epilog = ("Precedence: recipe < --config file < flags. Recipes: "
                + "; ".join(k + (f" ({published[k]})" if published[k] else "") for k in recipes)
                + ". All recipes and figures: transnext info --recipes. Multi-process: torchrun --nproc-per-node N -m transnext "
                + task + " train ... Resume: --resume auto.")
    g = p.add_argument_group("recipe")
    g.add_argument("--preset", default=None, metavar="NAME", help=f"reference recipe ({', '.join(recipes)})")
    g.add_argument("--config", default=None, metavar="FILE", help="YAML, TOML or JSON file of options")
    g.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")
    g.add_argument("--callback", action="append", default=[], metavar="MODULE:NAME[:JSON]", help="training callback (repeatable)")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks instead of one-line errors")
    add_config_arguments(p.add_argument_group("options (each overrides the recipe and the config file)"), _config_cls(task))


def run_train(args: argparse.Namespace, task: str) -> int:
    import dataclasses

    from ..dense.config import resolve_dense_config
    from ..dense.train import train_detector, train_segmenter
    from ..engine.trainer import TrainingInterrupted, load_callback

    cls = _config_cls(task)
    names = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in names and k != "preset"}
    # --print-config shows a recipe without needing its data
    cfg = resolve_dense_config(cls, args.preset, args.config, overrides, require_data=not args.print_config)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    callbacks = [load_callback(spec) for spec in args.callback]
    try:
        summary = (train_detector if task == "detect" else train_segmenter)(cfg, callbacks)
    except TrainingInterrupted as e:
        print(f"training interrupted; resumable checkpoint saved: {e.checkpoint}\n"
              f"continue with: transnext {task} train --config {cfg.output}/config.yaml --resume auto", file=sys.stderr)
        return 130
    best = summary["best_metrics"]
    key = summary["best_metric"]
    msg = f"done in {summary['time_s']:.0f} s: {summary['global_step']} steps"
    if key in best:
        msg += f"; best val {key} {best[key]:.2f} (step {best.get('global_step')})"
    print(msg + f"; checkpoints in {summary['output']}")
    return 0
