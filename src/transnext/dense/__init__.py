"""Dense prediction: backbones, detectors and segmenters with the reference's dense-task settings.

* :class:`TransNeXtBackbone` / :func:`create_backbone`: four NCHW maps (strides 4-32), with
  ``out_channels`` and ``feature_info``;
* :class:`TransNeXtFPN` / :func:`create_fpn_backbone`: the same plus torchvision's FPN, with the
  interface of torchvision's ``BackboneWithFPN`` (for its detectors);
* :func:`maskrcnn_transnext`, :func:`retinanet_transnext`, :func:`fcos_transnext`: torchvision
  detectors on a TransNeXt + FPN trunk;
* :func:`dino_transnext`: DINO (deformable transformer, denoising, mixed query selection) in plain
  PyTorch, as the reference's DINO configs; :func:`convert_mmdet_dino` renames mmdet DINO checkpoints;
* :func:`upernet_transnext`: UPerNet (PPM + FPN fusion, auxiliary FCN head) as in the reference;
* :func:`mask2former_transnext`: Mask2Former (deformable pixel decoder, masked-attention decoder) as in the reference;
* :func:`load_reference_checkpoint` loads the reference's published mmseg UPerNet and mmdet Mask R-CNN
  checkpoints (the latter into ``maskrcnn_transnext(..., reference=True)``, mmdet's test-time computation);
  :func:`import_reference_checkpoint` writes them as checkpoints the dense commands read;
* segmentation_models_pytorch: ``smp.UPerNet("tu-transnext_tiny", ...)`` works through the timm
  registration; :func:`transnext.integrations.smp.register_encoders` adds native encoder names.

Training recipes (:data:`transnext.dense.config.DENSE_RECIPES`), metrics
(:mod:`transnext.dense.metrics`) and inference modes (:mod:`transnext.dense.inference`) live in
the submodules; torchvision is imported only when a detector is built.
"""

from .backbone import DENSE_PRESETS, DensePreset, TransNeXtBackbone, TransNeXtFPN, create_backbone, create_fpn_backbone
from .detection import build_trunk, fcos_transnext, maskrcnn_transnext, retinanet_transnext
from .dino import DINO, convert_mmdet_dino, dino_transnext
from .mask2former import Mask2Former, Mask2FormerHead, convert_mmdet_mask2former, mask2former_transnext
from .reference_checkpoints import load_reference_checkpoint
from .reference_import import import_reference_checkpoint
from .upernet import FCNHead, UPerHead, UPerNet, segmentation_loss, upernet_transnext

__all__ = [
    "DENSE_PRESETS",
    "DINO",
    "DensePreset",
    "FCNHead",
    "Mask2Former",
    "Mask2FormerHead",
    "TransNeXtBackbone",
    "TransNeXtFPN",
    "UPerHead",
    "UPerNet",
    "build_trunk",
    "convert_mmdet_mask2former",
    "create_backbone",
    "convert_mmdet_dino",
    "create_fpn_backbone",
    "dino_transnext",
    "fcos_transnext",
    "import_reference_checkpoint",
    "load_reference_checkpoint",
    "mask2former_transnext",
    "maskrcnn_transnext",
    "retinanet_transnext",
    "segmentation_loss",
    "upernet_transnext",
]
