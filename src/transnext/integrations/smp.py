"""segmentation_models_pytorch (smp) encoders.

Two routes:

* through timm (no registration needed once ``transnext`` is imported)::

      smp.UPerNet("tu-transnext_tiny", encoder_weights="imagenet", classes=150,
                  img_size=512, pretrain_size=224, pos_bias="interpolate", drop_path_rate=0.4)

  extra keyword arguments reach the TransNeXt constructor; ``encoder_weights`` (any non-None
  value) loads the published ImageNet-1K checkpoint through the timm pretrained config.
* native encoder names, after :func:`register_encoders`::

      transnext.integrations.smp.register_encoders()
      smp.UPerNet("transnext_tiny", encoder_weights=None, classes=150)

  Each native encoder is built with a dense preset (default ``"upernet"``: img_size 512,
  pretrain_size 224, interpolated bias, the recipe's drop path). smp only downloads weights from
  its own hub layout, so native names start from random weights: load a classification
  checkpoint with :meth:`TransNeXtEncoder.load_checkpoint`, or use the ``tu-`` route.

Both return smp's encoder layout: ``[input, empty stride-2 map, stride 4, 8, 16, 32]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..models.registry import VARIANTS

__all__ = ["TransNeXtEncoder", "register_encoders"]


def _smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError as e:
        raise ImportError("this needs segmentation_models_pytorch: pip install 'transnext-pytorch[dense]'") from e
    return smp


class TransNeXtEncoder(nn.Module):
    """smp-compatible encoder around :class:`transnext.dense.TransNeXtBackbone`.

    Args:
        variant: TransNeXt variant name.
        task: dense preset (see :data:`transnext.dense.DENSE_PRESETS`); ``None``: model defaults.
        depth: smp encoder depth (3-5: the number of downsamplings; 5 = all four stages).
        output_stride: only 32 (TransNeXt has no dilated mode).
        **kwargs: :func:`transnext.dense.create_backbone` arguments (``drop_path_rate``, ...).
    """

    _is_torch_scriptable = False
    _is_torch_exportable = True
    _is_torch_compilable = True

    def __init__(self, variant: str, task: str | None = "upernet", depth: int = 5, output_stride: int = 32,
                 in_channels: int = 3, **kwargs: Any) -> None:
        super().__init__()
        from ..dense import create_backbone

        if not 3 <= depth <= 5:
            raise ValueError(f"depth must be 3, 4 or 5 for TransNeXt (stages at strides 4-32), got {depth}")
        if output_stride != 32:
            raise ValueError(f"TransNeXt encoders support output_stride=32 only, got {output_stride}")
        if task is not None and variant not in _preset_rates(task) and "drop_path_rate" not in kwargs:
            kwargs["drop_path_rate"] = 0.0  # the recipe publishes no rate for this variant
        self.backbone = create_backbone(variant, task=task, out_indices=tuple(range(depth - 1)),
                                        in_chans=in_channels, **kwargs)
        self._depth = depth
        self._in_channels = in_channels
        self._output_stride = output_stride
        self._out_channels = [in_channels, 0, *self.backbone.out_channels]

    @property
    def out_channels(self) -> list[int]:
        return self._out_channels[: self._depth + 1]

    @property
    def output_stride(self) -> int:
        return min(self._output_stride, 2**self._depth)

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        """Rebuild the first patch-embedding convolution for ``in_channels`` inputs (smp API).

        With ``pretrained`` the new kernel repeats the channel mean of the old one (scaled to
        keep the activation scale); otherwise it is freshly initialised.
        """
        if in_channels == self._in_channels:
            return
        from ..models.transnext import TransNeXt

        model = self.backbone.model
        old = model.patch_embed1.proj
        new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        TransNeXt._init_weights(new)
        with torch.no_grad():
            if pretrained:
                mean = old.weight.mean(dim=1, keepdim=True)
                new.weight.copy_(mean.repeat(1, in_channels, 1, 1) * (old.in_channels / in_channels))
                if old.bias is not None:
                    new.bias.copy_(old.bias)
        model.patch_embed1.proj = new
        model.in_chans = in_channels
        self._in_channels = in_channels
        self._out_channels[0] = in_channels

    def make_dilated(self, output_stride: int) -> None:
        raise ValueError("TransNeXt encoders do not support dilation (output_stride must be 32)")

    def load_checkpoint(self, path: str, strict: bool = True) -> dict[str, list[str]]:
        """Load a TransNeXt classification checkpoint (its head is dropped)."""
        from ..checkpoints import load_checkpoint

        return load_checkpoint(self.backbone.model, path, strict=strict)

    def forward(self, x: Tensor) -> list[Tensor]:
        B, _, H, W = x.shape
        feats = self.backbone(x)
        empty = torch.empty(B, 0, H // 2, W // 2, dtype=x.dtype, device=x.device)
        return [x, empty, *feats]


def _preset_rates(task: str) -> dict[str, float]:
    from ..dense import DENSE_PRESETS

    return DENSE_PRESETS[task].drop_path_rates if task in DENSE_PRESETS else {}


def register_encoders(task: str | None = "upernet", prefix: str = "") -> list[str]:
    """Add ``{prefix}transnext_*`` to smp's encoder table; returns the registered names."""
    smp = _smp()
    table = smp.encoders.encoders
    names = []
    for variant in sorted(VARIANTS):
        name = f"{prefix}{variant}"
        table[name] = {
            "encoder": TransNeXtEncoder,
            "pretrained_settings": {},
            "params": {"variant": variant, "task": task},
        }
        names.append(name)
    return names
