"""Effective receptive field (Luo et al. 2016), measured as in the large-kernel ConvNet papers.

For each image: the gradient of the centre unit of a stage's output (summed over channels) with
respect to the input pixels, absolute values summed over the colour channels. The maps are
averaged over the images, then ``log10(1 + x)``-scaled and divided by their maximum. The area
ratios are those tabulated in that literature: the smallest square centred on the image that
holds a given fraction of the (scaled) map's mass, as a fraction of the image area.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from ._common import IMAGENET_MEAN, IMAGENET_STD, ImageBatch, check_stage, stage_output

__all__ = ["AREA_THRESHOLDS", "ErfResult", "area_ratio", "effective_receptive_field", "input_gradient_map"]

AREA_THRESHOLDS = (0.2, 0.5, 0.8, 0.99)


@dataclass
class ErfResult:
    """``raw``: the mean |gradient| map (H, W); ``heat``: log-scaled and normalised to max 1."""

    name: str
    stage: int | None
    raw: Tensor
    heat: Tensor
    area_ratios: dict[float, float] = field(default_factory=dict)
    num_images: int = 0


def input_gradient_map(model: nn.Module, x: Tensor, stage: int | None = None) -> Tensor:
    """Sum over a batch of |d(centre unit, summed over channels) / d input|, summed over colour: (H, W)."""
    x = x.detach().clone().requires_grad_(True)
    out = stage_output(model, x, stage)
    h, w = out.shape[-2:]
    # Eval mode: no unit depends on another image of the batch, so one backward through the sum of
    # the centre units gives every image its own input gradient.
    out[:, :, h // 2, w // 2].sum().backward()
    return x.grad.detach().abs().sum(dim=(0, 1))


def area_ratio(heat: Tensor, threshold: float) -> float:
    """Area fraction of the smallest square centred at (H//2, W//2) holding ``threshold`` of the mass.

    Squares have odd sides (1, 3, 5, ...) and are clipped at the image border, so the last one is
    the whole image (ratio 1).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    heat = heat.double()
    H, W = heat.shape
    total = heat.sum()
    if total <= 0:
        raise ValueError("the map is all zeros: the output does not depend on the input")
    cy, cx = H // 2, W // 2
    # Cumulative sums make each square's mass an O(1) look-up.
    cum = torch.zeros(H + 1, W + 1, dtype=torch.float64)
    cum[1:, 1:] = heat.cumsum(0).cumsum(1)
    for r in range(max(H, W) + 1):
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, H), max(cx - r, 0), min(cx + r + 1, W)
        mass = cum[y1, x1] - cum[y0, x1] - cum[y1, x0] + cum[y0, x0]
        # A tiny tolerance so a square holding exactly the threshold counts (rounding of the sums).
        if mass >= threshold * total * (1 - 1e-12):
            return (y1 - y0) * (x1 - x0) / (H * W)
    return 1.0


@torch.no_grad()
def _scale(raw: Tensor) -> Tensor:
    heat = torch.log10(raw.double() + 1)
    return heat / heat.max() if heat.max() > 0 else heat


def effective_receptive_field(
    model: nn.Module,
    images: ImageBatch | Tensor,
    stage: int | None = -1,
    batch_size: int = 4,
    name: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    thresholds: Sequence[float] = AREA_THRESHOLDS,
) -> ErfResult:
    """ERF of ``model``'s ``stage`` output (0-based; None: the model's own output, a feature map).

    ``images``: an :class:`ImageBatch` (normalised with ``mean``/``std``, ImageNet's by default) or
    an already normalised (N, C, H, W) tensor.
    """
    name = name or type(model).__name__
    stage = check_stage(model, stage, name)
    if isinstance(images, ImageBatch):
        x = images.normalized(mean or IMAGENET_MEAN, std or IMAGENET_STD)
    else:
        x = images
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, C, H, W) image batch, got shape {tuple(x.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    total = torch.zeros(x.shape[-2:], dtype=torch.float64)
    for chunk in x.split(batch_size):
        total += input_gradient_map(model, chunk, stage).double().cpu()
    model.zero_grad(set_to_none=True)
    raw = total / x.shape[0]
    heat = _scale(raw)
    ratios = {t: area_ratio(heat, t) for t in thresholds} if heat.max() > 0 else {}
    return ErfResult(name, stage, raw, heat, ratios, x.shape[0])
