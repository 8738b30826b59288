"""Training options of the dense tasks and the reference recipes as presets.

:class:`DetectionConfig` and :class:`SegmentationConfig` extend the shared
:class:`~transnext.engine.config.TrainConfig` (run length, optimizer, schedule, AMP, DDP, output)
with what a detector or a segmenter needs. :data:`DENSE_RECIPES` holds the reference recipes
beside the numbers they produced, plus the two embedded-demo presets. Precedence, as for
classification: recipe < config file (YAML/TOML/JSON) < command-line flags.

Data layout (``--data-dir`` with ``--train-split`` / ``--val-split``):

* detection (COCO format): images in ``<data-dir>/images/<split>/`` or ``<data-dir>/<split>/``,
  annotations in ``<data-dir>/annotations/instances_<split>.json`` (COCO 2017:
  ``--train-split train2017 --val-split val2017``);
* segmentation: ``<data-dir>/images/<split>/`` + ``<data-dir>/annotations/<split>/`` (ADE20K:
  ``--train-split training --val-split validation``; ``--data-format masks`` for label maps
  that use 0..K-1 and 255 = ignore without ADE20K's zero reduction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..engine.config import TrainConfig, load_config_file
from ..engine.presets import DEMO_ARCH

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
    detector: str = "mask_rcnn"  # "mask_rcnn", "retinanet" or "fcos"
    min_size: tuple = (800,)  # shorter side; several values: one drawn per batch (multi-scale training)
    max_size: int = 1333
    fpn_channels: int = 256
    anchor_sizes: tuple = ()  # one base anchor size per FPN level (empty: 32-512, the reference for 800 px images)
    representation_size: int | None = None  # box head MLP width (None: torchvision's 1024)
    mask_layers: tuple = ()  # mask head conv widths (empty: torchvision's 4 x 256)
    detector_kwargs: dict = field(default_factory=dict)  # further torchvision detector arguments
    box_score_thresh: float = 0.05
    detections_per_img: int = 100

    def validate(self) -> None:
        super().validate()
        if self.detector not in ("mask_rcnn", "retinanet", "fcos"):
            raise ValueError(f"detector must be mask_rcnn, retinanet or fcos, got {self.detector!r}")
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
# Settings that do not apply to dense tasks are neutralised so the shared defaults (ImageNet
# augmentation) cannot leak in.
_DENSE_COMMON: dict[str, Any] = dict(
    dataset="folder", pretrain_size=224, pos_bias="interpolate", opt="adamw", opt_eps=1e-8, weight_decay=0.05,
    clip_grad=None, aa=None, reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, repeated_aug=1, compile=False,
    num_workers=4, total_batch_size=16,
)

# Long recipes also save `last` every this many optimizer steps (about a quarter of an hour on 8
# GPUs), so that an interruption loses minutes, not a COCO epoch or 16k UPerNet iterations.
LONG_RUN_SAVE_EVERY_STEPS = 1000

# Mask R-CNN 1x (mmdet): 12 epochs, AdamW 1e-4 / wd 0.05, x0.1 after epochs 8 and 11, linear warm-up
# over 500 iterations from 0.001 x lr, 2 images per GPU x 8 GPUs, resize to fit 1333x800, flip 0.5.
_MASK_RCNN_1X: dict[str, Any] = dict(
    _DENSE_COMMON, detector="mask_rcnn", dense_preset="mask_rcnn", img_size=800, min_size=(800,), max_size=1333,
    hflip=0.5, batch_size=2, epochs=12, lr=1e-4, sched="step", decay_milestones=(8, 11), decay_rate=0.1,
    sched_per_step=True, warmup_steps=500, warmup_lr=1e-7, min_lr=0.0, pretrained=True,
    train_split="train2017", val_split="val2017", save_every_steps=LONG_RUN_SAVE_EVERY_STEPS,
)

# UPerNet 160k (mmseg): AdamW 6e-5 / wd 0.05, poly (power 1) to 0 over 160k iterations, linear
# warm-up over 1,500 iterations from 1e-6 x lr, 2 images per GPU x 8 GPUs, 512x512 crops.
_UPERNET_160K: dict[str, Any] = dict(
    _DENSE_COMMON, dense_preset="upernet", img_size=512, crop_size=512, batch_size=2, max_steps=160_000, epochs=1,
    lr=6e-5, sched="poly", poly_power=1.0, min_lr=0.0, warmup_steps=1500, warmup_lr=6e-11, hflip=0.5,
    eval_every_steps=16_000, save_every_steps=LONG_RUN_SAVE_EVERY_STEPS, pretrained=True, data_format="ade20k", num_classes=150,
    train_split="training", val_split="validation",
)

# The demos' trunk is the classification demo's model (``transnext demo``: DEMO_ARCH), with its position bias as
# trained there (extrapolated, coordinates normalised by a 64 px grid). ``transnext detect|segment demo`` start it
# from that demo's trained weights (silhouettes of the classification training split only), cached per user and
# trained on the fly when missing (transnext.dense.workflow.demo_backbone); ``train --preset *_demo`` starts it
# from --backbone-weights or random.
DEMO_TRUNK: dict[str, Any] = dict(DEMO_ARCH)

_DEMO_COMMON: dict[str, Any] = dict(
    _DENSE_COMMON, dataset="demo", model="transnext_micro", model_kwargs=DEMO_TRUNK, img_size=128, pretrain_size=64,
    pos_bias="extrapolate", drop_path=0.0, total_batch_size=None, opt="adamw", weight_decay=0.05, sched="cosine",
    warmup_steps=30, warmup_lr=1e-5,
    min_lr=1e-5, clip_grad=5.0, amp="none", num_workers=1, threads=1, train_split="train", val_split="val",
    test_split="test", log_every=10, reference_no_decay=False,
)

DENSE_RECIPES: dict[str, dict[str, Any]] = {
    # name: (task, options, published result)
    "mask_rcnn_1x_tiny": dict(_MASK_RCNN_1X, model="transnext_tiny"),
    "mask_rcnn_1x_small": dict(_MASK_RCNN_1X, model="transnext_small"),
    "mask_rcnn_1x_base": dict(_MASK_RCNN_1X, model="transnext_base"),
    "upernet_160k_tiny": dict(_UPERNET_160K, model="transnext_tiny"),
    "upernet_160k_small": dict(_UPERNET_160K, model="transnext_small"),
    "upernet_160k_base": dict(_UPERNET_160K, model="transnext_base"),
    "detect_demo": dict(
        _DEMO_COMMON, detector="mask_rcnn", dense_preset="mask_rcnn", min_size=(128,), max_size=128, fpn_channels=64,
        anchor_sizes=(16, 32, 64, 128, 256),  # the reference anchors, scaled to 128 px scenes
        representation_size=256, mask_layers=(64, 64), batch_size=4, epochs=3, lr=1e-3, backbone_lr_mult=0.3, hflip=0.5,
        output="runs/detect_demo",
        detections_per_img=50,
        detector_kwargs=dict(rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
                             rpn_post_nms_top_n_test=150, box_batch_size_per_image=128),
    ),
    "segment_demo": dict(
        # all 11 classes (background + the 10 animals); whole scenes resized to 96-192 px, 96 px crops (largest class
        # <= 75% of a crop, as the reference crops)
        _DEMO_COMMON, dense_preset="upernet", data_format="ade20k", num_classes=11, foreground_only=False, crop_size=96,
        resize_scale=(128, 128), ratio_range=(0.75, 1.5), channels=96, aux_channels=48, batch_size=16, epochs=8, lr=2e-3,
        backbone_lr_mult=0.3,
        output="runs/segment_demo",
    ),
}

# What each reference recipe produced (ImageNet-1K pretrained backbones; SPEC section 1).
PUBLISHED: dict[str, str] = {
    "mask_rcnn_1x_tiny": "COCO val2017 box AP 49.9, mask AP 44.6",
    "mask_rcnn_1x_small": "COCO val2017 box AP 51.1, mask AP 45.5",
    "mask_rcnn_1x_base": "COCO val2017 box AP 51.7, mask AP 45.9",
    "upernet_160k_tiny": "ADE20K val mIoU 51.1",
    "upernet_160k_small": "ADE20K val mIoU 52.2",
    "upernet_160k_base": "ADE20K val mIoU 53.0",
}


def resolve_dense_config(config_cls: type[TrainConfig], recipe: str | None = None, file: str | Path | None = None,
                         overrides: dict[str, Any] | None = None, require_data: bool = True) -> Any:
    """Recipe < config file < explicit overrides, as a ``config_cls`` instance (``require_data=False``: no data dir needed)."""
    file_opts = load_config_file(file) if file else {}
    overrides = dict(overrides or {})
    recipe = recipe or overrides.pop("preset", None) or file_opts.pop("preset", None)
    base: dict[str, Any] = {}
    if recipe is not None:
        if recipe not in DENSE_RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; available: {', '.join(DENSE_RECIPES)}")
        base = dict(DENSE_RECIPES[recipe])
    merged = {**base, **file_opts, **overrides}
    merged["preset"] = recipe
    return config_cls.from_dict(merged, require_data=require_data)
