"""Dense prediction: multi-scale backbones with the reference's dense-task settings.

* :class:`TransNeXtBackbone` / :func:`create_backbone`: four NCHW maps (strides 4-32), with
  ``out_channels`` and ``feature_info``;
* :class:`TransNeXtFPN` / :func:`create_fpn_backbone`: the same plus torchvision's FPN, with the
  interface of torchvision's ``BackboneWithFPN`` (for its detectors);
* segmentation_models_pytorch: ``smp.UPerNet("tu-transnext_tiny", ...)`` works through the timm
  registration; :func:`transnext.integrations.smp.register_encoders` adds native encoder names.
"""

from .backbone import DENSE_PRESETS, DensePreset, TransNeXtBackbone, TransNeXtFPN, create_backbone, create_fpn_backbone

__all__ = ["DENSE_PRESETS", "DensePreset", "TransNeXtBackbone", "TransNeXtFPN", "create_backbone", "create_fpn_backbone"]
