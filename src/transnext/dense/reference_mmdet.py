"""The published Mask R-CNN 1x checkpoints (mmdet) in :func:`~transnext.dense.maskrcnn_transnext`.

:func:`convert_mmdet_maskrcnn` renames an mmdet ``MaskRCNN`` state dict (TransNeXt backbone, FPN,
``RPNHead``, ``Shared2FCBBoxHead``, ``FCNMaskHead``) to the torchvision modules of
``maskrcnn_transnext``; :func:`load_mmdet_checkpoint` reads a file with the project's safe loader
and loads it strictly. ``maskrcnn_transnext(reference=True)`` (:func:`apply_reference_mode`)
swaps in the components below so that inference computes what mmdet computes. What each preset
uses:

=====================  ==============================================  ==============================================
stage                  default (torchvision)                           ``reference=True`` (mmdet, converted weights)
=====================  ==============================================  ==============================================
classes                background first: ``cls_score`` K+1 rows,       mmdet's background is the *last* of ``fc_cls``'s
                       ``bbox_pred`` (K+1)*4, K+1 mask channels        K+1 rows and ``fc_reg`` / ``conv_logits`` have
                                                                       no background row: the converter moves the
                                                                       background row first and inserts zero rows
                                                                       for the background box / mask (never used:
                                                                       background predictions are dropped). Labels
                                                                       are mmdet's + 1.
anchors                ``AnchorGenerator``: stride = padded size //     :class:`MMDetAnchorGenerator`: strides 4-64
                       map size (53, not 64, for a 160 px side at       fixed, scale 8, ratios 0.5/1/2, centre offset
                       the pooled level), base anchors rounded          0, base anchors not rounded
RPN boxes              deltas std 1, clamp log(1000/16), clip to the    the same (mmdet's ``DeltaXYWHBBoxCoder``, stds
                       image, 1000 per level before NMS, NMS 0.7 per    1,1,1,1, same clamp); boxes kept when
                       level, 1000 after; boxes of side < 1e-3 drop     width and height are > 0 (``min_bbox_size=0``)
RoI features           ``MultiScaleRoIAlign``: ``aligned=False``,        :class:`MMDetRoIAlign`: ``roi_align(aligned=True,
                       ``sampling_ratio=2``, level                     sampling_ratio=0)``, level
                       ``floor(4 + log2(s/224) + 1e-6) - 2``           ``floor(log2(s/56 + 1e-6))`` (finest_scale 56),
                                                                       strides 4-32 fixed
RoI boxes              stds 0.1,0.1,0.2,0.2 (weights 10,10,5,5),        :class:`MMDetRoIHeads`: the same coder; score >
                       score > 0.05, boxes of side < 0.01 dropped,      0.05, no size filter, NMS 0.5 per class, 100
                       NMS 0.5 per class, 100 per image                per image (mmdet's ``multiclass_nms``)
masks                  ``paste_masks_in_image`` (mask padded by one    :class:`MMDetTransform`: mmdet's
                       cell, box scaled, resized into the rounded      ``_do_paste_mask`` (``grid_sample``,
                       box)                                            ``align_corners=False``, per mask over the box
                                                                       +- 1 px, as mmdet on the CPU); binary masks
                                                                       are ``masks >= 0.5`` (``mask_thr_binary``)
=====================  ==============================================  ==============================================

Resizing (:class:`MMDetTransform`): the default floors the resized size (``F.interpolate`` with
a scale factor); reference mode rounds it as mmcv's ``imrescale`` does (``int(x * s + 0.5)``) and
resamples to that size. Not reproduced: mmdet resizes the 8-bit image with OpenCV before
normalising it, we the float image after, so pixels differ slightly (parity holds for the same
network input). Training (assigners, samplers, losses, multi-scale resizing) keeps torchvision's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
    from torchvision.ops import MultiScaleRoIAlign, batched_nms, clip_boxes_to_image, roi_align
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the mmdet reference mode needs torchvision: pip install 'transnext-pytorch[dense]'") from e

from ..checkpoints import CheckpointError, checkpoint_filter_fn, load_state_dict, load_state_dict_into

__all__ = [
    "MMDetAnchorGenerator",
    "MMDetRoIAlign",
    "MMDetRoIHeads",
    "MMDetTransform",
    "apply_reference_mode",
    "convert_mmdet_maskrcnn",
    "is_maskrcnn",
    "is_mmdet_maskrcnn",
    "load_mmdet_checkpoint",
    "mmdet_reference_name",
    "mmdet_resized_size",
    "paste_masks_mmdet",
]

ANCHOR_STRIDES = (4, 8, 16, 32, 64)
ROI_STRIDES = (4, 8, 16, 32)
FINEST_SCALE = 56

# mmdet module prefix -> torchvision module prefix (weight and bias alike).
_RENAMES = {
    "rpn_head.rpn_conv.": "rpn.head.conv.0.0.",
    "rpn_head.rpn_cls.": "rpn.head.cls_logits.",
    "rpn_head.rpn_reg.": "rpn.head.bbox_pred.",
    "roi_head.bbox_head.shared_fcs.0.": "roi_heads.box_head.fc6.",
    "roi_head.bbox_head.shared_fcs.1.": "roi_heads.box_head.fc7.",
    "roi_head.mask_head.upsample.": "roi_heads.mask_predictor.conv5_mask.",
}


def _rename(key: str) -> str:
    """The torchvision name of an mmdet key; keys of no known module come back unchanged."""
    if key.startswith("backbone."):
        return "backbone.body.model." + key[len("backbone."):]
    for prefix, new in (("neck.lateral_convs.", "backbone.fpn.inner_blocks."), ("neck.fpn_convs.", "backbone.fpn.layer_blocks."),
                        ("roi_head.mask_head.convs.", "roi_heads.mask_head.")):
        if key.startswith(prefix):
            index, _, rest = key[len(prefix):].partition(".")
            if rest.startswith("conv."):  # mmdet's ConvModule holds the conv as .conv; torchvision's block as [0]
                return f"{new}{index}.0.{rest[len('conv.'):]}"
    for prefix, new in _RENAMES.items():
        if key.startswith(prefix):
            return new + key[len(prefix):]
    return key


# our prefix -> mmdet's, for naming keys in errors (the inverse of the renaming above).
_REFERENCE_NAMES = [
    ("backbone.body.model.", "backbone."),
    ("backbone.fpn.inner_blocks.{i}.0.", "neck.lateral_convs.{i}.conv."),
    ("backbone.fpn.layer_blocks.{i}.0.", "neck.fpn_convs.{i}.conv."),
    ("roi_heads.mask_head.{i}.0.", "roi_head.mask_head.convs.{i}.conv."),
    ("roi_heads.box_predictor.cls_score.", "roi_head.bbox_head.fc_cls."),
    ("roi_heads.box_predictor.bbox_pred.", "roi_head.bbox_head.fc_reg."),
    ("roi_heads.mask_predictor.mask_fcn_logits.", "roi_head.mask_head.conv_logits."),
    *((ours, theirs) for theirs, ours in _RENAMES.items()),
]


def mmdet_reference_name(key: str) -> str:
    """The mmdet name of one of our Mask R-CNN keys (for messages); other keys come back unchanged."""
    for ours, theirs in _REFERENCE_NAMES:
        head, _, tail = ours.partition("{i}")
        if not key.startswith(head):
            continue
        if not tail:
            return theirs + key[len(head):]
        index, _, rest = key[len(head):].partition(".")
        if index.isdigit() and ("." + rest).startswith(tail):
            return theirs.replace("{i}", index) + ("." + rest)[len(tail):]
    return key


def is_mmdet_maskrcnn(state_dict: Mapping[str, Any]) -> bool:
    """An mmdet ``MaskRCNN`` state dict: backbone, RPN head, box head and mask head keys."""
    keys = list(state_dict)
    return (any(k.startswith("backbone.") for k in keys) and any(k.startswith("rpn_head.") for k in keys)
            and any(k.startswith("roi_head.bbox_head.") for k in keys) and any(k.startswith("roi_head.mask_head.") for k in keys))


def is_maskrcnn(model: nn.Module) -> bool:
    """A torchvision ``MaskRCNN`` (what :func:`~transnext.dense.maskrcnn_transnext` builds)."""
    from torchvision.models.detection import MaskRCNN

    return isinstance(model, MaskRCNN)


def _unwrap_mmdet(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    inner = state_dict.get("state_dict") if isinstance(state_dict, Mapping) else None
    if isinstance(inner, Mapping):
        state_dict = inner
    out = {k: v for k, v in state_dict.items() if isinstance(v, Tensor)}
    if not out:
        raise CheckpointError("no mmdet state dict found (expected a mapping of parameter names to tensors, bare or under 'state_dict')")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in out.items()}


def convert_mmdet_maskrcnn(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """An mmdet ``MaskRCNN`` state dict (bare or ``{'state_dict': ..., 'meta': ...}``) in our names.

    Besides renaming: the classifier's rows move from mmdet's order (K classes, background last)
    to torchvision's (background first); the class-specific box regression (K*4 rows) and the
    mask logits (K channels) get a zero background row in front. The backbone keys go through
    :func:`~transnext.checkpoints.checkpoint_filter_fn` (the reference backbone's names are ours;
    its non-persistent size tables are dropped). Keys of unknown modules are kept unchanged, so
    that a strict load reports them.

    Raises:
        CheckpointError: no state dict, or heads of inconsistent sizes (e.g. class-agnostic
            regression, which the reference configs do not use).
    """
    sd = _unwrap_mmdet(state_dict)
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    backbone = checkpoint_filter_fn(backbone, nn.Module())
    out = {"backbone.body.model." + k: v for k, v in backbone.items()}
    cls_w, cls_b = sd.get("roi_head.bbox_head.fc_cls.weight"), sd.get("roi_head.bbox_head.fc_cls.bias")
    for key, value in sd.items():
        if key.startswith("backbone.") or key.startswith("roi_head.bbox_head.fc_cls.") or key.startswith("roi_head.bbox_head.fc_reg.") \
                or key.startswith("roi_head.mask_head.conv_logits."):
            continue
        out[_rename(key)] = value
    if cls_w is None or cls_b is None:
        raise CheckpointError("not an mmdet Mask R-CNN state dict: roi_head.bbox_head.fc_cls.weight / .bias are missing")
    num_classes = cls_w.shape[0] - 1  # mmdet: K classes + background (last)
    order = torch.cat([torch.tensor([num_classes]), torch.arange(num_classes)])
    out["roi_heads.box_predictor.cls_score.weight"] = cls_w[order]
    out["roi_heads.box_predictor.cls_score.bias"] = cls_b[order]
    for src, dst, per_class in (("roi_head.bbox_head.fc_reg.", "roi_heads.box_predictor.bbox_pred.", 4),
                                ("roi_head.mask_head.conv_logits.", "roi_heads.mask_predictor.mask_fcn_logits.", 1)):
        for kind in ("weight", "bias"):
            value = sd.get(src + kind)
            if value is None:
                raise CheckpointError(f"not an mmdet Mask R-CNN state dict: {src}{kind} is missing")
            if value.shape[0] != num_classes * per_class:
                raise CheckpointError(
                    f"{src}{kind} has {value.shape[0]} rows; expected {num_classes * per_class} ({num_classes} classes from fc_cls"
                    f"{', class-specific boxes' if per_class == 4 else ''}); class-agnostic heads are not supported")
            zero = value.new_zeros((per_class, *value.shape[1:]))
            out[dst + kind] = torch.cat([zero, value])
    return out


def load_mmdet_checkpoint(model: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Load an mmdet Mask R-CNN checkpoint (``.pth`` with ``state_dict``/``meta``, or ``.safetensors``) strictly.

    Reads through :func:`~transnext.checkpoints.load_state_dict` (``weights_only``; pickled code
    is refused), converts with :func:`convert_mmdet_maskrcnn` and loads with one report of
    missing / unexpected / mis-shaped keys (:class:`~transnext.checkpoints.CheckpointError`).
    Build ``model`` with ``maskrcnn_transnext(..., num_classes=K + 1, reference=True)``.
    """
    path = Path(path)
    try:
        converted = convert_mmdet_maskrcnn(load_state_dict(path))
    except CheckpointError as e:
        if str(path) in str(e):
            raise
        raise CheckpointError(f"{path}: {e}") from None
    try:
        return load_state_dict_into(model, converted, str(path), strict=True, filter_fn=None)
    except CheckpointError as e:
        own = model.state_dict().get("roi_heads.box_predictor.cls_score.weight")
        theirs = converted["roi_heads.box_predictor.cls_score.weight"]
        if own is None or own.shape[0] == theirs.shape[0]:
            raise
        raise CheckpointError(f"{e}. The checkpoint has {theirs.shape[0] - 1} classes, the model {own.shape[0] - 1} (+ background): "
                              f"build it with num_classes={theirs.shape[0]}") from None


class MMDetAnchorGenerator(AnchorGenerator):
    """mmdet's ``AnchorGenerator`` (fixed strides, base size = stride, scale 8, no rounding) as a torchvision one."""

    def __init__(self, strides: tuple[int, ...] = ANCHOR_STRIDES, scale: float = 8.0, ratios: tuple[float, ...] = (0.5, 1.0, 2.0)) -> None:
        super().__init__(tuple((s * scale,) for s in strides), (tuple(ratios),) * len(strides))
        self.strides = tuple(strides)

    def generate_anchors(self, scales: Any, aspect_ratios: Any, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu") -> Tensor:
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)  # ratio-major, like mmdet's scale_major
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=1)  # centre offset 0, not rounded

    def forward(self, image_list: Any, feature_maps: list[Tensor]) -> list[Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"{len(feature_maps)} feature maps for {len(self.strides)} anchor strides {self.strides}")
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        device = feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(feature_maps[0].dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


class MMDetRoIAlign(MultiScaleRoIAlign):
    """mmdet's ``SingleRoIExtractor``: RoIAlign ``aligned=True``, adaptive sampling, levels by ``finest_scale``."""

    def __init__(self, featmap_names: list[str], output_size: int, strides: tuple[int, ...] = ROI_STRIDES,
                 finest_scale: int = FINEST_SCALE) -> None:
        super().__init__(featmap_names, output_size, sampling_ratio=0)
        if len(strides) != len(featmap_names):
            raise ValueError(f"{len(featmap_names)} feature maps for {len(strides)} strides {strides}")
        self.strides = tuple(strides)
        self.finest_scale = finest_scale

    def map_levels_mmdet(self, boxes: Tensor) -> Tensor:
        """Level of each box: ``floor(log2(sqrt(w * h) / finest_scale + 1e-6))`` clamped to the levels."""
        scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        return torch.floor(torch.log2(scale / self.finest_scale + 1e-6)).clamp(0, len(self.strides) - 1).long()

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])
        levels = self.map_levels_mmdet(rois[:, 1:])
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for level, (feat, stride) in enumerate(zip(feats, self.strides)):
            idx = torch.where(levels == level)[0]
            if len(idx):
                out[idx] = roi_align(feat, rois[idx], self.output_size, spatial_scale=1.0 / stride, sampling_ratio=0,
                                     aligned=True).to(out.dtype)
        return out


class MMDetRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` whose test-time box post-processing is mmdet's ``multiclass_nms``."""

    def postprocess_detections(self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                               image_shapes: list[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        num_classes = class_logits.shape[-1]
        counts = [len(p) for p in proposals]
        boxes_all = self.box_coder.decode(box_regression, proposals).split(counts)
        scores_all = F.softmax(class_logits, -1).split(counts)
        out_boxes, out_scores, out_labels = [], [], []
        for boxes, scores, shape in zip(boxes_all, scores_all, image_shapes):
            boxes = clip_boxes_to_image(boxes, shape)[:, 1:].reshape(-1, 4)  # column 0: background, dropped
            labels = torch.arange(1, num_classes, device=scores.device).repeat(len(scores))
            scores = scores[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]  # no minimum box size, unlike torchvision
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            out_boxes.append(boxes[keep])
            out_scores.append(scores[keep])
            out_labels.append(labels[keep])
        return out_boxes, out_scores, out_labels


def paste_masks_mmdet(masks: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """mmdet's ``_do_paste_mask`` on the CPU: each ``(N, 1, M, M)`` mask sampled over its box +- 1 px.

    Pixel centres are mapped into the box (``grid_sample``, ``align_corners=False``, zero
    outside the mask); pixels farther than one pixel from the box stay 0. Returns ``(N, 1, H, W)``
    probabilities; ``>= 0.5`` gives mmdet's binary masks.
    """
    img_h, img_w = image_size
    out = masks.new_zeros((len(masks), 1, img_h, img_w))
    for i in range(len(masks)):
        box = boxes[i:i + 1].to(torch.float32)
        x0_int = int(torch.clamp(box[0, 0].floor() - 1, min=0))
        y0_int = int(torch.clamp(box[0, 1].floor() - 1, min=0))
        x1_int = int(torch.clamp(box[0, 2].ceil() + 1, max=img_w))
        y1_int = int(torch.clamp(box[0, 3].ceil() + 1, max=img_h))
        if x1_int <= x0_int or y1_int <= y0_int:
            continue
        x0, y0, x1, y1 = box[0]
        ys = (torch.arange(y0_int, y1_int, device=masks.device, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
        xs = (torch.arange(x0_int, x1_int, device=masks.device, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
        # A box of zero width or height: mmdet sets the infinite coordinates to 0.
        ys = torch.where(torch.isinf(ys), torch.zeros_like(ys), ys)
        xs = torch.where(torch.isinf(xs), torch.zeros_like(xs), xs)
        grid = torch.stack([xs[None, :].expand(len(ys), -1), ys[:, None].expand(-1, len(xs))], dim=-1)[None]
        pasted = F.grid_sample(masks[i:i + 1].to(torch.float32), grid, align_corners=False)
        out[i, 0, y0_int:y1_int, x0_int:x1_int] = pasted[0, 0].to(out.dtype)
    return out


def mmdet_resized_size(height: int, width: int, short: int, long: int) -> tuple[int, int]:
    """``(h, w)`` after mmcv's ``imrescale`` to ``(long, short)`` keeping the ratio: rounded to nearest, not floored."""
    scale = min(long / max(height, width), short / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


class MMDetTransform(GeneralizedRCNNTransform):
    """torchvision's ``GeneralizedRCNNTransform`` resizing and pasting masks as mmdet does at test time.

    The resized size is mmcv's (:func:`mmdet_resized_size`; torchvision floors, e.g. 799 instead
    of 800 rows for a 300x500 image); the image is resampled bilinearly with half-pixel centres
    like OpenCV's ``INTER_LINEAR``, but on the float image where mmdet resizes the 8-bit one, so
    the pixels are close, not identical. Masks: :func:`paste_masks_mmdet`. Training keeps
    torchvision's resizing (its random choice among several ``min_size``).
    """

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
        if self.training or self.fixed_size is not None:
            return super().resize(image, target)
        h, w = image.shape[-2:]
        size = mmdet_resized_size(h, w, int(self.min_size[-1]), int(self.max_size))
        if size != (h, w):
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is not None and "boxes" in target:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), size)
        return image, target

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        for pred, size, original in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], size, original)
            if "masks" in pred:
                pred["masks"] = paste_masks_mmdet(pred["masks"], pred["boxes"], original)
        return result


def apply_reference_mode(model: nn.Module) -> nn.Module:
    """Give a torchvision ``MaskRCNN`` mmdet's test-time computation (see the module docstring); in place.

    The trunk must give five maps (strides 4-64, as ``maskrcnn_transnext``'s FPN does).
    """
    rpn = model.rpn
    rpn.anchor_generator = MMDetAnchorGenerator()
    # mmdet's min_bbox_size=0 keeps boxes of width and height > 0; torchvision keeps side >= min_size.
    rpn.min_size = torch.finfo(torch.float32).tiny
    old = model.roi_heads
    names = list(old.box_roi_pool.featmap_names)
    heads = MMDetRoIHeads(
        MMDetRoIAlign(names, 7), old.box_head, old.box_predictor,
        old.proposal_matcher.high_threshold, old.proposal_matcher.low_threshold,
        old.fg_bg_sampler.batch_size_per_image, old.fg_bg_sampler.positive_fraction, old.box_coder.weights,
        old.score_thresh, old.nms_thresh, old.detections_per_img,
        mask_roi_pool=MMDetRoIAlign(list(old.mask_roi_pool.featmap_names), 14) if old.has_mask() else None,
        mask_head=old.mask_head, mask_predictor=old.mask_predictor,
    )
    model.roi_heads = heads
    t = model.transform
    model.transform = MMDetTransform(t.min_size, t.max_size, t.image_mean, t.image_std, size_divisible=t.size_divisible,
                                     fixed_size=t.fixed_size, _skip_resize=getattr(t, "_skip_resize", False))
    return model
