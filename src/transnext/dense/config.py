"""Training options of the dense tasks and the reference recipes as presets.

:class:`DetectionConfig` and :class:`SegmentationConfig` extend the shared
:class:`~transnext.engine.config.TrainConfig` (run length, optimizer, schedule, AMP, DDP, output)
with what a detector or a segmenter needs. :data:`DENSE_RECIPES` (options) and :data:`PUBLISHED`
(the numbers they produced, as text) are views of the recipe registry (:mod:`transnext.recipes`):
the reference recipes plus the embedded-demo presets. Precedence, as for classification: recipe <
config file (YAML/TOML/JSON) < command-line flags.

Data layout (``--data-dir`` with ``--train-split`` / ``--val-split``):

* detection (COCO format): images in ``<data-dir>/images/<split>/`` or ``<data-dir>/<split>/``,
  annotations in ``<data-dir>/annotations/instances_<split>.json`` (COCO 2017:
  ``--train-split train2017 --val-split val2017``);
* segmentation: ``<data-dir>/images/<split>/`` + ``<data-dir>/annotations/<split>/`` (ADE20K:
  ``--train-split training --val-split validation``; ``--data-format masks`` for label maps
  that use 0..K-1 and 255 = ignore without ADE20K's zero reduction).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..engine.config import TrainConfig, load_config_file
from ..recipes import DEMO_TRUNK as DEMO_TRUNK  # still importable from here
from ..recipes import LONG_RUN_SAVE_EVERY_STEPS as LONG_RUN_SAVE_EVERY_STEPS
from ..recipes import get_recipe, list_recipes, published_text, recipe_config

__all__ = [
    "DENSE_RECIPES",
    "DetectionConfig",
    "SegmentationConfig",
    "coco_split_paths",
    "resolve_dense_config",
]

# Parameters without weight decay in the reference dense configs (mmcv custom_keys, decay_mult 0):
# any parameter whose name contains one of these. Biases and BatchNorm weights of the heads keep
# their decay there, and here.
REFERENCE_NO_DECAY_KEYS = ("query_embedding", "relative_pos_bias_local", "cpb", "temperature", "norm")


# TrainConfig options the dense tasks never read (ImageNet augmentation, mixup, label smoothing,
# the classification eval crop): accepted, but not listed by ``--help``.
DENSE_IGNORED_OPTIONS = frozenset({
    "aa", "reprob", "remode", "scale", "ratio", "color_jitter", "interpolation", "mean", "std", "mixup", "cutmix",
    "mixup_prob", "mixup_switch_prob", "mixup_mode", "smoothing", "crop_pct",
})


@dataclass
class _DenseFields(TrainConfig):
    IGNORED_OPTIONS: ClassVar[frozenset[str]] = DENSE_IGNORED_OPTIONS
    # defaults of the shared options for a dense task without a recipe (the reference dense runs:
    # 2 images per process, total 16, backbone pretrained at 224 with an interpolated bias, no
    # ImageNet augmentation / mixup / label smoothing / repeated augmentation)
    batch_size: int = 2
    total_batch_size: int | None = 16
    pretrain_size: int | None = 224
    pos_bias: str = "interpolate"
    clip_grad: float | None = None
    num_workers: int = 4
    aa: str | None = None
    reprob: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.0
    repeated_aug: int = 1
    warmup_lr: float = 1e-7
    min_lr: float = 0.0
    dense_preset: str = "mask_rcnn"  # backbone settings (transnext.dense.DENSE_PRESETS)
    backbone_weights: str | None = None  # classification checkpoint for the trunk (--pretrained: published weights)
    frozen_stages: int = -1
    test_split: str | None = None  # held-out split the demos score best.pth on (never used for selection)
    reference_no_decay: bool = True  # weight decay rule of the reference dense configs (else: no decay on 1-D params)
    backbone_lr_mult: float = 1.0  # learning-rate scale of the trunk
    layer_decay: float | None = None  # layer-wise lr decay over the trunk's group_matcher layers (None: off)
    # sched="step" (decay_milestones, decay_rate) is a schedule of the shared TrainConfig


@dataclass
class DetectionConfig(_DenseFields):
    DATA_LAYOUT: ClassVar[str] = "COCO layout: images/<split>/ or <split>/, and annotations/instances_<split>.json"
    # the Mask R-CNN 1x schedule: 12 epochs, AdamW 1e-4, x0.1 after epochs 8 and 11, 500 warm-up steps
    img_size: int = 800
    epochs: int = 12
    lr: float = 1e-4
    sched: str = "step"
    warmup_steps: int | None = 500
    detector: str = "mask_rcnn"  # "mask_rcnn", "retinanet", "fcos" or "dino"
    min_size: tuple = (800,)  # shorter side; several values: one drawn per batch (multi-scale training)
    max_size: int = 1333
    fpn_channels: int = 256
    anchor_sizes: tuple = ()  # one base anchor size per FPN level (empty: 32-512, the reference for 800 px images)
    representation_size: int | None = None  # box head MLP width (None: torchvision's 1024)
    mask_layers: tuple = ()  # mask head conv widths (empty: torchvision's 4 x 256)
    detector_kwargs: dict = field(default_factory=dict)  # further torchvision detector arguments
    box_score_thresh: float = 0.05  # torchvision detectors; DINO keeps its top detections_per_img without a threshold
    detections_per_img: int = 100
    num_feature_levels: int = 4  # DINO: 4 (trunk strides 8-32 + one extra level) or 5 (strides 4-32 + one extra)
    num_queries: int = 900  # DINO matching queries
    dn_queries: int = 100  # DINO denoising queries (positives; as many negatives)

    def validate(self) -> None:
        super().validate()
        if self.detector not in ("mask_rcnn", "retinanet", "fcos", "dino"):
            raise ValueError(f"detector must be mask_rcnn, retinanet, fcos or dino, got {self.detector!r}")
        if self.detector == "dino":
            if self.num_feature_levels not in (4, 5):
                raise ValueError(f"num_feature_levels must be 4 or 5 for DINO, got {self.num_feature_levels}")
            if self.num_queries < 1 or self.dn_queries < 0:
                raise ValueError(f"DINO needs num_queries >= 1 and dn_queries >= 0, got {self.num_queries} and {self.dn_queries}")
        if not self.min_size or min(self.min_size) < 32 or self.max_size < 32:
            raise ValueError(f"min_size / max_size must be >= 32 pixels, got {self.min_size} / {self.max_size}")


@dataclass
class SegmentationConfig(_DenseFields):
    DATA_LAYOUT: ClassVar[str] = "ADE20K layout: images/<split>/ and annotations/<split>/ label maps"
    # the UPerNet schedule: AdamW 6e-5, poly to 0, 1,500 warm-up steps; 128 epochs is about the
    # reference 160k iterations x 16 images over ADE20K's 20,210 training images
    img_size: int = 512
    epochs: int = 128
    lr: float = 6e-5
    sched: str = "poly"
    warmup_steps: int | None = 1500
    warmup_lr: float = 6e-11
    dense_preset: str = "upernet"
    data_format: str = "ade20k"  # "ade20k" (0 = ignore, k -> k-1) or "masks" (0..K-1, 255 = ignore)
    ignore_index: int = 255
    crop_size: int = 512
    resize_scale: tuple = (2048, 512)  # keep-ratio resize target (long, short) before the crop
    ratio_range: tuple = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    photometric: bool = True
    segmenter: str = "upernet"  # "upernet" or "mask2former"
    num_queries: int = 100  # Mask2Former queries
    segmenter_kwargs: dict = field(default_factory=dict)  # further mask2former_transnext arguments (feat_channels, decoder_layers ...)
    channels: int = 512  # UPerHead width
    aux_head: bool = True
    aux_channels: int = 256
    aux_weight: float = 0.4
    eval_mode: str = "whole"  # "whole" or "slide"
    eval_stride: int = 341  # sliding-window stride (window = crop_size)
    eval_scales: tuple = (1.0,)  # ratios for multi-scale testing (reference MS: 0.5 ... 1.75)
    eval_flip: bool = False
    foreground_only: bool = False  # merge every class but 0 into "foreground" (binary segmentation, 2 classes)
    class_names: str | None = None  # a text file with one class name per line (default: <data-dir>/classes.txt if present)

    def validate(self) -> None:
        super().validate()
        if self.data_format not in ("ade20k", "masks"):
            raise ValueError(f"data_format must be 'ade20k' or 'masks', got {self.data_format!r}")
        if self.segmenter not in ("upernet", "mask2former"):
            raise ValueError(f"segmenter must be 'upernet' or 'mask2former', got {self.segmenter!r}")
        if self.num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {self.num_queries}")
        if self.eval_mode not in ("whole", "slide"):
            raise ValueError(f"eval_mode must be 'whole' or 'slide', got {self.eval_mode!r}")
        if len(self.resize_scale) != 2 or len(self.ratio_range) != 2:
            raise ValueError("resize_scale and ratio_range take two numbers each")
        if self.eval_mode == "slide" and not 0 < self.eval_stride <= self.crop_size:
            # a stride past the window leaves pixels no window covers
            raise ValueError(f"eval_stride must be between 1 and crop_size ({self.crop_size}) for sliding-window "
                             f"evaluation, got {self.eval_stride}")


# Lowest score ``transnext detect predict`` draws and lists: the demo's threshold. Short or
# small-data runs (the 3-epoch demo) score right detections well below 0.3, so 0.3 drew nothing on
# most demo images; --score-thresh overrides it.
DEFAULT_SCORE_THRESH = 0.15


def coco_split_paths(data_dir: str | Path, split: str) -> tuple[Path, Path]:
    """``(image folder, annotation file)`` of ``split`` under ``data_dir`` (see the module docstring)."""
    root = Path(data_dir)
    images = root / "images" / split
    if not images.is_dir():
        images = root / split
    return images, root / "annotations" / f"instances_{split}.json"


# ---------------------------------------------------------------------- recipes
# Views of the recipe registry (transnext.recipes.RECIPES, the one source): the options of every dense
# training recipe, and what each reference recipe produced as text (ImageNet-1K pretrained backbones).
DENSE_RECIPES: dict[str, dict[str, Any]] = {
    name: recipe_config(name) for task in ("detect", "segment") for name in list_recipes(task)
}
PUBLISHED: dict[str, str] = {name: published_text(name) for name in DENSE_RECIPES if get_recipe(name).published}


def _task_of(config_cls: type[TrainConfig]) -> str | None:
    if issubclass(config_cls, DetectionConfig):
        return "detect"
    if issubclass(config_cls, SegmentationConfig):
        return "segment"
    return None


def resolve_dense_config(config_cls: type[TrainConfig], recipe: str | None = None, file: str | Path | None = None,
                         overrides: dict[str, Any] | None = None, require_data: bool = True) -> Any:
    """Recipe < config file < explicit overrides, as a ``config_cls`` instance (``require_data=False``: no data dir needed).

    ``recipe`` is a training recipe of ``config_cls``'s task in :data:`transnext.recipes.RECIPES`;
    another name is refused with the list of that task's recipes.
    """
    file_opts = load_config_file(file) if file else {}
    overrides = dict(overrides or {})
    recipe = recipe or overrides.pop("preset", None) or file_opts.pop("preset", None)
    base: dict[str, Any] = {}
    if recipe is not None:
        base = recipe_config(get_recipe(recipe, _task_of(config_cls), kind="recipe"))
        missing = sorted(set(base) - {f.name for f in dataclasses.fields(config_cls)})
        if missing:  # a recipe of a head this build's config does not know yet
            raise ValueError(f"recipe {recipe!r} sets option(s) {', '.join(missing)} that {config_cls.__name__} does not have; "
                             "this version cannot train it")
    merged = {**base, **file_opts, **overrides}
    merged["preset"] = recipe
    return config_cls.from_dict(merged, require_data=require_data)
