"""Published reference dense checkpoints (mmdet Mask R-CNN, mmseg UPerNet) as transnext dense checkpoints.

:func:`import_reference_checkpoint` reads one reference file, recognises its layout, builds the
model of the matching recipe (``mask_rcnn_1x_<size>`` in mmdet's test-time mode, or
``upernet_160k_<size>``), loads the weights strictly (:func:`load_reference_checkpoint`) and writes
a checkpoint with the model record, so that ``transnext detect eval|predict`` and ``transnext
segment eval|predict`` take it as they take one of our training runs. ``transnext convert`` calls it
for such files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoints import CheckpointError, _unwrap, atomic_write, safe_torch_load
from ..models.registry import VARIANTS
from .reference_checkpoints import REFERENCE_FORMATS, _classes, _detect, load_reference_checkpoint

__all__ = ["import_reference_checkpoint", "infer_reference_variant", "is_reference_checkpoint"]

# the recipe each reference layout is built with (its size suffix is the variant's)
_RECIPES = {"mmdet_maskrcnn": ("detect", "mask_rcnn_1x"), "mmseg_upernet": ("segment", "upernet_160k")}


def _read(path: str | os.PathLike) -> tuple[Mapping[str, Any], dict[str, Tensor]]:
    raw = safe_torch_load(path, what="reference checkpoint")
    return raw, _unwrap(raw, str(path))


def is_reference_checkpoint(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether a state dict has one of the reference dense layouts of :data:`REFERENCE_FORMATS`."""
    return any(fmt.detect(state_dict) for fmt in REFERENCE_FORMATS.values())


def infer_reference_variant(state_dict: Mapping[str, Tensor]) -> str:
    """The TransNeXt variant of a reference checkpoint's ``backbone.*`` keys (widths and depths)."""
    stem = state_dict.get("backbone.patch_embed1.proj.weight")
    if stem is None:
        raise CheckpointError("no backbone.patch_embed1.proj.weight: cannot tell the backbone variant; pass --variant NAME")
    depths = []
    for stage in range(1, 5):
        found = {int(m.group(1)) for k in state_dict if (m := re.match(rf"backbone\.block{stage}\.(\d+)\.", k))}
        depths.append(max(found) + 1 if found else 0)
    dims = [int(state_dict[f"backbone.patch_embed{i}.proj.weight"].shape[0]) for i in range(1, 5)
            if f"backbone.patch_embed{i}.proj.weight" in state_dict]
    for name, cfg in VARIANTS.items():
        if list(cfg["embed_dims"]) == dims and list(cfg["depths"]) == depths:
            return name
    raise CheckpointError(f"the backbone (widths {dims}, depths {depths}) is none of the published variants; pass --variant NAME")


def import_reference_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, variant: str | None = None,
                                extrapolation: bool = False) -> dict[str, Any]:
    """Convert a reference dense checkpoint ``src`` into a transnext dense checkpoint ``dst`` (``.pth``).

    Args:
        variant: the backbone variant (default: recognised from the backbone's widths and depths).
        extrapolation: UPerNet only: the ``*_ms_extrapolation`` configs (extrapolated position bias).

    Returns:
        ``{"kind", "variant", "task", "num_classes", "classes", "path"}``.
    """
    from .config import DetectionConfig, SegmentationConfig, resolve_dense_config
    from .modeling import build_dense_model, dense_arch

    dst = Path(dst)
    if dst.suffix.lower() != ".pth":
        raise ValueError(f"a converted detection / segmentation checkpoint is written as .pth (got {dst.name!r}); "
                         "it holds the model record the dense commands read")
    raw, state_dict = _read(src)
    kind = _detect(state_dict, str(src))
    task, recipe_stem = _RECIPES[kind]
    variant = variant or infer_reference_variant(state_dict)
    size = variant.removeprefix("transnext_")
    recipe = f"{recipe_stem}_{size}" if size in ("tiny", "small", "base") else f"{recipe_stem}_tiny"
    overrides: dict[str, Any] = {"model": variant, "backbone_weights": None, "pretrained": False}
    names = _classes(raw)
    if task == "detect":
        num_classes = int(state_dict["roi_head.bbox_head.fc_cls.weight"].shape[0])  # mmdet: K + background
        cfg = resolve_dense_config(DetectionConfig, recipe, None, overrides, require_data=False)
        arch = dict(dense_arch(cfg, num_classes, "detect"), reference=True)
        classes = ["__background__", *names] if names else None
        data_cfg: dict[str, Any] = {"format": "coco"}
    else:
        num_classes = int(state_dict["decode_head.conv_seg.weight"].shape[0])
        if extrapolation:
            overrides.update(dense_preset="upernet_extrapolation", pos_bias="extrapolate")
        cfg = resolve_dense_config(SegmentationConfig, recipe, None, overrides, require_data=False)
        arch = dense_arch(cfg, num_classes, "segment")
        classes = names
        data_cfg = {"format": cfg.data_format, "foreground_only": False, "resize_scale": [int(s) for s in cfg.resize_scale],
                    "crop_size": cfg.crop_size, "ignore_index": cfg.ignore_index, "eval_mode": cfg.eval_mode,
                    "eval_stride": cfg.eval_stride}
    if classes is not None and len(classes) != num_classes:
        classes = None  # the names do not fit the head: the dense commands number the classes instead
    model = build_dense_model(arch)
    load_reference_checkpoint(model, state_dict)  # strict: one error naming every key problem
    record = {"model": model.state_dict(), "arch": arch, "classes": classes, "data_cfg": data_cfg,
              "task": task, "source": {"kind": kind, "file": Path(src).name}}
    atomic_write(dst, lambda tmp: torch.save(record, tmp))
    return {"kind": kind, "variant": variant, "task": task, "num_classes": num_classes, "classes": classes, "path": str(dst)}
