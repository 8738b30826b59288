"""``transnext segment train|eval|predict|demo``: UPerNet on TransNeXt (ADE20K format or images + masks)."""

from __future__ import annotations

import argparse

from ._dense import add_common_flags, add_demo_parser, add_predict_flags, add_train_parser, report_predictions, run_train

TASK = "segment"


def _add_inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=("whole", "slide"), default=None, help="inference mode (default: as trained)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="R",
                   help="multi-scale ratios, e.g. 0.5 0.75 1.0 1.25 1.5 1.75 (reference MS testing)")
    p.add_argument("--flip", action="store_true", help="add horizontally flipped passes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    add_train_parser(sub, TASK)

    p = sub.add_parser("eval", help="mIoU / mAcc / aAcc / per-class IoU of a checkpoint on a data split",
                       description="mIoU / mAcc / aAcc / per-class IoU (whole, sliding-window or multi-scale + flip inference)")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="best.pth / last.pth of 'transnext segment train'")
    p.add_argument("--data-dir", required=True, metavar="DIR", help="images/<split>/ and annotations/<split>/")
    p.add_argument("--split", default="validation", help="split name (default: validation, as ADE20K)")
    p.add_argument("--data-format", choices=("ade20k", "masks"), default=None, help="label convention (default: as trained)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: as trained, 341)")
    p.add_argument("--crop", type=int, default=None, help="sliding-window size (default: the training crop)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--output", default=None, metavar="DIR", help="write eval.json and eval.md here")
    _add_inference_flags(p)
    add_common_flags(p)

    p = sub.add_parser("predict", help="colour-coded label maps with a legend for images or folders (+ label PNGs, JSON)")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--checkpoint", required=True, metavar="PATH")
    p.add_argument("--output", default="runs/segment_predict", metavar="DIR")
    _add_inference_flags(p)
    add_predict_flags(p)
    add_common_flags(p, amp=False, strict=False)

    add_demo_parser(sub, TASK)


def run(args: argparse.Namespace) -> int:
    from ..dense import workflow

    if args.action == "train":
        return run_train(args, TASK)
    if args.action == "eval":
        res = workflow.evaluate_segmentation(args.checkpoint, args.data_dir, args.split, args.mode, args.stride, args.crop, args.scales,
                                             args.flip, args.data_format, None, args.device, args.amp, args.strict_data, args.num_workers,
                                             args.output, progress=not args.no_progress)
        print(workflow.segmentation_markdown(res["metrics"], f"{args.data_dir} / {args.split} ({res['mode']})"), end="")
        if res["metrics"].get("skipped"):
            print(f"skipped images: {res['metrics']['skipped']} (see the warnings above; --strict-data makes this an error)")
        return 0
    if args.action == "predict":
        records = workflow.predict_segmentation(args.checkpoint, args.inputs, args.output, args.mode, args.scales, args.flip, args.device,
                                                args.batch_size, progress=not args.no_progress)

        def line(r: dict) -> str:
            top = sorted(r["classes"].items(), key=lambda kv: -kv[1])[:4]
            return f"{r['path']}: " + ", ".join(f"{name} {100 * share:.0f}%" for name, share in top)

        return report_predictions(records, line, args.output, "overlays, label maps and predictions.json")
    if args.action == "demo":
        from ..engine.trainer import TrainingInterrupted

        try:
            if args.model != "upernet" and args.output == "runs/segment_demo":
                args.output = f"runs/segment_demo_{args.model}"  # the default folder of that demo's recipe
            workflow.segmentation_demo(args.output, args.epochs, args.resume, not args.no_progress, args.config, args.num_predict,
                                       model=args.model)
        except TrainingInterrupted as e:
            import sys

            print(f"demo interrupted; resumable checkpoint saved: {e.checkpoint}\n"
                  f"continue with: transnext segment demo{'' if args.model == 'upernet' else ' --model ' + args.model} "
                  f"--output {args.output} --resume auto", file=sys.stderr)
            return 130
        return 0
    raise ValueError(f"unknown action {args.action!r}")
