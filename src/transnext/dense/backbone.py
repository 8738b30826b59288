"""TransNeXt as a dense-prediction backbone: four NCHW feature maps (strides 4, 8, 16, 32).

:class:`TransNeXtBackbone` wraps a :class:`~transnext.models.TransNeXt` without its classifier and
returns the stage outputs (after each stage's LayerNorm), with ``out_channels`` / ``strides`` /
``feature_info`` describing them. :class:`TransNeXtFPN` adds torchvision's
``FeaturePyramidNetwork`` and has the interface of torchvision's ``BackboneWithFPN`` (an
``OrderedDict`` of maps, an int ``out_channels``), so it plugs into torchvision's detectors.

:func:`create_backbone` applies the settings the reference uses for dense tasks (docs/model.md section 8):
``pretrain_size`` 224, ``img_size`` 512 (UPerNet, Mask2Former) or 800 (Mask R-CNN, DINO),
interpolated position bias (UPerNet also has "extrapolation" configs), and the stochastic-depth
rate of each task and variant.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ..models.registry import create_model, split_name
from ..models.transnext import TransNeXt
from ..recipes import BackboneSettings, backbone_settings

__all__ = ["DENSE_PRESETS", "DensePreset", "TransNeXtBackbone", "TransNeXtFPN", "create_backbone", "create_fpn_backbone"]


# Backbone settings of one dense-task recipe of the reference (the registry's record type).
DensePreset = BackboneSettings

# Name -> settings: a view of the registry's backbone records (transnext.recipes.RECIPES, kind "backbone").
DENSE_PRESETS: dict[str, DensePreset] = backbone_settings()


class TransNeXtBackbone(nn.Module):
    """Multi-scale feature extractor: ``forward(x)`` -> list of NCHW maps, one per ``out_indices``.

    Args:
        model: a TransNeXt (its classifier and any stage after the last requested one are removed).
        out_indices: stages to return (0-3; 0 = stride 4).
        frozen_stages: freeze stages ``0..frozen_stages`` (patch embedding, blocks and norm) and
            keep them in eval mode; ``-1`` freezes nothing.
        return_dict: return an ``OrderedDict`` ``{"0": map, "1": map, ...}`` (torchvision style).
    """

    def __init__(
        self,
        model: TransNeXt,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        return_dict: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, TransNeXt):
            raise TypeError(f"expected a TransNeXt model, got {type(model).__name__}")
        self.out_indices = tuple(model.prune_intermediate_layers(tuple(out_indices)))
        self.model = model
        self.frozen_stages = frozen_stages
        self.return_dict = return_dict
        info = model.feature_info
        self.out_channels = [info[i]["num_chs"] for i in self.out_indices]
        self.strides = [info[i]["reduction"] for i in self.out_indices]
        self.feature_info = [dict(info[i], index=i) for i in self.out_indices]
        self._freeze()

    def _stage_modules(self, i: int) -> list[nn.Module]:
        return [getattr(self.model, f"{p}{i + 1}") for p in ("patch_embed", "block", "norm")]

    def _freeze(self) -> None:
        for i in range(min(self.frozen_stages + 1, self.model.num_stages)):
            for m in self._stage_modules(i):
                m.eval()
                for p in m.parameters():
                    p.requires_grad_(False)

    def train(self, mode: bool = True) -> TransNeXtBackbone:
        super().train(mode)
        self._freeze()  # frozen stages stay in eval mode (no drop path)
        return self

    def forward(self, x: Tensor) -> list[Tensor] | OrderedDict[str, Tensor]:
        feats = self.model.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)
        if self.return_dict:
            return OrderedDict((str(i), f) for i, f in enumerate(feats))
        return feats


class TransNeXtFPN(nn.Module):
    """Backbone + torchvision ``FeaturePyramidNetwork`` (+ max-pool level), like ``BackboneWithFPN``.

    ``forward(x)`` -> ``OrderedDict`` of ``out_channels``-channel maps (``"0"`` ... and ``"pool"``).
    """

    def __init__(self, backbone: TransNeXtBackbone, out_channels: int = 256, extra_blocks: nn.Module | None = None) -> None:
        super().__init__()
        try:
            from torchvision.ops import FeaturePyramidNetwork
            from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("TransNeXtFPN needs torchvision: pip install torchvision") from e
        backbone.return_dict = True
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(
            backbone.out_channels, out_channels, extra_blocks=extra_blocks if extra_blocks is not None else LastLevelMaxPool()
        )
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(x))


def create_backbone(
    name: str,
    task: str | None = "upernet",
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    out_indices: Sequence[int] | None = None,
    frozen_stages: int = -1,
    return_dict: bool = False,
    **overrides: Any,
) -> TransNeXtBackbone:
    """A backbone with the reference settings of ``task`` (see :data:`DENSE_PRESETS`).

    Args:
        name: variant or ``variant.tag`` (weights); ``pretrained`` / ``checkpoint_path`` load a
            classification checkpoint (its head is dropped).
        task: a key of :data:`DENSE_PRESETS`, or ``None`` for the model defaults (classification
            settings: extrapolated bias at the weights' resolution, no stochastic depth).
        overrides: any :func:`transnext.create_model` argument (``drop_path_rate``, ``img_size``,
            ``pos_bias``, ``fixed_pool_size``, ``attn_backend``...); they win over the preset.
    """
    variant, _ = split_name(name)
    kwargs: dict[str, Any] = {}
    if task is not None:
        if task not in DENSE_PRESETS:
            raise ValueError(f"unknown dense task {task!r}; expected one of {', '.join(DENSE_PRESETS)} or None")
        preset = DENSE_PRESETS[task]
        kwargs.update(img_size=preset.img_size, pretrain_size=preset.pretrain_size, pos_bias=preset.pos_bias)
        if "drop_path_rate" not in overrides:
            if variant not in preset.drop_path_rates:
                raise ValueError(
                    f"the {task!r} recipe publishes stochastic-depth rates for {', '.join(preset.drop_path_rates)} "
                    f"only; pass drop_path_rate= for {variant}"
                )
            kwargs["drop_path_rate"] = preset.drop_path_rates[variant]
        if out_indices is None:
            out_indices = preset.out_indices
    kwargs.update(overrides)
    model = create_model(name, pretrained=pretrained, checkpoint_path=checkpoint_path, num_classes=0, **kwargs)
    return TransNeXtBackbone(model, out_indices if out_indices is not None else (0, 1, 2, 3), frozen_stages, return_dict)


def create_fpn_backbone(
    name: str, task: str | None = "mask_rcnn", out_channels: int = 256, **kwargs: Any
) -> TransNeXtFPN:
    """:func:`create_backbone` followed by an FPN (torchvision detectors' backbone interface)."""
    return TransNeXtFPN(create_backbone(name, task=task, **kwargs), out_channels)

