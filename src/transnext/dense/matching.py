"""Bipartite matching and the box helpers of set-prediction detectors (DINO, Mask2Former).

:func:`hungarian_match` solves the assignment with SciPy's ``linear_sum_assignment`` on the CPU.
Boxes: ``cxcywh`` is ``(centre x, centre y, width, height)``, ``xyxy`` is ``(x1, y1, x2, y2)``;
the generalized IoU clamps the union and the enclosing area at ``eps`` (as the reference
detectors do, so that degenerate boxes give finite values).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "generalized_box_iou", "hungarian_match", "mean_over_processes"]


def mean_over_processes(value: float, device: torch.device) -> float:
    """``value`` averaged over the processes of an initialised process group (itself otherwise)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def hungarian_match(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost one-to-one assignment of the rows (predictions) to the columns (targets) of ``cost``.

    Returns ``(row_idx, col_idx)`` as int64 CPU tensors, ``min(rows, cols)`` pairs sorted by row. An
    empty matrix gives two empty tensors; NaN or infinite costs raise ``ValueError`` (SciPy would
    refuse them with a less specific message).
    """
    if cost.dim() != 2:
        raise ValueError(f"the cost matrix must be 2-d [predictions, targets], got shape {tuple(cost.shape)}")
    if cost.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    values = cost.detach().to("cpu", torch.float64)
    if not torch.isfinite(values).all():
        raise ValueError("the cost matrix holds NaN or infinite values (the predictions were not finite)")
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("DINO and Mask2Former match predictions to targets with SciPy: "
                          "pip install 'transnext-pytorch[dense]'") from e

    rows, cols = linear_sum_assignment(values.numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(cx, cy, w, h)`` -> ``(x1, y1, x2, y2)`` over the last axis."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(x1, y1, x2, y2)`` -> ``(cx, cy, w, h)`` over the last axis."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, aligned: bool = False, eps: float = 1e-6) -> Tensor:
    """Generalized IoU of ``xyxy`` boxes: pairwise ``[N, M]``, or ``[N]`` for row-aligned pairs if ``aligned``."""
    if boxes1.shape[-1] != 4 or boxes2.shape[-1] != 4:
        raise ValueError(f"boxes must have 4 coordinates on the last axis, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}")
    if not aligned:
        boxes1, boxes2 = boxes1[:, None, :], boxes2[None, :, :]
    elif boxes1.shape != boxes2.shape:
        raise ValueError(f"aligned boxes must have the same shape, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}")
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = (area1 + area2 - inter).clamp(min=eps)
    iou = inter / union
    enclose_wh = (torch.maximum(boxes1[..., 2:], boxes2[..., 2:]) - torch.minimum(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    enclose = (enclose_wh[..., 0] * enclose_wh[..., 1]).clamp(min=eps)
    return iou - (enclose - union) / enclose
