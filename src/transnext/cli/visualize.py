"""``transnext visualize``: effective receptive fields, aggregated-attention maps, class activation maps."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..preprocessing import IMAGENET_MEAN, IMAGENET_STD


def _common(p: argparse.ArgumentParser, out: str, img_size: int | None = 224) -> None:
    if img_size is None:
        p.add_argument("--img-size", type=int, default=None,
                       help="input size (default: the checkpoint's, as 'transnext predict'; 224 for other weights)")
    else:
        p.add_argument("--img-size", type=int, default=img_size, help=f"images are resized to this square size (default {img_size})")
    p.add_argument("--out", default=out, metavar="FILE.png", help=f"figure to write (default {out})")
    p.add_argument("--seed", type=int, default=0, help="seed of randomly initialised weights (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--pretrained", action="store_true", help="use published weights (downloaded; default: random initialisation)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="transnext variant (default: the model a transnext checkpoint records, else transnext_tiny)")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="weights file (a transnext training checkpoint records its model)")
    p.add_argument("--fixed-pool-size", type=int, default=None, metavar="P", help="linear inference mode with a PxP pooled grid")
    p.add_argument("--pos-bias", choices=("extrapolate", "interpolate"), default=None, help="position-bias mode")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)

    p = sub.add_parser("erf", help="effective receptive fields of one or more models, side by side",
                       description="Effective receptive field (Luo et al. 2016): mean |d centre unit / d input| over images, "
                                   "log-scaled; prints the area ratios holding 20/50/80/99% of the mass.")
    p.add_argument("--models", nargs="+", default=["transnext_tiny"], metavar="NAME[=PATH]",
                   help="transnext variants or timm model names, optionally with a weights file (default transnext_tiny)")
    p.add_argument("--images", nargs="+", default=None, metavar="IMAGE_OR_DIR",
                   help="images and/or folders (default: the embedded demo images)")
    p.add_argument("--num-images", type=int, default=8, help="images to average over (default 8)")
    p.add_argument("--stage", type=int, default=-1, help="stage whose output is measured, 0-based; -1 = last (default)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", action="store_true", help="print the area ratios as JSON")
    _common(p, "erf.png")

    p = sub.add_parser("attention", help="aggregated-attention weights of query pixels: fovea and periphery",
                       description="Attention weights of one aggregated-attention layer for query pixels, split into the "
                                   "local window (fovea) and the pooled keys (periphery), per head and averaged.")
    _model_options(p)
    p.add_argument("--image", default=None, metavar="FILE", help="image file (default: the first embedded demo image)")
    p.add_argument("--query", nargs=2, type=int, action="append", metavar=("Y", "X"),
                   help="query pixel (row, column) in the resized image; repeat for several (default: the centre)")
    p.add_argument("--query-grid", type=int, default=None, metavar="N", help="an N x N grid of query pixels instead")
    p.add_argument("--stage", type=int, default=0, help="stage, 0-based (default 0)")
    p.add_argument("--block", type=int, default=-1, help="block in the stage, 0-based; -1 = last (default)")
    p.add_argument("--img-height", type=int, default=None, metavar="H", help="non-square input: height (width = --img-size)")
    _common(p, "attention.png")

    p = sub.add_parser("cam", help="class activation maps (Grad-CAM and a gradient-free method) with top-k labels",
                       description="Class activation maps of a transnext classifier through the grad-cam package.")
    _model_options(p)
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR", help="images and/or folders (default: the embedded demo images)")
    p.add_argument("--images", nargs="+", default=None, metavar="IMAGE_OR_DIR", help="more images and/or folders")
    p.add_argument("--num-images", type=int, default=4, help="images drawn, one row each (default 4)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the checkpoint's, else 1000)")
    p.add_argument("--methods", nargs="+", default=["gradcam", "eigencam"], help="gradcam, gradcam++, layercam, eigencam, scorecam")
    p.add_argument("--stage", type=int, default=-1, help="stage whose output is explained, 0-based; -1 = last (default)")
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--target", type=int, default=None, help="class index to explain (default: each image's top-1)")
    _common(p, "cam.png", img_size=None)


def run(args: argparse.Namespace) -> int:
    from ..visualize._common import require

    try:
        require("matplotlib")
        if args.what == "cam":
            require("pytorch_grad_cam", "grad-cam")
    except ImportError as e:
        raise RuntimeError(str(e)) from None
    import torch

    torch.manual_seed(args.seed)
    return {"erf": _erf, "attention": _attention, "cam": _cam}[args.what](args)


def _device(args: argparse.Namespace):
    from ..engine.distributed import _pick_device

    return _pick_device(args.device, 0)


def _weights_note(args: argparse.Namespace, specs: list[str]) -> None:
    if not args.pretrained and not getattr(args, "checkpoint", None) and not all("=" in s for s in specs):
        # erf names its weights per model (--models NAME=PATH); the other views take --checkpoint
        how = "--models NAME=PATH" if args.what == "erf" else "--checkpoint PATH"
        print(f"note: randomly initialised weights (pass {how} or --pretrained for trained ones)", file=sys.stderr)


def _erf(args: argparse.Namespace) -> int:
    from ..visualize import effective_receptive_field, load_images, load_model
    from ..visualize.plot import plot_erf

    images = load_images(args.images, args.img_size, args.num_images)
    _weights_note(args, args.models)
    device = _device(args)
    results = []
    for spec in args.models:
        torch_seed(args.seed)
        lm = load_model(spec, pretrained=args.pretrained)
        lm.model.to(device)
        r = effective_receptive_field(lm.model, images, args.stage, args.batch_size, lm.name, lm.mean, lm.std)
        results.append(r)
        lm.model.cpu()
    path = plot_erf(results, args.out)
    if args.json:
        print(json.dumps({r.name: {f"{int(round(100 * t))}%": v for t, v in r.area_ratios.items()} for r in results}, indent=2))
    else:
        print(f"ERF over {images.pixels.shape[0]} image(s) at {args.img_size}x{args.img_size}: "
              "area ratio of the centred square holding 20/50/80/99% of the mass")
        for r in results:
            print(f"  {r.name:24s} stage {r.stage}: " + "  ".join(f"{v:.4f}" for v in r.area_ratios.values()))
    print(f"wrote {path}")
    return 0


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)  # each model starts from the same seed, whatever was built before it


def _attention(args: argparse.Namespace) -> int:
    from ..visualize import attention_maps, load_images, query_grid
    from ..visualize.plot import plot_attention

    if args.query and args.query_grid:
        raise ValueError("pass either --query or --query-grid, not both")
    size = (args.img_height or args.img_size, args.img_size)
    images = load_images([args.image] if args.image else None, size, 1)
    lm = _load_transnext(args)
    lm.model.to(_device(args))
    if args.query_grid:
        queries = query_grid(size, args.query_grid)
    else:
        queries = [tuple(q) for q in args.query] if args.query else [(size[0] // 2, size[1] // 2)]
    maps = attention_maps(lm.model, images.normalized(lm.mean, lm.std)[0], queries, args.stage, args.block)
    fovea = maps.fovea_mass()
    for i, q in enumerate(maps.queries):
        heads = " ".join(f"{v:.3f}" for v in fovea[i].tolist())
        print(f"query {q} -> token {tuple(maps.tokens[i].tolist())}: fovea weight {fovea[i].mean():.3f} "
              f"(per head {heads}), periphery {1 - fovea[i].mean():.3f}")
    mode = f", linear mode P={args.fixed_pool_size}" if args.fixed_pool_size else ""
    path = plot_attention(images.pixels[0], maps, args.out, title=f"{lm.name}{mode}")
    print(f"wrote {path}")
    return 0


def _load_transnext(args: argparse.Namespace):
    from ..visualize import load_model

    kwargs = dict(fixed_pool_size=args.fixed_pool_size, pos_bias=args.pos_bias)
    if getattr(args, "num_classes", None):
        kwargs["num_classes"] = args.num_classes
    if args.checkpoint and args.model is None:
        # the model the checkpoint records (naming one would rebuild that variant instead)
        from ..engine.modeling import model_from_checkpoint
        from ..visualize._common import LoadedModel

        model, info = model_from_checkpoint(args.checkpoint, **{k: v for k, v in kwargs.items() if v is not None})
        dc = info.get("data_cfg") or {}
        lm = LoadedModel(model.eval(), model.arch["model"], tuple(dc.get("mean") or IMAGENET_MEAN), tuple(dc.get("std") or IMAGENET_STD),
                         info.get("classes"))
    else:
        if args.model is None:
            args.model = "transnext_tiny"
        _weights_note(args, [args.model])
        lm = load_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, **kwargs)
    from ..models.transnext import TransNeXt

    if not isinstance(lm.model, TransNeXt):
        raise ValueError(f"{args.model!r} is not a transnext model (this view needs one)")
    return lm


def _names(paths: list[str]) -> list[str]:
    """File stems, with their folder where stems repeat (img_0 in several class folders)."""
    stems = [Path(p).stem for p in paths]
    return [f"{Path(p).parent.name}/{s}" if stems.count(s) > 1 else s for p, s in zip(paths, stems)]


def _cam_inputs(args: argparse.Namespace) -> tuple[Any, Any, list[str], Any]:
    """Model, its normalised inputs, their names and the pixels drawn.

    With trained weights (--checkpoint, --pretrained) the model, classes and the whole eval
    transform (size, crop, interpolation, mean / std) come from ``transnext predict``'s loader,
    so the labels shown are the ones ``predict`` gives for the same images.
    """
    import torch
    from PIL import Image

    from ..data import find_images, load_image
    from ..visualize import load_images
    from ._common import eval_transform, load_model

    sources = list(args.inputs or []) + list(args.images or [])
    if args.checkpoint or args.pretrained:
        ns = argparse.Namespace(**{**dict(attn_backend=None, crop_pct=None, interpolation=None, amp="none", command="visualize"),
                                   **vars(args)})
        if not ns.checkpoint and not ns.model:
            ns.model = "transnext_tiny"
        model, data_cfg, device = load_model(ns)
        from ..visualize._common import LoadedModel

        lm = LoadedModel(model, model.arch["model"], tuple(data_cfg.get("mean") or IMAGENET_MEAN),
                         tuple(data_cfg.get("std") or IMAGENET_STD), data_cfg.get("classes"))
        tf = eval_transform(data_cfg)
        if sources:
            paths = find_images(sources)[: args.num_images]
            pil, names = [load_image(p) for p in paths], _names(paths)
        else:  # the embedded demo images at their own 28 px, then the same transform as a file
            demo = load_images(None, 28, args.num_images)
            pil = [Image.fromarray((t.permute(1, 2, 0) * 255).round().byte().numpy()) for t in demo.pixels]
            names = demo.names
        x = torch.stack([tf(img) for img in pil])
        mean, std = (torch.tensor(v, dtype=x.dtype).view(1, -1, 1, 1) for v in (lm.mean, lm.std))
        return lm, x, names, (x * std + mean).clamp(0, 1)
    size = args.img_size or 224
    images = load_images(sources or None, size, args.num_images)
    lm = _load_transnext(args)
    lm.model.to(_device(args))
    return lm, images.normalized(lm.mean, lm.std), images.names, images.pixels


def _cam(args: argparse.Namespace) -> int:
    from ..engine.predict import class_names_for
    from ..visualize.cam import CAM_METHODS, class_activation_maps
    from ..visualize.plot import plot_cam

    unknown = [m for m in args.methods if m not in CAM_METHODS]
    if unknown:  # before any model is built
        raise ValueError(f"unknown CAM method(s) {unknown}; choose from {', '.join(CAM_METHODS)}")
    lm, x, names, pixels = _cam_inputs(args)
    from ..models.transnext import TransNeXt

    if not isinstance(lm.model, TransNeXt):
        raise ValueError(f"{lm.name!r} is not a transnext model (class activation maps need one)")
    targets = [args.target] * x.shape[0] if args.target is not None else None
    results = class_activation_maps(lm.model, x, args.methods, args.stage, targets, args.topk)
    classes = class_names_for(lm.model.num_classes, lm.classes)
    for name, r in zip(names, results):
        print(f"{name}: " + ", ".join(f"{classes[c]} {100 * p:.1f}%" for c, p in r.topk))
    path = plot_cam(pixels, results, classes, args.out, names)
    print(f"wrote {path}")
    return 0
