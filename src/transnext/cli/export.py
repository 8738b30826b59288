"""``transnext export onnx OUT.onnx``: a classification model to ONNX, checked in onnxruntime.

The weights come from ``--checkpoint PATH`` (a transnext checkpoint rebuilds its own model; plain
weights need ``--model``) or from ``--model NAME --pretrained``. The input size is baked into the
file (default: the weights' size); ``--dynamic-batch`` keeps the batch dimension free.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="format", metavar="FORMAT")
    sub.required = True
    p = sub.add_parser("onnx", help="ONNX file for one input size (onnxruntime check included)",
                       description="Export a classification model to ONNX for one input size and compare onnxruntime with PyTorch.")
    p.add_argument("output", metavar="OUT.onnx", help="file to write")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="NAME", help="variant or variant.tag (e.g. transnext_tiny)")
    g.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="weights file (.pth/.safetensors; a transnext checkpoint records its model)")
    g.add_argument("--pretrained", action="store_true", help="use the published weights of --model")
    g.add_argument("--num-classes", type=int, default=None, help="classifier size (default: from the checkpoint)")
    g.add_argument("--pos-bias", choices=("extrapolate", "interpolate"), default=None, help="position-bias mode")
    g.add_argument("--fixed-pool-size", type=int, default=None, metavar="P", help="linear inference mode with a PxP pooled grid")
    e = p.add_argument_group("export")
    e.add_argument("--img-size", type=int, nargs="+", default=None, metavar="N",
                   help="input size baked into the file: N (square) or H W (default: the weights' size)")
    e.add_argument("--batch-size", type=int, default=1, help="batch of the file (the example batch with --dynamic-batch)")
    e.add_argument("--dynamic-batch", action="store_true", help="keep the batch dimension free (dynamo exporter)")
    e.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto",
                   help="auto: dynamo when onnxscript is installed, else torchscript")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    e.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    e.add_argument("--force", action="store_true", help="overwrite OUT.onnx if it exists")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def _input_size(values: list[int] | None) -> tuple[int, int] | None:
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(f"--img-size takes one size N or two sizes H W (positive), got {' '.join(map(str, values))}")
    return (values[0], values[-1])


def _load(args: argparse.Namespace):
    """The model (eval mode, CPU, float32) and its default input size."""
    from ..checkpoints import download_weights
    from ..engine.modeling import create_model_with_arch, model_from_checkpoint
    from ..models import get_weights

    if args.checkpoint:
        model, info = model_from_checkpoint(args.checkpoint, model=args.model, num_classes=args.num_classes,
                                            pos_bias=args.pos_bias, fixed_pool_size=args.fixed_pool_size, command="export")
        size = (info.get("data_cfg") or {}).get("img_size")
    elif args.model:
        if not args.pretrained:
            raise ValueError("no weights given: pass --checkpoint PATH, or --pretrained to use the published weights of --model")
        weights = get_weights(args.model)
        path = download_weights(weights, local_option="--checkpoint PATH")
        model = create_model_with_arch(args.model, num_classes=args.num_classes or 1000, pos_bias=args.pos_bias or "extrapolate",
                                       fixed_pool_size=args.fixed_pool_size, checkpoint_path=path)
        size = weights.img_size
    else:
        raise ValueError("which model? pass --checkpoint PATH (a transnext checkpoint) or --model NAME --pretrained")
    if size is None:
        size = tuple(model.img_size)
    return model.float().eval(), (size, size) if isinstance(size, int) else tuple(size)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..integrations.onnx import INPUT_NAME, _pick_exporter, export_onnx

    out = Path(args.output)
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"{out}: the output of 'transnext export onnx' must end in .onnx (to convert weights between "
                         ".pth and .safetensors use 'transnext convert')")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    size = _input_size(args.img_size)
    exporter = _pick_exporter(args.exporter)
    if args.dynamic_batch and exporter == "torchscript":
        raise ValueError("--dynamic-batch needs the dynamo exporter (--exporter dynamo, with onnxscript installed: "
                         "pip install 'transnext-pytorch[onnx]'); the torchscript exporter keeps the batch fixed")
    model, default_size = _load(args)
    result = export_onnx(model, out, size or default_size, batch_size=args.batch_size, dynamic_batch=args.dynamic_batch,
                         exporter=exporter, opset=args.opset, check=not args.no_check)
    _, c, h, w = result.input_shape
    batch = "any batch" if args.dynamic_batch else f"batch {result.input_shape[0]}"
    checked = "not checked" if result.max_abs_diff is None else f"onnxruntime matches PyTorch to {result.max_abs_diff:.1e}"
    print(f"wrote {result.path} ({result.exporter} exporter; input {INPUT_NAME!r} {c}x{h}x{w}, {batch}; {checked})")
    return 0
