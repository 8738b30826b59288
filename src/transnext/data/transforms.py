"""Training and evaluation transforms, built with timm (the recipe of docs/model.md section 7)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# One source for the normalisation constants and the evaluation crop rule, shared with the weights records.
from ..preprocessing import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, eval_crop

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "build_eval_transform", "build_train_transform", "eval_crop", "imagenet_c_transform"]


def build_train_transform(
    img_size: int,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    interpolation: str = "bicubic",
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float = 0.4,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Any], Any]:
    from timm.data import create_transform

    return create_transform(
        input_size=img_size, is_training=True, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip,
        color_jitter=color_jitter, auto_augment=auto_augment or None, interpolation=interpolation,
        mean=tuple(mean), std=tuple(std), re_prob=re_prob, re_mode=re_mode, re_count=1,
    )


def imagenet_c_transform(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, size: int = 224
) -> Callable[[Any], Any]:
    """ImageNet-C's evaluation protocol: its images are already 224 x 224, so centre-crop to ``size``
    (a no-op on them) and normalise, without the resize of the ImageNet transform."""
    from torchvision import transforms as T

    return T.Compose([T.CenterCrop(size), T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])
