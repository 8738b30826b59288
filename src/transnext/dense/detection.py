"""torchvision detectors on a TransNeXt + FPN trunk: Mask R-CNN, RetinaNet, FCOS.

``maskrcnn_transnext`` matches the reference Mask R-CNN 1x config where torchvision allows it:
FPN with 256 channels over the four stage maps plus a max-pooled fifth level, anchors 32-512
(one size per level, ratios 0.5/1/2), RoIAlign 7x7 (boxes) and 14x14 (masks), images resized to
fit 1333x800 keeping the ratio and padded to a multiple of 32, ImageNet mean/std. torchvision's
heads differ from mmdet's in details (smooth-L1 instead of L1 for the box regression of the
second stage, RoIAlign ``sampling_ratio`` 2 and ``aligned=False``), so the numbers of a run are
not bit-comparable with the mmdet reference. ``maskrcnn_transnext(reference=True)`` swaps in
components that compute what mmdet computes at test time (anchors, RoIAlign, post-processing,
mask pasting; :mod:`transnext.dense.reference_mmdet`), for the published mmdet checkpoints
(:func:`~transnext.dense.reference_mmdet.load_mmdet_checkpoint`).

The single-stage detectors read stages 2-4 (strides 8-32) and add P6/P7 from C5, like mmdet's
RetinaNet/FCOS configs (``start_level=1``, ``add_extra_convs="on_input"``).

Every builder accepts the usual torchvision keyword arguments (``min_size``, ``max_size``,
``rpn_*``, ``box_*``, ``anchor_generator`` ...); ``min_size`` may be a tuple for multi-scale
training (torchvision picks one per batch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbone import TransNeXtBackbone, TransNeXtFPN, create_backbone

__all__ = ["build_trunk", "fcos_transnext", "maskrcnn_transnext", "retinanet_transnext"]


# How a dense model takes a local trunk checkpoint instead of published weights (named when the hub cannot be reached).
BACKBONE_WEIGHTS_OPTION = "backbone_weights=PATH (--backbone-weights PATH on the command line)"


def _torchvision_detection() -> Any:
    try:
        import torchvision.models.detection as det
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("detectors need torchvision: pip install 'transnext-pytorch[dense]'") from e
    return det


def _to_float32(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return type(out)((k, _to_float32(v)) for k, v in out.items())
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float32(v) for v in out)
    return out


def _float32_hook(module: nn.Module, args: Any, out: Any) -> Any:
    return _to_float32(out)


def _boxes_in_float32(model: nn.Module, *heads: nn.Module) -> nn.Module:
    """Under autocast (bf16/fp16), anchors, proposals and boxes stay float32: torchvision makes the anchors in
    the dtype of the feature maps and decodes boxes in the dtype of the head outputs, and bf16 has steps of
    4 px above 512 px. The FPN maps and the box heads' outputs are cast back to float32 (the layers still run
    in reduced precision); no parameter or state-dict key changes."""
    for m in (model.backbone, *heads):
        m.register_forward_hook(_float32_hook)
    return model


def build_trunk(
    variant: str,
    backbone_weights: str | os.PathLike | bool | None = None,
    preset: str | None = "mask_rcnn",
    out_indices: tuple[int, ...] | None = None,
    frozen_stages: int = -1,
    grad_checkpointing: bool = False,
    **kwargs: Any,
) -> TransNeXtBackbone:
    """A :class:`TransNeXtBackbone` with ``preset`` settings and optional classification weights.

    ``backbone_weights``: ``None`` (random), ``True`` (the published weights of ``variant``), a
    ``variant.tag`` name (published weights of that tag), or a checkpoint file (``.pth`` /
    ``.safetensors``; published or ours; its classifier is dropped).
    """
    name, pretrained, checkpoint = variant, False, None
    if backbone_weights is True:
        pretrained = True
    elif isinstance(backbone_weights, (str, os.PathLike)) and backbone_weights:
        text = str(backbone_weights)
        if Path(text).exists():
            checkpoint = text
        elif "." in text and "/" not in text and Path(text).suffix.lower() not in (".pth", ".pt", ".bin", ".safetensors"):
            name, pretrained = text, True  # "transnext_tiny.in1k"
        else:
            raise FileNotFoundError(f"backbone weights not found: {text} (a checkpoint file, True, or a variant.tag name)")
    elif backbone_weights not in (None, False):
        raise TypeError(f"backbone_weights must be None, True, a variant.tag name or a file path, not {type(backbone_weights).__name__}")
    if pretrained:
        from ..checkpoints import download_weights
        from ..models.registry import get_weights

        # fetched here so that an unreachable hub names the option that takes a local classification checkpoint
        checkpoint, pretrained = download_weights(get_weights(name), local_option=BACKBONE_WEIGHTS_OPTION), False
    backbone = create_backbone(name, task=preset, pretrained=pretrained, checkpoint_path=checkpoint,
                               out_indices=out_indices, frozen_stages=frozen_stages, **kwargs)
    if grad_checkpointing:
        backbone.model.set_grad_checkpointing(True)
    return backbone


def maskrcnn_transnext(
    variant: str = "transnext_tiny",
    num_classes: int = 91,
    backbone_weights: str | os.PathLike | bool | None = None,
    preset: str | None = "mask_rcnn",
    fpn_channels: int = 256,
    frozen_stages: int = -1,
    grad_checkpointing: bool = False,
    backbone_kwargs: dict[str, Any] | None = None,
    representation_size: int | None = None,
    mask_layers: tuple[int, ...] | None = None,
    reference: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """torchvision ``MaskRCNN`` on TransNeXt + FPN (``num_classes`` includes the background).

    Args:
        variant: TransNeXt variant.
        num_classes: classes + 1 (torchvision counts the background as class 0).
        backbone_weights: see :func:`build_trunk`.
        preset: backbone settings (:data:`~transnext.dense.DENSE_PRESETS`), default ``mask_rcnn``.
        fpn_channels: FPN width (reference: 256).
        backbone_kwargs: model arguments for the trunk (``drop_path_rate``, ``img_size``, dims ...).
        representation_size: width of the box head's two-layer MLP (torchvision / reference: 1024).
        mask_layers: channels of the mask head's 3x3 convs (reference: four of 256).
        reference: mmdet's test-time computation (for converted mmdet checkpoints; see
            :mod:`transnext.dense.reference_mmdet`): its anchors, RoIAlign (aligned, adaptive
            sampling, finest_scale 56), box post-processing and mask pasting.
        **kwargs: torchvision ``MaskRCNN`` arguments; default ``min_size=800, max_size=1333``.
    """
    det = _torchvision_detection()
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    trunk = build_trunk(variant, backbone_weights, preset, frozen_stages=frozen_stages,
                        grad_checkpointing=grad_checkpointing, **(backbone_kwargs or {}))
    kwargs.setdefault("min_size", 800)
    kwargs.setdefault("max_size", 1333)
    if representation_size is not None:
        kwargs["box_head"] = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
        kwargs["box_predictor"] = FastRCNNPredictor(representation_size, num_classes)
    if mask_layers is not None:
        kwargs["mask_head"] = MaskRCNNHeads(fpn_channels, tuple(mask_layers), 1)
        kwargs["mask_predictor"] = MaskRCNNPredictor(mask_layers[-1], mask_layers[-1], num_classes)
    if "box_predictor" in kwargs or "mask_predictor" in kwargs:
        # torchvision takes the class count from the given predictors; both must then be given.
        if "box_predictor" not in kwargs:
            kwargs["box_predictor"] = FastRCNNPredictor(1024 if "box_head" not in kwargs else representation_size or 1024, num_classes)
        if "mask_predictor" not in kwargs:
            kwargs["mask_predictor"] = MaskRCNNPredictor(256, 256, num_classes)
        num_classes_arg = None
    else:
        num_classes_arg = num_classes
    model = det.MaskRCNN(TransNeXtFPN(trunk, fpn_channels), num_classes=num_classes_arg, **kwargs)
    if reference:
        if any(k in kwargs for k in ("anchor_generator", "box_roi_pool", "mask_roi_pool")):
            raise ValueError("reference=True uses mmdet's anchor generator and RoI poolers; "
                             "do not pass anchor_generator, box_roi_pool or mask_roi_pool with it")
        from .reference_mmdet import apply_reference_mode

        apply_reference_mode(model)  # keeps the head modules (and their hooks), replaces the poolers and post-processing
    return _boxes_in_float32(model, model.rpn.head, model.roi_heads.box_predictor)


def _single_stage_trunk(variant: str, backbone_weights: Any, preset: str | None, fpn_channels: int, frozen_stages: int,
                        grad_checkpointing: bool, backbone_kwargs: dict[str, Any] | None) -> TransNeXtFPN:
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    trunk = build_trunk(variant, backbone_weights, preset, out_indices=(1, 2, 3), frozen_stages=frozen_stages,
                        grad_checkpointing=grad_checkpointing, **(backbone_kwargs or {}))
    # P6 from C5 (the input of the top FPN level), P7 from ReLU(P6): mmdet's "on_input" extra convs.
    return TransNeXtFPN(trunk, fpn_channels, extra_blocks=LastLevelP6P7(trunk.out_channels[-1], fpn_channels))


def retinanet_transnext(
    variant: str = "transnext_tiny",
    num_classes: int = 91,
    backbone_weights: str | os.PathLike | bool | None = None,
    preset: str | None = "mask_rcnn",
    fpn_channels: int = 256,
    frozen_stages: int = -1,
    grad_checkpointing: bool = False,
    backbone_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """torchvision ``RetinaNet`` on TransNeXt (strides 8-32) + FPN with P6/P7.

    ``num_classes`` follows torchvision (label 0 is unused by the focal-loss head but kept so that
    labels mean the same in every detector of this module). Other arguments: see
    :func:`maskrcnn_transnext`.
    """
    det = _torchvision_detection()
    kwargs.setdefault("min_size", 800)
    kwargs.setdefault("max_size", 1333)
    fpn = _single_stage_trunk(variant, backbone_weights, preset, fpn_channels, frozen_stages, grad_checkpointing, backbone_kwargs)
    model = det.RetinaNet(fpn, num_classes=num_classes, **kwargs)
    return _boxes_in_float32(model, model.head)


def fcos_transnext(
    variant: str = "transnext_tiny",
    num_classes: int = 91,
    backbone_weights: str | os.PathLike | bool | None = None,
    preset: str | None = "mask_rcnn",
    fpn_channels: int = 256,
    frozen_stages: int = -1,
    grad_checkpointing: bool = False,
    backbone_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """torchvision ``FCOS`` on TransNeXt (strides 8-32) + FPN with P6/P7 (see :func:`retinanet_transnext`)."""
    det = _torchvision_detection()
    kwargs.setdefault("min_size", 800)
    kwargs.setdefault("max_size", 1333)
    fpn = _single_stage_trunk(variant, backbone_weights, preset, fpn_channels, frozen_stages, grad_checkpointing, backbone_kwargs)
    if "anchor_generator" not in kwargs:
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        # One anchor point per location and level (FCOS is anchor-free; the generator gives centres).
        kwargs["anchor_generator"] = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)
    model = det.FCOS(fpn, num_classes=num_classes, **kwargs)
    return _boxes_in_float32(model, model.head)
