"""Options shared by ``transnext eval`` and ``transnext predict``: which model, which weights."""

from __future__ import annotations

import argparse
from typing import Any


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help="variant or variant.tag (e.g. transnext_tiny, transnext_small.in1k_384)")
    g.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="weights file (.pth/.safetensors; a transnext training checkpoint records its model)")
    g.add_argument("--pretrained", action="store_true", help="use the published weights of --model")
    g.add_argument("--num-classes", type=int, default=None, help="classifier size (default: from the checkpoint)")
    g.add_argument("--img-size", type=int, default=None, help="input size (default: the weights' size)")
    g.add_argument("--pos-bias", choices=("extrapolate", "interpolate"), default=None, help="position-bias mode")
    g.add_argument("--fixed-pool-size", type=int, default=None, metavar="P",
                   help="linear inference mode with a PxP pooled grid (paper: 7)")
    g.add_argument("--crop-pct", type=float, default=None, help="centre-crop fraction (default: 0.875 below 384, none at >= 384)")
    g.add_argument("--interpolation", default=None, help="resize interpolation (default: the weights' setting, bicubic)")
    g.add_argument("--attn-backend", default=None, help="attention backend: auto, reference, torch, triton")
    s = parser.add_argument_group("system")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    s.add_argument("--amp", default=None, choices=("auto", "none", "bf16", "fp16"),
                   help="autocast for inference (default: fp16 on CUDA as the reference evaluation, none on CPU; "
                        "auto: fp16 on CUDA, bf16 on CPU)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--strict-data", action="store_true", help="stop at the first unreadable image instead of skipping it")


def load_model(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Any]:
    """Model (eval mode, on its device), data config for the transforms, and the device."""

    from ..engine.distributed import _pick_device
    from ..engine.modeling import check_image_size, create_model_with_arch, model_from_checkpoint
    from ..models import get_weights

    device = _pick_device(args.device, 0)
    if args.checkpoint:
        model, info = model_from_checkpoint(
            args.checkpoint, model=args.model, num_classes=args.num_classes,
            pos_bias=args.pos_bias, fixed_pool_size=args.fixed_pool_size, attn_backend=args.attn_backend,
            command=getattr(args, "command", None),
        )
    elif args.model:
        if not args.pretrained:
            raise ValueError("no weights given: pass --checkpoint PATH, or --pretrained to use the published weights of --model")
        from ..checkpoints import download_weights

        # Downloaded here rather than by pretrained=True so that a failure names this command's flag.
        weights_path = download_weights(get_weights(args.model), local_option="--checkpoint PATH")
        model = create_model_with_arch(
            args.model, num_classes=args.num_classes or 1000, pos_bias=args.pos_bias or "extrapolate",
            fixed_pool_size=args.fixed_pool_size, attn_backend=args.attn_backend, checkpoint_path=weights_path,
        )
        info = {}
    else:
        raise ValueError("which model? pass --checkpoint PATH (a transnext checkpoint) or --model NAME --pretrained")
    data_cfg = dict(info.get("data_cfg") or {})
    if not data_cfg:
        try:
            w = get_weights(model.arch["model"])
            data_cfg = dict(img_size=w.img_size, crop_pct=None, interpolation=w.interpolation, mean=list(w.mean), std=list(w.std))
        except ValueError:
            data_cfg = dict(img_size=224, crop_pct=None, interpolation="bicubic")
    if args.img_size:
        data_cfg["img_size"] = args.img_size
        if not info.get("data_cfg"):
            data_cfg["crop_pct"] = None  # the published rule for the new size
    if args.crop_pct is not None:
        data_cfg["crop_pct"] = args.crop_pct
    if args.interpolation:
        data_cfg["interpolation"] = args.interpolation
    size = int(data_cfg["img_size"])
    check_image_size(model, size)
    model.to(device).eval()
    from ..engine.amp import resolve_amp

    args.amp = resolve_amp(args.amp, device)
    return model, dict(data_cfg, classes=info.get("classes")), device


def eval_transform(data_cfg: dict[str, Any]) -> Any:
    from ..data import build_eval_transform
    from ..preprocessing import IMAGENET_MEAN, IMAGENET_STD

    return build_eval_transform(
        int(data_cfg["img_size"]), data_cfg.get("crop_pct"), data_cfg.get("interpolation") or "bicubic",
        tuple(data_cfg.get("mean") or IMAGENET_MEAN), tuple(data_cfg.get("std") or IMAGENET_STD),
    )
