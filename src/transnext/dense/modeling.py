"""Dense models from a plain ``arch`` record (what checkpoints store) and back from checkpoints.

``arch`` is a JSON-able dict: ``{"task": "detect" | "segment", "variant", "num_classes",
"preset", "backbone": {model arguments}, ...builder arguments}``. :func:`build_dense_model`
turns it into a module; :func:`dense_model_from_checkpoint` reads a ``best.pth`` / ``last.pth``
(``weights_only`` loading) and returns the model with its classes and data settings.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

__all__ = ["build_dense_model", "dense_arch", "dense_model_from_checkpoint"]


def dense_arch(cfg: Any, num_classes: int, task: str) -> dict[str, Any]:
    """The ``arch`` record of a training config (``num_classes`` includes a detector's background)."""
    backbone: dict[str, Any] = dict(cfg.model_kwargs or {})
    backbone.update(img_size=int(cfg.img_size), pos_bias=cfg.pos_bias)
    if cfg.pretrain_size:
        backbone["pretrain_size"] = int(cfg.pretrain_size)
    if cfg.drop_path is not None:
        backbone["drop_path_rate"] = float(cfg.drop_path)
    if cfg.attn_backend:
        backbone["attn_backend"] = cfg.attn_backend
    arch: dict[str, Any] = dict(task=task, variant=cfg.model, num_classes=int(num_classes), preset=cfg.dense_preset,
                                backbone=backbone, frozen_stages=int(cfg.frozen_stages))
    if task == "detect":
        arch.update(detector=cfg.detector, fpn_channels=int(cfg.fpn_channels), min_size=[int(s) for s in cfg.min_size],
                    anchor_sizes=[int(s) for s in cfg.anchor_sizes] or None,
                    max_size=int(cfg.max_size), representation_size=cfg.representation_size,
                    mask_layers=[int(c) for c in cfg.mask_layers] or None, box_score_thresh=float(cfg.box_score_thresh),
                    detections_per_img=int(cfg.detections_per_img), detector_kwargs=dict(cfg.detector_kwargs or {}))
        if cfg.detector == "dino":
            arch.update(num_feature_levels=int(cfg.num_feature_levels), num_queries=int(cfg.num_queries), dn_queries=int(cfg.dn_queries))
    elif getattr(cfg, "segmenter", "upernet") == "mask2former":
        arch.update(segmenter="mask2former", num_queries=int(cfg.num_queries), ignore_index=int(cfg.ignore_index),
                    segmenter_kwargs=dict(cfg.segmenter_kwargs or {}))
    else:
        arch.update(channels=int(cfg.channels), aux_head=bool(cfg.aux_head), aux_channels=int(cfg.aux_channels))
    return arch


def build_dense_model(arch: dict[str, Any], backbone_weights: Any = None, grad_checkpointing: bool = False) -> nn.Module:
    """The detector or segmenter an ``arch`` record describes (random heads; trunk weights optional)."""
    from .detection import fcos_transnext, maskrcnn_transnext, retinanet_transnext
    from .dino import dino_transnext
    from .upernet import upernet_transnext

    backbone = dict(arch.get("backbone") or {})
    if arch["task"] == "segment" and arch.get("segmenter", "upernet") == "mask2former":
        from .mask2former import mask2former_transnext

        model = mask2former_transnext(arch["variant"], arch["num_classes"], backbone_weights, arch.get("preset"),
                                      frozen_stages=arch.get("frozen_stages", -1), num_queries=arch["num_queries"],
                                      ignore_index=arch.get("ignore_index", 255), **dict(arch.get("segmenter_kwargs") or {}), **backbone)
        if grad_checkpointing:
            model.backbone.model.set_grad_checkpointing(True)
        return model
    if arch["task"] == "segment":
        if arch.get("segmenter", "upernet") != "upernet":
            raise ValueError(f"unknown segmenter {arch['segmenter']!r} in the model record (expected 'upernet' or 'mask2former')")
        model = upernet_transnext(arch["variant"], arch["num_classes"], backbone_weights, arch.get("preset"), aux_head=arch["aux_head"],
                                  channels=arch["channels"], aux_channels=arch["aux_channels"], frozen_stages=arch.get("frozen_stages", -1),
                                  **backbone)
        if grad_checkpointing:
            model.backbone.model.set_grad_checkpointing(True)
        return model
    if arch["task"] != "detect":
        raise ValueError(f"unknown dense task {arch['task']!r} in the model record (expected 'detect' or 'segment')")
    kwargs = dict(arch.get("detector_kwargs") or {})
    kwargs.update(min_size=tuple(arch["min_size"]), max_size=arch["max_size"], detections_per_img=arch["detections_per_img"])
    common = dict(num_classes=arch["num_classes"], backbone_weights=backbone_weights, preset=arch.get("preset"),
                  fpn_channels=arch["fpn_channels"], frozen_stages=arch.get("frozen_stages", -1), grad_checkpointing=grad_checkpointing,
                  backbone_kwargs=backbone)
    detector = arch["detector"]
    if arch.get("anchor_sizes") and detector in ("mask_rcnn", "retinanet"):
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        sizes = arch["anchor_sizes"]
        if detector == "retinanet":  # three scales per octave, as torchvision's and mmdet's RetinaNet
            per_level = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes)
        else:
            per_level = tuple((s,) for s in sizes)
        key = "rpn_anchor_generator" if detector == "mask_rcnn" else "anchor_generator"
        kwargs[key] = AnchorGenerator(per_level, ((0.5, 1.0, 2.0),) * len(sizes))
    if detector == "mask_rcnn":
        # torchvision's two-stage detectors name it box_detections_per_img; an unknown keyword would vanish in **kwargs
        kwargs["box_detections_per_img"] = kwargs.pop("detections_per_img")
        if arch.get("reference"):  # a converted mmdet checkpoint: mmdet's test-time computation
            kwargs["reference"] = True
        return maskrcnn_transnext(arch["variant"], representation_size=arch.get("representation_size"),
                                  mask_layers=tuple(arch["mask_layers"]) if arch.get("mask_layers") else None,
                                  box_score_thresh=arch["box_score_thresh"], **common, **kwargs)
    if detector == "retinanet":
        return retinanet_transnext(arch["variant"], score_thresh=arch["box_score_thresh"], **common, **kwargs)
    if detector == "fcos":
        return fcos_transnext(arch["variant"], score_thresh=arch["box_score_thresh"], **common, **kwargs)
    if detector == "dino":
        # the engine's labels are 1..K with 0 = background: DINO has K real classes and shifts its labels by one
        kwargs["max_per_img"] = kwargs.pop("detections_per_img")
        common.pop("fpn_channels")
        common["num_classes"] = arch["num_classes"] - 1
        return dino_transnext(arch["variant"], num_feature_levels=arch.get("num_feature_levels", 4), label_offset=1,
                              num_queries=arch.get("num_queries", 900), dn_queries=arch.get("dn_queries", 100), **common, **kwargs)
    raise ValueError(f"unknown detector {detector!r} (expected mask_rcnn, retinanet, fcos or dino)")


def dense_model_from_checkpoint(path: str | os.PathLike, task: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``(model in eval mode, info)`` from a dense training checkpoint; ``info`` has ``arch``, ``classes``, ``data_cfg``."""
    from ..checkpoints import CheckpointError
    from ..engine.state import safe_torch_load

    ck = safe_torch_load(path, "checkpoint")
    if not isinstance(ck, dict) or "model" not in ck or not isinstance(ck.get("arch"), dict) or "task" not in ck["arch"]:
        raise CheckpointError(f"{path} is not a transnext detection / segmentation checkpoint (no model record); "
                              "it must come from 'transnext detect train' or 'transnext segment train'")
    arch = ck["arch"]
    if task is not None and arch["task"] != task:
        raise CheckpointError(f"{path} holds a {arch['task']} model, not a {task} model")
    model = build_dense_model(arch)
    missing, unexpected = model.load_state_dict(ck["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the recorded model ({len(missing)} missing, {len(unexpected)} unexpected; "
                              f"first: {(missing or unexpected)[0]})")
    model.eval()
    return model, {"arch": arch, "classes": ck.get("classes"), "data_cfg": ck.get("data_cfg") or {},
                   "label_to_cat_id": ck.get("label_to_cat_id"), "metrics": ck.get("metrics", {})}
