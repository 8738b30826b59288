"""``transnext detect train|eval|predict|demo``: Mask R-CNN / RetinaNet / FCOS / DINO on TransNeXt (COCO format)."""

from __future__ import annotations

import argparse

from ..dense.config import DEFAULT_SCORE_THRESH
from ._dense import add_common_flags, add_demo_parser, add_predict_flags, add_train_parser, report_predictions, run_train

TASK = "detect"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    add_train_parser(sub, TASK)

    p = sub.add_parser("eval", help="COCO box / mask AP of a checkpoint on a data split",
                       description="COCO box / mask AP (pycocotools), per-class AP table")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="best.pth / last.pth of 'transnext detect train'")
    p.add_argument("--data-dir", required=True, metavar="DIR",
                   help="COCO layout: images/<split>/ or <split>/, annotations/instances_<split>.json")
    p.add_argument("--split", default="val2017", help="split name (default: val2017)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--output", default=None, metavar="DIR", help="write eval.json and eval.md here")
    add_common_flags(p)

    p = sub.add_parser("predict", help="boxes, labels, scores and masks for images or folders (overlay PNGs + JSON)")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--checkpoint", required=True, metavar="PATH")
    p.add_argument("--output", default="runs/detect_predict", metavar="DIR")
    p.add_argument("--score-thresh", type=float, default=None,
                   help=f"lowest score drawn and listed (default: {DEFAULT_SCORE_THRESH}, as the demo)")
    add_predict_flags(p)
    add_common_flags(p, amp=False, strict=False)

    add_demo_parser(sub, TASK)


def run(args: argparse.Namespace) -> int:
    from ..dense import workflow

    if args.action == "train":
        return run_train(args, TASK)
    if args.action == "eval":
        res = workflow.evaluate_detection(args.checkpoint, args.data_dir, args.split, args.batch_size, args.device, args.amp,
                                          args.strict_data, args.num_workers, args.output, progress=not args.no_progress)
        print(workflow.detection_markdown(res["coco"], f"{args.data_dir} / {args.split}"), end="")
        if res["data"]["skipped"]:
            print(f"skipped while reading the annotations: {res['data']['skipped']}")
        return 0
    if args.action == "predict":
        records = workflow.predict_detection(args.checkpoint, args.inputs, args.output, args.score_thresh, args.device,
                                             args.batch_size, progress=not args.no_progress)

        def line(r: dict) -> str:
            found = ", ".join(f"{d['label']} {d['score']:.2f}" for d in r["detections"]) or "nothing above the threshold"
            return f"{r['path']}: {found}"

        return report_predictions(records, line, args.output, "overlays and predictions.json")
    if args.action == "demo":
        from ..engine.trainer import TrainingInterrupted

        try:
            if args.model != "mask_rcnn" and args.output == "runs/detect_demo":
                args.output = f"runs/detect_demo_{args.model}"  # the default folder of that demo's recipe
            workflow.detection_demo(args.output, args.epochs, args.resume, not args.no_progress, args.config, args.num_predict,
                                    model=args.model)
        except TrainingInterrupted as e:
            import sys

            print(f"demo interrupted; resumable checkpoint saved: {e.checkpoint}\n"
                  f"continue with: transnext detect demo --output {args.output} --resume auto", file=sys.stderr)
            return 130
        return 0
    raise ValueError(f"unknown action {args.action!r}")
