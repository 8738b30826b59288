"""Segmentation inference modes: whole image, sliding window, multi-scale + flip (mmseg semantics).

* whole: one forward pass over the (resized) image.
* slide: ``crop x crop`` windows every ``stride`` pixels (reference: 512 / 341); the last window
  of a row or column is moved back to end at the border; overlapping logits are averaged. The
  stride may not exceed the crop (pixels between windows would get no scores).
* multi-scale + flip: the image is resized by each ratio (reference: 0.5, 0.75, ... 1.75), run
  in the chosen mode (and mirrored if ``flip``), the softmax maps are resized to the output size
  and averaged.

All functions take a normalised ``1x3xHxW`` (or ``Bx3xHxW``) tensor and return class scores at
``out_size`` (logits for a single whole/slide pass, probabilities once several passes are
averaged, like mmseg's ``aug_test``); ``argmax(1)`` gives the label map. Non-finite scores are an
error rather than a class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["check_slide", "segment_image", "slide_windows"]


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out["out"] if isinstance(out, dict) else out


def check_slide(crop: int, stride: int) -> None:
    """Refuse sliding-window settings that leave pixels outside every window (stride larger than the crop)."""
    if stride < 1 or crop < 1:
        raise ValueError(f"sliding-window crop and stride must be positive, got crop {crop}, stride {stride}")
    if stride > crop:
        raise ValueError(f"sliding-window stride {stride} is larger than the crop {crop}: the pixels between windows would "
                         f"get no prediction; use a stride <= the crop size (--stride <= --crop)")


def slide_windows(H: int, W: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """``(y1, y2, x1, x2)`` windows covering ``HxW`` (mmseg's ``slide_inference`` grid); ``stride <= crop``."""
    check_slide(crop, stride)
    rows = max(H - crop + stride - 1, 0) // stride + 1
    cols = max(W - crop + stride - 1, 0) // stride + 1
    out = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, H), min(c * stride + crop, W)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


@torch.no_grad()
def _single(model: nn.Module, x: Tensor, mode: str, crop: int, stride: int, num_classes: int) -> Tensor:
    if mode == "whole":
        return _logits(model, x)
    if mode != "slide":
        raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    B, _, H, W = x.shape
    total = x.new_zeros(B, num_classes, H, W)
    count = x.new_zeros(1, 1, H, W)
    for y1, y2, x1, x2 in slide_windows(H, W, crop, stride):
        total[:, :, y1:y2, x1:x2] += _logits(model, x[:, :, y1:y2, x1:x2]).float()
        count[:, :, y1:y2, x1:x2] += 1
    if not bool((count > 0).all()):  # the grid covers every pixel when stride <= crop; a gap would divide 0 by 0
        raise RuntimeError(f"sliding-window inference left {int((count == 0).sum())} pixels without a window "
                           f"(crop {crop}, stride {stride}, image {H}x{W})")
    return total / count


def _finite(scores: Tensor) -> Tensor:
    # argmax of a NaN score would silently become a class
    if not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).any(1).sum())
        raise RuntimeError(f"the model gave non-finite (NaN / inf) class scores at {bad} pixels; they cannot be turned into "
                           "classes (a diverged checkpoint, or fp16 overflow: try --amp none or bf16)")
    return scores


@torch.no_grad()
def segment_image(model: nn.Module, x: Tensor, out_size: Sequence[int] | None = None, num_classes: int | None = None,
                  mode: str = "whole", crop: int = 512, stride: int = 341,
                  scales: Sequence[float] = (1.0,), flip: bool = False) -> Tensor:
    """Class scores ``B x classes x out_size`` (see the module docstring)."""
    num_classes = num_classes or getattr(model, "num_classes", None)
    if num_classes is None:
        raise ValueError("num_classes is needed (the model has no num_classes attribute)")
    if mode == "slide":
        check_slide(crop, stride)
    out_size = tuple(out_size) if out_size is not None else tuple(x.shape[-2:])
    H, W = x.shape[-2:]
    passes = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    if passes == [(1.0, False)]:
        logits = _single(model, x, mode, crop, stride, num_classes).float()
        return _finite(F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False))
    acc = None
    for s, f in passes:
        size = (max(int(H * s + 0.5), 1), max(int(W * s + 0.5), 1))
        xi = x if s == 1.0 else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if f:
            xi = xi.flip(-1)
        logits = _single(model, xi, mode, crop, stride, num_classes).float()
        if f:
            logits = logits.flip(-1)
        probs = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False).softmax(1)
        acc = probs if acc is None else acc + probs
    return _finite(acc / len(passes))
