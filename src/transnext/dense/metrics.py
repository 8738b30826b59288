"""Dense metrics: COCO box / mask AP (pycocotools) and segmentation mIoU / mAcc / aAcc.

* :func:`coco_evaluate` runs pycocotools' ``COCOeval`` for ``bbox`` and ``segm`` and returns AP,
  AP50, AP75, APs/m/l, AR and a per-class AP table (percentages; -1 where COCO has no objects
  of that kind).
* :func:`detections_to_coco` turns torchvision detector outputs into COCO result entries
  (xywh boxes, RLE masks thresholded at 0.5 as in torchvision's and mmdet's evaluation).
* :class:`SegmentationMetric` accumulates a confusion matrix over a data set, the way mmseg sums
  intersections and unions over all images before dividing: IoU_c = TP / (TP + FP + FN),
  Acc_c = TP / (TP + FN), aAcc = sum TP / labelled pixels; mIoU / mAcc average the classes that
  occur in the labels or the predictions (NaN classes are left out, as mmseg's ``nanmean``).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["COCO_STAT_NAMES", "SegmentationMetric", "class_agnostic", "coco_evaluate", "detections_to_coco", "foreground_iou"]

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def detections_to_coco(outputs: Sequence[dict[str, Tensor]], image_ids: Sequence[int], label_to_cat_id: dict[int, int],
                       mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """COCO result entries from ``[{"boxes" xyxy, "labels", "scores"[, "masks" (N,1,H,W)]}, ...]``."""
    import numpy as np

    results: list[dict[str, Any]] = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        labels = out["labels"].tolist()
        scores = out["scores"].tolist()
        rles: list[Any] = [None] * len(labels)
        if "masks" in out:
            from ..data.coco import require_pycocotools

            mask_utils = require_pycocotools()
            masks = (out["masks"].detach().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
            rles = []
            for m in masks:
                rle = mask_utils.encode(np.asfortranarray(m))
                rle["counts"] = rle["counts"].decode("ascii")
                rles.append(rle)
        for box, label, score, rle in zip(xywh, labels, scores, rles):
            if int(label) not in label_to_cat_id:
                continue  # background / unused label
            entry = dict(image_id=int(image_id), category_id=label_to_cat_id[int(label)], bbox=[round(v, 3) for v in box],
                         score=float(score))
            if rle is not None:
                entry["segmentation"] = rle
            results.append(entry)
    return results


def coco_evaluate(gt: dict[str, Any], results: list[dict[str, Any]], iou_types: Sequence[str] = ("bbox", "segm"),
                  verbose: bool = False) -> dict[str, Any]:
    """COCO evaluation of ``results`` against the ground-truth dict ``gt``.

    Returns ``{"bbox": {"AP": .., "AP50": .., ..., "per_class": {name: AP}}, "segm": {...}}`` in
    percent; an iou type without any result gets zeros (pycocotools refuses empty results).
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise ImportError("COCO evaluation needs pycocotools: pip install 'transnext-pytorch[dense]'") from e
    import numpy as np

    if not gt.get("images"):
        raise ValueError("COCO evaluation over no image: the ground truth lists no images (every image skipped, or an empty split)")
    gt = dict(gt)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
    cat_names = {c["id"]: c["name"] for c in gt["categories"]}
    out: dict[str, Any] = {}
    for iou_type in iou_types:
        dets = [r for r in results if iou_type == "bbox" or "segmentation" in r]
        if not dets:
            out[iou_type] = dict(dict.fromkeys(COCO_STAT_NAMES, 0.0), per_class=dict.fromkeys(cat_names.values(), 0.0))
            continue
        if iou_type == "segm":
            # without the box, pycocotools takes the instance area from the mask (not the box), so
            # APs/m/l of masks use mask areas, as detectron2 and mmdet evaluate them
            dets = [{k: v for k, v in r.items() if k != "bbox"} for r in dets]
        with quiet:
            coco_dt = coco_gt.loadRes([dict(r) for r in dets])
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = {name: float(v) * 100 if v >= 0 else -1.0 for name, v in zip(COCO_STAT_NAMES, ev.stats)}
        precision = ev.eval["precision"]  # [iou thr, recall, class, area, max dets]
        per_class = {}
        for k, cid in enumerate(ev.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_class[cat_names[cid]] = float(np.mean(p)) * 100 if p.size else -1.0
        stats["per_class"] = per_class
        out[iou_type] = stats
    return out


class SegmentationMetric:
    """Confusion-matrix accumulator for semantic segmentation (see the module docstring)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)  # [label, prediction]

    def reset(self) -> None:
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """``pred``: class indices (any shape); ``target``: labels of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from the label shape {tuple(target.shape)}")
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long().to(pred.device)
        valid = target != self.ignore_index
        if ((target[valid] < 0) | (target[valid] >= self.num_classes)).any():
            raise ValueError(f"labels outside 0..{self.num_classes - 1} (ignore index {self.ignore_index})")
        n = self.num_classes
        idx = target[valid] * n + pred[valid].clamp(0, n - 1)
        self.confusion += torch.bincount(idx, minlength=n * n).reshape(n, n).to(self.confusion)

    def compute(self, classes: Sequence[str] | None = None) -> dict[str, Any]:
        """``{"mIoU", "mAcc", "aAcc"}`` in percent, plus ``per_class`` ``{name: {"IoU", "Acc"}}``.

        Nothing accumulated (no image, or only ignored pixels) is an error, not NaN metrics.
        """
        cm = self.confusion.cpu()
        if not bool(cm.sum() > 0):
            raise ValueError(f"segmentation metric over no labelled pixel: no image was evaluated, or every pixel was the "
                             f"ignore index {self.ignore_index}")
        tp = cm.diag()
        label_area = cm.sum(1)
        pred_area = cm.sum(0)
        union = label_area + pred_area - tp
        iou = tp / union  # NaN where a class is neither labelled nor predicted
        acc = tp / label_area  # NaN where a class is not labelled
        total = label_area.sum()
        names = list(classes) if classes is not None else [str(i) for i in range(self.num_classes)]

        def pct(v: Tensor) -> float:
            return float(v) * 100 if not torch.isnan(v) else float("nan")

        return {
            "mIoU": pct(iou.nanmean()) if (~torch.isnan(iou)).any() else float("nan"),
            "mAcc": pct(acc.nanmean()) if (~torch.isnan(acc)).any() else float("nan"),
            "aAcc": pct(tp.sum() / total) if total > 0 else float("nan"),
            "per_class": {names[c]: {"IoU": pct(iou[c]), "Acc": pct(acc[c])} for c in range(self.num_classes)},
        }


def class_agnostic(gt: dict[str, Any], results: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ground truth and results with every category merged into one ("object"): localisation alone."""
    gt = dict(gt, categories=[dict(id=1, name="object")], annotations=[dict(a, category_id=1) for a in gt["annotations"]])
    return gt, [dict(r, category_id=1) for r in results]


def foreground_iou(confusion: Any, background: int = 0) -> float:
    """IoU (percent) of "any class but ``background``" from a ``[label, prediction]`` confusion matrix."""
    cm = torch.as_tensor(confusion, dtype=torch.float64)
    fg = torch.ones(cm.shape[0], dtype=torch.bool)
    fg[background] = False
    tp = cm[fg][:, fg].sum()
    union = cm[fg].sum() + cm[:, fg].sum() - tp
    return float(tp / union) * 100 if union > 0 else float("nan")
