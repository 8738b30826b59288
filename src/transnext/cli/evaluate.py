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
             "imagenet-c (default: --benchmark)",
    )
    b = parser.add_argument_group("benchmark")
    b.add_argument("--benchmark", default="auto", metavar="NAME",
                   help="benchmark of the folders given without BENCHMARK=: auto (from the folder name, else the layout; "
                        "ambiguous layouts are refused), folder, imagenet-a, imagenet-r, imagenet-sketch, imagenet-v2, imagenet-c")
    b.add_argument("--imagenet-c-protocol", choices=("standard", "model"), default="standard",
                   help="standard: ImageNet-C's own transform (centre crop 224, no resize); model: the model's transform")
    b.add_argument("--clean-top1", type=float, default=None, metavar="PCT",
                   help="the model's clean ImageNet top-1 for ImageNet-C's relative mCE (default: from an ImageNet val "
                        "folder evaluated in the same call)")
    add_model_arguments(parser)
    o = parser.add_argument_group("output")
    o.add_argument("--output", default=None, metavar="FILE.json", help="write the results as JSON (and a .md table beside it)")
    o.add_argument("--num-workers", type=int, default=4)
    o.add_argument("--no-progress", action="store_true")


def _parse_spec(spec: str, default: str = "auto") -> tuple[str, str]:
    from ..engine.evaluate import BENCHMARKS

    kind, sep, path = spec.partition("=")
    if sep and kind in BENCHMARKS:
        return kind, path
    return default, spec


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
    from ..engine.evaluate import BENCHMARKS, add_relative_mce, benchmark_transform, identify_benchmark, markdown_table, run_benchmark
    from ._common import load_model

    if args.benchmark != "auto" and args.benchmark not in BENCHMARKS:
        raise ValueError(f"--benchmark {args.benchmark!r}: choose from auto, {', '.join(BENCHMARKS)}")
    specs = [_parse_spec(s, args.benchmark) for s in args.data]
    for _, path in specs:
        if not Path(path).exists():
            raise FileNotFoundError(f"evaluation folder not found: {path}")
    model, data_cfg, device = load_model(args)
    num_classes = int(getattr(model, "num_classes", 0) or 1000)
    plan = []
    for kind, path in specs:  # identify every folder before evaluating any (an ambiguous one stops here)
        if kind == "auto":
            found = identify_benchmark(path, num_classes)
            kind, how = found.benchmark, found.reason
        else:
            how = "given"
        tf, tf_desc = benchmark_transform(kind, data_cfg, args.imagenet_c_protocol)
        print(f"{path}: {kind} ({how}); transform: {tf_desc}", file=sys.stderr, flush=True)
        plan.append((kind, path, how, tf, tf_desc))
    results = []
    for kind, path, how, tf, tf_desc in plan:
        r = run_benchmark(
            model, path, kind, tf, batch_size=args.batch_size, num_workers=args.num_workers, device=device, amp=args.amp,
            strict=args.strict_data, classes=data_cfg.get("classes"), progress=not args.no_progress,
        )
        r.update(detection=how, transform=tf_desc)
        results.append(r)
    clean = args.clean_top1
    if clean is None:
        clean = next((r["top1"] for r in results if r.get("imagenet_val")), None)
    for r in results:
        if r["benchmark"] == "imagenet-c" and clean is not None:
            add_relative_mce(r, clean)
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
