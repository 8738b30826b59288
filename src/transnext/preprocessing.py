"""Input preprocessing facts shared by the weights records (models/) and the data pipeline (data/).

A leaf module: it imports nothing of the package, so ``models`` and ``data`` both depend on it
instead of on each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["DEFAULT_CROP_PCT", "IMAGENET_MEAN", "IMAGENET_STD", "SQUASH_FROM_SIZE", "build_eval_transform", "eval_crop"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Published evaluation crop: below 384 px resize the short side to size / 0.875 and centre-crop;
# at 384 px and above resize straight to size x size ("squash").
DEFAULT_CROP_PCT = 0.875
SQUASH_FROM_SIZE = 384


def eval_crop(img_size: int, crop_pct: float | None = None) -> tuple[float, str]:
    """``(crop_pct, crop_mode)`` of the published evaluation rule at ``img_size`` (or a given ``crop_pct``)."""
    if crop_pct is None:
        return (1.0, "squash") if img_size >= SQUASH_FROM_SIZE else (DEFAULT_CROP_PCT, "center")
    return crop_pct, "center"


def build_eval_transform(
    img_size: int,
    crop_pct: float | None = None,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_mode: str | None = None,
) -> Callable[[Any], Any]:
    """PIL image -> normalised tensor by the published evaluation rule (:func:`eval_crop`), built with timm."""
    from timm.data import create_transform

    pct, mode = eval_crop(img_size, crop_pct)
    return create_transform(
        input_size=img_size, is_training=False, interpolation=interpolation, mean=tuple(mean), std=tuple(std),
        crop_pct=pct, crop_mode=crop_mode or mode,
    )
