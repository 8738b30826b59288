"""Shared parts of the visualisations: optional dependencies, images, models and stage outputs."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTRA = "visualize"


def require(module: str, package: str | None = None) -> Any:
    """Import an optional dependency, or fail with the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"this visualisation needs {package or module}, which is not installed: "
            f"pip install 'transnext-pytorch[{EXTRA}]' (the optional '{EXTRA}' extra: matplotlib, grad-cam)"
        ) from e


# ---------------------------------------------------------------------------------------- images
@dataclass
class ImageBatch:
    """Images as (N, 3, H, W) floats in [0, 1] (not normalised), with a name for each."""

    pixels: Tensor
    names: list[str]

    def normalized(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
        m = torch.tensor(mean, dtype=self.pixels.dtype).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=self.pixels.dtype).view(1, -1, 1, 1)
        return (self.pixels - m) / s


def load_images(source: str | Path | Sequence[str | Path] | None, size: int | tuple[int, int], limit: int | None = None) -> ImageBatch:
    """Images resized to ``size``: files and/or folders, or ``None`` for the embedded demo images.

    The demo images are 28x28 silhouettes (one per class first); they are enlarged bilinearly.
    """
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    if H < 1 or W < 1:
        raise ValueError(f"image size must be positive, got {H}x{W}")
    if limit is not None and limit < 1:
        raise ValueError(f"the number of images must be >= 1, got {limit}")
    if source is None:
        return _demo_images((H, W), limit or 8)
    from PIL import Image

    from ..data import find_images, load_image

    sources = [source] if isinstance(source, (str, Path)) else list(source)
    paths = find_images(sources)  # DataError (a ValueError) for a missing path or an empty folder
    if limit is not None:
        paths = paths[:limit]
    pixels = []
    for p in paths:
        img = load_image(p).resize((W, H), Image.BICUBIC)
        pixels.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(H, W, 3).permute(2, 0, 1))
    return ImageBatch(torch.stack(pixels).float().div_(255).clamp_(0, 1), [Path(p).stem for p in paths])


def _demo_images(size: tuple[int, int], n: int) -> ImageBatch:
    import numpy as np

    from ..data.demo import demo_arrays

    z = demo_arrays()
    labels = np.asarray(z["val_labels"])
    classes = [str(c) for c in z["classes"]]
    first = [int(np.nonzero(labels == c)[0][0]) for c in range(len(classes)) if (labels == c).any()]
    order = (first + [i for i in range(len(labels)) if i not in set(first)])[:n]
    gray = torch.from_numpy(np.ascontiguousarray(z["val_images"][order])).float().div_(255)
    pixels = F.interpolate(gray.unsqueeze(1), size=size, mode="bilinear", align_corners=False).clamp_(0, 1)
    return ImageBatch(pixels.expand(-1, 3, -1, -1).contiguous(), [f"demo_{k:02d}_{classes[labels[i]]}" for k, i in enumerate(order)])


# ---------------------------------------------------------------------------------------- models
@dataclass
class LoadedModel:
    model: nn.Module
    name: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    classes: list[str] | None = None


def load_model(
    spec: str | nn.Module,
    checkpoint: str | None = None,
    pretrained: bool = False,
    **transnext_kwargs: Any,
) -> LoadedModel:
    """A model by transnext variant name, timm model name, or as given; in eval mode.

    ``spec`` may carry a weights file as ``NAME=PATH``. ``transnext_kwargs`` (``fixed_pool_size``,
    ``pos_bias``, ``num_classes`` ...) apply to transnext variants only.
    """
    if isinstance(spec, nn.Module):
        return LoadedModel(spec.eval(), type(spec).__name__)
    if not isinstance(spec, str):
        raise TypeError(f"model must be a name or an nn.Module, got {type(spec).__name__}")
    name, _, path = spec.partition("=")
    checkpoint = path or checkpoint
    from ..models import list_models
    from ..models.registry import split_name

    try:
        split_name(name)
        is_transnext = True
    except ValueError:
        is_transnext = False
    if is_transnext:
        classes = None
        kwargs = {k: v for k, v in transnext_kwargs.items() if v is not None}
        if checkpoint:
            from ..engine.modeling import model_from_checkpoint

            model, info = model_from_checkpoint(checkpoint, model=name, **kwargs)
            classes = info.get("classes")
        else:
            from ..models import create_model

            model = create_model(name, pretrained=pretrained, **kwargs)
        return LoadedModel(model.eval(), name, classes=classes)
    timm = importlib.import_module("timm") if importlib.util.find_spec("timm") else None
    if timm and timm.is_model(name):
        model = timm.create_model(name, pretrained=pretrained, checkpoint_path=checkpoint or "")
        cfg = getattr(model, "pretrained_cfg", None) or {}
        return LoadedModel(model.eval(), name, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))
    choices = list_models() + (timm.list_models() if timm else [])
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    where = "nor a timm model name (timm.list_models())" if timm else "(timm is not installed, so timm names are unavailable)"
    raise ValueError(f"unknown model {name!r}: not a transnext variant ({', '.join(list_models())}) {where}{hint}")


def num_stages(model: nn.Module) -> int | None:
    """Stages a backbone exposes (transnext or timm), or None for a plain feature-map model."""
    if hasattr(model, "num_stages") and hasattr(model, "forward_intermediates"):
        return int(model.num_stages)
    info = getattr(model, "feature_info", None)
    if hasattr(model, "forward_intermediates") and info is not None:
        return len(info)
    return None


def check_stage(model: nn.Module, stage: int | None, name: str = "model") -> int | None:
    """``stage`` made non-negative, or a ValueError naming the valid range."""
    n = num_stages(model)
    if n is None:
        if stage is not None:
            raise ValueError(f"{name} exposes no stages (no forward_intermediates); pass stage=None to use its output")
        return None
    if stage is None:
        return n - 1
    if not -n <= stage < n:
        raise ValueError(f"stage {stage} is out of range for {name}: it has {n} stages, valid: 0..{n - 1} (or -{n}..-1)")
    return stage % n


def stage_output(model: nn.Module, x: Tensor, stage: int | None, pre_norm: bool = True) -> Tensor:
    """(B, C, h, w) output of ``stage`` (0-based), or the model's own output when ``stage`` is None.

    ``pre_norm``: for transnext models, take the stage's features before its closing LayerNorm
    (the output of its last block). Summed over channels, a LayerNorm output with unit gains
    (every freshly initialised model) is identically zero, so gradient-based maps of it are empty.
    """
    if stage is None:
        out = model(x)
    elif pre_norm and hasattr(model, f"norm{stage + 1}") and hasattr(model, "stage_grids"):
        captured: list[Tensor] = []
        handle = getattr(model, f"norm{stage + 1}").register_forward_hook(lambda m, args, out: captured.append(args[0]))
        try:
            fmap = model.forward_intermediates(x, indices=[stage], intermediates_only=True, output_fmt="NCHW")[0]
        finally:
            handle.remove()
        B, C, h, w = fmap.shape
        out = captured[-1].transpose(1, 2).reshape(B, C, h, w)  # (B, N, C) tokens over the stage grid
    else:
        out = model.forward_intermediates(x, indices=[stage], intermediates_only=True, output_fmt="NCHW")[0]
    if out.ndim != 4:
        raise ValueError(f"expected a (B, C, h, w) feature map, got shape {tuple(out.shape)}")
    return out
