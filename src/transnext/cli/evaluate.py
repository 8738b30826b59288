"""``transnext eval``: accuracy on image folders and the ImageNet robustness benchmarks."""

from __future__ import annotations

import argparse
import json
import sys

from ._common import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data", nargs="+", metavar="[BENCHMARK=]PATH",
        help="folders to evaluate; BENCHMARK is one of folder, imagenet-a, imagenet-r, imagenet-sketch, imagenet-v2, "
             "imagenet-c (default: guessed from the folder name, else folder)",
    )
    add_model_arguments(parser)
    o = parser.add_argument_group("output")
    o.add_argument("--output", default=None, metavar="FILE.json", help="write the results as JSON (and a .md table beside it)")
    o.add_argument("--num-workers", type=int, default=4)
    o.add_argument("--no-progress", action="store_true")


def _parse_spec(spec: str) -> tuple[str, str]:
    from ..engine.evaluate import BENCHMARKS

    kind, sep, path = spec.partition("=")
    if sep and kind in BENCHMARKS:
        return kind, path
    return "auto", spec


def _finite(obj):
    """NaN/inf (e.g. no images) -> null, so the file is valid JSON."""
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoints import atomic_write
    from ..engine.evaluate import markdown_table, run_benchmark
    from ._common import eval_transform, load_model

    specs = [_parse_spec(s) for s in args.data]
    for _, path in specs:
        if not Path(path).exists():
            raise FileNotFoundError(f"evaluation folder not found: {path}")
    model, data_cfg, device = load_model(args)
    tf = eval_transform(data_cfg)
    results = []
    for kind, path in specs:
        r = run_benchmark(
            model, path, kind, tf, batch_size=args.batch_size, num_workers=args.num_workers, device=device, amp=args.amp,
            strict=args.strict_data, classes=data_cfg.get("classes"), progress=not args.no_progress,
        )
        results.append(r)
    meta = {
        "model": model.arch, "checkpoint": args.checkpoint, "img_size": data_cfg["img_size"],
        "pos_bias": model.pos_bias, "fixed_pool_size": model.fixed_pool_size, "crop_pct": data_cfg.get("crop_pct"),
    }
    table = markdown_table(results, title=f"{model.arch['model']} @ {data_cfg['img_size']}")
    print(table, end="")
    if args.output:
        out = Path(args.output)
        payload = json.dumps(_finite({**meta, "results": results}), indent=2, default=str)
        atomic_write(out, lambda tmp: Path(tmp).write_text(payload))
        atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(table))
        print(f"results written to {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0
