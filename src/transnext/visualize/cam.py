"""Class activation maps of transnext classifiers through the ``grad-cam`` package.

The target layer is a stage's closing LayerNorm, whose output is (B, N, C) tokens; the package
expects (B, C, h, w) activations, so a reshape transform lays the tokens out over the stage grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from ._common import check_stage, require

__all__ = ["CAM_METHODS", "CamResult", "class_activation_maps", "token_reshape"]

# name -> (class in pytorch_grad_cam, needs gradients)
CAM_METHODS: dict[str, tuple[str, bool]] = {
    "gradcam": ("GradCAM", True),
    "gradcam++": ("GradCAMPlusPlus", True),
    "layercam": ("LayerCAM", True),
    "eigencam": ("EigenCAM", False),
    "scorecam": ("ScoreCAM", False),
}


@dataclass
class CamResult:
    """Per image: ``maps[method]`` (H, W) in [0, 1], the class explained and the top-k predictions."""

    maps: dict[str, Tensor]
    target: int
    topk: list[tuple[int, float]]


def token_reshape(grid: tuple[int, int]):
    """(B, N, C) tokens over ``grid`` -> (B, C, h, w) maps, as the grad-cam package expects."""
    h, w = grid

    def reshape(t: Tensor) -> Tensor:
        if t.ndim == 4:  # already a map
            return t
        B, N, C = t.shape
        if N != h * w:
            raise ValueError(f"expected {h}x{w}={h * w} tokens, got {N}")
        return t.transpose(1, 2).reshape(B, C, h, w)

    return reshape


def class_activation_maps(
    model: nn.Module,
    images: Tensor,
    methods: Sequence[str] = ("gradcam", "eigencam"),
    stage: int = -1,
    targets: Sequence[int] | None = None,
    topk: int = 3,
) -> list[CamResult]:
    """CAMs of a transnext classifier for normalised images (N, 3, H, W) at one stage's output.

    ``targets``: the class to explain per image (default: the top-1 prediction).
    """
    from ..models.transnext import TransNeXt

    if not isinstance(model, TransNeXt):
        raise TypeError(f"class activation maps need a transnext model, got {type(model).__name__}")
    if getattr(model, "num_classes", 0) < 1:
        raise ValueError("the model has no classifier head (num_classes=0): nothing to explain")
    unknown = [m for m in methods if m not in CAM_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown CAM method(s) {unknown}; choose from {', '.join(CAM_METHODS)}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, 3, H, W) image batch, got shape {tuple(images.shape)}")
    if targets is not None:
        if len(targets) != images.shape[0]:
            raise ValueError(f"got {len(targets)} target classes for {images.shape[0]} images")
        bad = [t for t in targets if not 0 <= t < model.num_classes]
        if bad:
            raise ValueError(f"target class(es) {bad} out of range: valid 0..{model.num_classes - 1}")
    stage = check_stage(model, stage, "the model")
    gc = require("pytorch_grad_cam", "grad-cam")
    targets_mod = require("pytorch_grad_cam.utils.model_targets", "grad-cam")

    model.eval()
    param = next(model.parameters())
    x = images.to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        probs = model(x).float().softmax(dim=-1).cpu()
    k = min(topk, probs.shape[-1])
    top_p, top_i = probs.topk(k, dim=-1)
    chosen = list(targets) if targets is not None else top_i[:, 0].tolist()
    grid = model.stage_grids(tuple(x.shape[-2:]))[stage]
    layer = getattr(model, f"norm{stage + 1}")
    maps: dict[str, Tensor] = {}
    for method in methods:
        cls_name, _ = CAM_METHODS[method]
        with getattr(gc, cls_name)(model=model, target_layers=[layer], reshape_transform=token_reshape(grid)) as cam:
            if method == "scorecam":
                cam.batch_size = 16
            out = cam(input_tensor=x, targets=[targets_mod.ClassifierOutputTarget(int(t)) for t in chosen])
        maps[method] = torch.from_numpy(out).float()
    model.zero_grad(set_to_none=True)
    return [
        CamResult({m: maps[m][i] for m in methods}, int(chosen[i]), list(zip(top_i[i].tolist(), top_p[i].tolist())))
        for i in range(x.shape[0])
    ]
