"""``transnext predict``: top-k labels and probabilities for images and folders."""

from __future__ import annotations

import argparse
import json
import sys

from ._common import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders (searched recursively)")
    add_model_arguments(parser)
    o = parser.add_argument_group("output")
    o.add_argument("--topk", type=int, default=5, help="labels per image")
    o.add_argument("--json", action="store_true", help="print JSON instead of text")
    o.add_argument("--output", default=None, metavar="FILE.json", help="also write the JSON to this file")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoints import atomic_write
    from ..data import find_images
    from ..engine.predict import class_names_for, predict_images
    from ._common import eval_transform, load_model

    if args.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    paths = find_images(args.inputs)
    model, data_cfg, device = load_model(args)
    classes = class_names_for(model.num_classes, data_cfg.get("classes"))
    results = predict_images(
        model, paths, eval_transform(data_cfg), classes, topk=args.topk, batch_size=args.batch_size, device=device,
        amp=args.amp, strict=args.strict_data, progress=not args.json,
    )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['path']}: ERROR {r['error']}")
                continue
            top = ", ".join(f"{p['label']} {100 * p['prob']:.1f}%" for p in r["predictions"])
            print(f"{r['path']}: {top}")
    if args.output:
        text = json.dumps(results, indent=2)
        atomic_write(args.output, lambda tmp: Path(tmp).write_text(text))
    failed = sum("error" in r for r in results)
    if failed:
        print(f"{failed} of {len(results)} image(s) could not be read", file=sys.stderr)
    return 1 if failed == len(results) else 0
