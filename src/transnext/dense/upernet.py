"""UPerNet (PPM + FPN fusion) with the auxiliary FCN head, as in the reference ADE20K configs.

The head follows mmseg's ``UPerHead`` as the reference uses it: ``channels`` 512, pyramid pooling
at scales 1, 2, 3, 6 on the stride-32 map (1x1 conv + BN + ReLU per scale, then a 3x3 bottleneck
over the map and its pooled copies), 1x1 lateral and 3x3 output convs (BN + ReLU) on the other
maps, top-down sums, a 3x3 fusion conv over the concatenated maps upsampled to stride 4, dropout
0.1 and a 1x1 classifier. The auxiliary ``FCNHead`` reads stage 3 (stride 16): one 3x3 conv with
256 channels, dropout 0.1, a 1x1 classifier; its loss weight is 0.4 and it only runs in training.

segmentation_models_pytorch's ``UPerNet`` differs from this head (it adds LayerNorms on the
encoder maps, has no dropout before the classifier and no auxiliary FCN head), so the reference
head is written out here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import TransNeXtBackbone

__all__ = ["FCNHead", "UPerHead", "UPerNet", "segmentation_loss", "upernet_transnext"]


class ConvBNReLU(nn.Sequential):
    """Conv (no bias: BN follows) + BatchNorm + ReLU, mmcv ``ConvModule`` style."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        # mmcv's ConvModule initialisation: Kaiming normal (fan_out, ReLU), BN weight 1 / bias 0.
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class _Classifier(nn.Sequential):
    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__(nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(), nn.Conv2d(channels, num_classes, 1))
        nn.init.normal_(self[1].weight, std=0.01)  # mmseg's conv_seg initialisation
        nn.init.zeros_(self[1].bias)


class UPerHead(nn.Module):
    """Pyramid pooling on the last map + FPN over all maps, fused at the finest resolution."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        in_channels = list(in_channels)
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels[-1], channels, 1)) for s in self.pool_scales
        )
        self.ppm_bottleneck = ConvBNReLU(in_channels[-1] + len(self.pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.classifier = _Classifier(channels, num_classes, dropout)

    def _psp(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        return self.ppm_bottleneck(torch.cat([x, *(_resize(m(x), size) for m in self.ppm)], dim=1))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)] + [self._psp(feats[-1])]
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([_resize(o, size) for o in outs], dim=1))
        return self.classifier(fused)


class FCNHead(nn.Module):
    """``num_convs`` 3x3 conv-BN-ReLU layers and a classifier (the auxiliary head)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.convs = nn.Sequential(*(ConvBNReLU(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs)))
        self.classifier = _Classifier(channels, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.convs(x))


class UPerNet(nn.Module):
    """Backbone + :class:`UPerHead` (+ :class:`FCNHead` on ``aux_index`` during training).

    ``forward(x)`` returns ``{"out": logits}`` at the input resolution (bilinear), plus ``"aux"``
    in training mode when the auxiliary head exists (torchvision's segmentation convention).
    """

    def __init__(self, backbone: TransNeXtBackbone, num_classes: int, channels: int = 512,
                 aux_head: bool = True, aux_index: int = 2, aux_channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        backbone.return_dict = False
        self.backbone = backbone
        self.num_classes = num_classes
        self.decode_head = UPerHead(backbone.out_channels, num_classes, channels, dropout=dropout)
        self.aux_index = aux_index
        self.aux_head = FCNHead(backbone.out_channels[aux_index], num_classes, aux_channels, dropout=dropout) if aux_head else None

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        size = x.shape[-2:]
        feats = self.backbone(x)
        out = OrderedDict(out=_resize(self.decode_head(feats), size))
        if self.training and self.aux_head is not None:
            out["aux"] = _resize(self.aux_head(feats[self.aux_index]), size)
        return out


def segmentation_loss(outputs: dict[str, Tensor], target: Tensor, ignore_index: int = 255, aux_weight: float = 0.4) -> dict[str, Tensor]:
    """Cross-entropy of ``out`` (weight 1) and ``aux`` (``aux_weight``), ignoring ``ignore_index``.

    Returns ``{"loss": total, "loss_seg": ..., "loss_aux": ...}``. A batch whose pixels are all
    ignored gives a zero loss (with a graph) rather than NaN.
    """
    target = target.long()
    valid = (target != ignore_index).sum()

    def ce(logits: Tensor) -> Tensor:
        if logits.shape[-2:] != target.shape[-2:]:
            logits = _resize(logits, target.shape[-2:])
        loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
        return loss / valid.clamp(min=1)

    losses = {"loss_seg": ce(outputs["out"])}
    if "aux" in outputs:
        losses["loss_aux"] = aux_weight * ce(outputs["aux"])
    losses["loss"] = sum(losses.values())  # type: ignore[assignment]
    return losses


def upernet_transnext(
    variant: str = "transnext_tiny",
    num_classes: int = 150,
    backbone_weights: str | Path | bool | None = None,
    preset: str | None = "upernet",
    aux_head: bool = True,
    channels: int = 512,
    aux_channels: int = 256,
    frozen_stages: int = -1,
    **backbone_kwargs: Any,
) -> UPerNet:
    """UPerNet on a TransNeXt trunk with the reference settings of ``preset``.

    Args:
        variant: TransNeXt variant (``transnext_tiny`` ...).
        num_classes: output classes (ADE20K: 150).
        backbone_weights: a classification checkpoint file (ours or the published ``.pth``), or
            ``True`` / a ``variant.tag`` name for the published ImageNet weights; ``None``: random.
        preset: backbone settings (:data:`~transnext.dense.DENSE_PRESETS`; ``upernet`` or
            ``upernet_extrapolation``), or ``None`` for the model defaults.
        aux_head: add the auxiliary FCN head on stage 3 (used in training only).
        **backbone_kwargs: :func:`~transnext.dense.create_backbone` / model arguments
            (``drop_path_rate``, ``img_size``, ``embed_dims`` ...).
    """
    from .detection import build_trunk

    backbone = build_trunk(variant, backbone_weights, preset, frozen_stages=frozen_stages, **backbone_kwargs)
    if len(backbone.out_channels) != 4:
        raise ValueError(f"UPerNet needs the four stage maps, got out_indices {backbone.out_indices}")
    return UPerNet(backbone, num_classes, channels=channels, aux_head=aux_head, aux_channels=aux_channels)
