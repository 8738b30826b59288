"""``transnext demo``: the whole job on the embedded data set, in minutes on a CPU.

Trains the ``demo`` preset (a small TransNeXt on 28x28 animal silhouettes upsampled to 32x32,
10 classes) through the same code as an ImageNet run, selecting ``best.pth`` on a validation
split carved out of the training images; evaluates ``best.pth`` with the ``eval`` code on the
held-out test split (written as an image folder), which training never saw; reports a pixel
1-nearest-neighbour classifier and chance beside it; and predicts a few held-out images with the
``predict`` code. Everything lands in ``--output``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo", help="output folder")
    from ..engine.presets import PRESETS

    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs (preset: {PRESETS['demo']['epochs']})")
    parser.add_argument("--num-predict", type=int, default=10, help="held-out images to predict")
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML/TOML/JSON overrides of the demo preset")
    parser.add_argument("--resume", default=None, help="continue an interrupted demo run ('auto')")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoints import atomic_write
    from ..data import find_images, write_demo_images
    from ..data.demo import DEMO_CLASSES, demo_dataset, demo_split, nearest_neighbour_top1
    from ..engine.config import resolve_config
    from ..engine.evaluate import markdown_table, run_benchmark
    from ..engine.modeling import model_from_checkpoint
    from ..engine.predict import class_names_for, predict_images
    from ..engine.trainer import TrainingInterrupted, train
    from ._common import eval_transform

    t0 = time.perf_counter()
    out = Path(args.output)
    overrides: dict = {"output": str(out)}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.resume:
        overrides["resume"] = args.resume
    if args.no_progress:
        overrides["progress"] = False
    cfg = resolve_config("demo", args.config, overrides)
    n_train, n_val, n_test = (len(demo_split(s)[1]) for s in ("train", "val", "test"))
    print(f"[1/3] training a {cfg.model}-style demo model on the embedded animal silhouettes "
          f"({cfg.epochs} epochs, {cfg.img_size}x{cfg.img_size}; {n_train} training images, best.pth selected on "
          f"{n_val} validation images) -> {out}", file=sys.stderr, flush=True)
    try:
        summary = train(cfg)
    except TrainingInterrupted as e:
        print(f"demo interrupted; resumable checkpoint saved: {e.checkpoint}\n"
              f"continue with: transnext demo --output {out} --resume auto", file=sys.stderr)
        return 130
    t_train = time.perf_counter() - t0

    print(f"[2/3] evaluating best.pth on the {n_test} held-out test images (written as an image folder)",
          file=sys.stderr, flush=True)
    test_dir = out / "heldout_test"
    if not test_dir.exists():
        ds = demo_dataset("test")
        for c in ds.classes:
            (test_dir / c).mkdir(parents=True, exist_ok=True)
        from PIL import Image

        for i in range(len(ds)):
            Image.fromarray(ds.images[i]).save(test_dir / ds.classes[ds.labels[i]] / f"{i:05d}.png")
    model, info = model_from_checkpoint(out / "best.pth")
    model.eval()
    data_cfg = dict(info["data_cfg"])
    tf = eval_transform(data_cfg)
    res = run_benchmark(model, test_dir, "folder", tf, batch_size=128, num_workers=0, classes=info["classes"],
                        progress=not args.no_progress)
    # the figure a trained model should beat: nearest training image in pixel space
    baseline = nearest_neighbour_top1(demo_split("train"), demo_split("test"))
    table = markdown_table([res], title="demo: held-out test split") + (
        f"\nBaselines on the same {res['n']} images: pixel 1-nearest-neighbour (over the training images) "
        f"{baseline:.2f}% top-1, chance {100 / len(DEMO_CLASSES):.0f}%.\n")
    atomic_write(out / "eval.md", lambda tmp: Path(tmp).write_text(table))

    print(f"[3/3] predicting {args.num_predict} held-out images", file=sys.stderr, flush=True)
    pred_dir = out / "predict_images"
    write_demo_images(pred_dir, n=args.num_predict, split="test", scale=4)
    classes = class_names_for(model.num_classes, info["classes"])
    preds = predict_images(model, find_images([pred_dir]), tf, classes, topk=3)
    lines = []
    n_right = 0
    for r in preds:
        truth = Path(r["path"]).stem.split("_", 1)[1]
        top = r["predictions"][0]
        n_right += top["label"] == truth
        lines.append(f"  {Path(r['path']).name:<18} -> {top['label']:<9} {100 * top['prob']:5.1f}%   (true: {truth})")
    total = time.perf_counter() - t0
    chance = 100 / len(classes)
    best = summary["best_metrics"]
    result = {
        "test_top1": res["top1"], "test_top5": res["top5"], "test_loss": res["loss"], "test_images": res["n"],
        "pixel_1nn_top1": baseline, "chance_top1": chance, "val_top1": best.get("top1"), "val_images": best.get("n"),
        "train_images": n_train, "train_time_s": t_train, "total_time_s": total,
        "best_epoch": best.get("epoch", 0) + 1, "epochs": cfg.epochs,
        "checkpoint": str(out / "best.pth"), "last_checkpoint": str(out / "last.pth"),
        "metrics": str(out / "metrics.jsonl"), "curves": str(out / "curves.png"), "predictions": preds,
        "predicted_correctly": n_right,
    }
    text = json.dumps(result, indent=2)
    atomic_write(out / "demo_summary.json", lambda tmp: Path(tmp).write_text(text))
    print(table, end="")
    print("predictions on held-out images:")
    print("\n".join(lines))
    print(f"\nheld-out test top-1 {res['top1']:.2f}% on {res['n']} images (best.pth: epoch {result['best_epoch']}, "
          f"selected on {best.get('n', 0)} validation images, val top-1 {best.get('top1', float('nan')):.2f}%)")
    print(f"baselines on the same test images: pixel 1-nearest-neighbour {baseline:.2f}%, chance {chance:.0f}%")
    print(f"{n_right}/{len(preds)} shown predictions right; total {total / 60:.1f} min "
          f"(training {t_train / 60:.1f} min)")
    print(f"outputs: {out}/best.pth, last.pth, metrics.jsonl, curves.png, eval.md, demo_summary.json")
    return 0
