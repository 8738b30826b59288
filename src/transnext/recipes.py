"""The recipe registry: every training recipe, its backbone settings and its published figures, as data.

One record per recipe (:class:`Recipe`) in one table (:data:`RECIPES`), read through one resolver
(:func:`get_recipe`, :func:`list_recipes`) and one config builder (:func:`recipe_config`). The
older names are views of it: ``transnext.engine.PRESETS`` (classification), ``DENSE_RECIPES`` and
``PUBLISHED`` (``transnext.dense.config``), ``DENSE_PRESETS`` (``transnext.dense``: the records of
kind ``"backbone"``) and ``DROP_PATH_RATES`` (``transnext.models``). Each published ``Weights``
record names the recipe that trained it (``weights.meta["recipe"]``) and reads its figures from it.

A leaf module: it imports nothing of the package and no torch, so models/, engine/ and dense/ all
read it. Adding a recipe is one entry in ``_REGISTRY`` below. :func:`markdown_tables` (``transnext
info --recipes --format markdown``) prints the recipe table of the documentation.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "DEMO_ARCH", "KINDS", "RECIPES", "TASKS", "BackboneSettings", "Recipe", "backbone_settings", "from_scratch_drop_path_rates",
    "get_recipe", "head_label", "list_recipes", "markdown_tables", "published_text", "recipe_config", "recipe_for_weights", "summary",
]

TASKS = ("classify", "detect", "segment")
# "recipe": a full training recipe (``--preset NAME``); "backbone": the trunk settings of a dense
# task only (``dense_preset=NAME``, ``create_backbone(task=NAME)``), which dense recipes refer to.
KINDS = ("recipe", "backbone")


@dataclass(frozen=True)
class BackboneSettings:
    """Backbone settings of one dense-task recipe of the reference (``transnext.dense.DensePreset``)."""

    img_size: int
    pos_bias: str
    drop_path_rates: dict[str, float]
    out_indices: tuple[int, ...] = (0, 1, 2, 3)
    pretrain_size: int = 224
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _check_published(name: str, published: Mapping[str, Mapping[str, float]]) -> None:
    for dataset, figures in published.items():
        if not isinstance(figures, Mapping) or not figures:
            raise ValueError(f"recipe {name!r}: published[{dataset!r}] must map metric names to numbers, got {figures!r}")
        for metric, value in figures.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"recipe {name!r}: published[{dataset!r}][{metric!r}] must be a finite number, got {value!r}")


@dataclass(frozen=True)
class Recipe:
    """One recipe.

    Attributes:
        name: registry key (``--preset NAME``).
        task: ``"classify"``, ``"detect"`` or ``"segment"``.
        config: options of the task's config class (``TrainConfig`` / ``DetectionConfig`` /
            ``SegmentationConfig`` field names); read-only, :func:`recipe_config` gives a copy.
        backbone: the dense trunk settings it trains with (None for classification).
        published: figures the reference reports for it, ``{dataset: {metric: value}}``, e.g.
            ``{"COCO-val2017": {"box_ap": 49.9, "mask_ap": 44.6}}``.
        notes: where the settings and figures come from, and what is not known.
        weights: names of the published ``Weights`` records it trained.
        kind: ``"recipe"`` or ``"backbone"`` (trunk settings only, see :data:`KINDS`).
    """

    name: str
    task: str
    config: Mapping[str, Any]
    backbone: BackboneSettings | None = None
    published: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    notes: str = ""
    weights: tuple[str, ...] = ()
    kind: str = "recipe"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"recipe {self.name!r}: task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.kind not in KINDS:
            raise ValueError(f"recipe {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "backbone" and self.backbone is None:
            raise ValueError(f"recipe {self.name!r}: a backbone record needs its backbone settings")
        _check_published(self.name, self.published)
        # read-only views, so no caller can edit the one source through a record
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))
        object.__setattr__(self, "published", MappingProxyType({k: MappingProxyType(dict(v)) for k, v in self.published.items()}))
        object.__setattr__(self, "weights", tuple(self.weights))

    def published_dict(self) -> dict[str, dict[str, float]]:
        """The published figures as plain nested dicts (JSON-ready)."""
        return {k: dict(v) for k, v in self.published.items()}


# ---------------------------------------------------------------------- classification (docs/model.md section 7)
# 300-epoch ImageNet-1K training from scratch.
_IMAGENET: dict[str, Any] = dict(
    dataset="folder", img_size=224, batch_size=128, total_batch_size=1024, epochs=300,
    opt="adamw", lr=1e-3, opt_eps=1e-8, weight_decay=0.05, sched="cosine", warmup_epochs=5, warmup_lr=1e-6,
    min_lr=1e-5, clip_grad=1.0, aa="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", scale=(0.08, 1.0),
    interpolation="bicubic", mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch",
    smoothing=0.1, repeated_aug=3, amp="auto", compile=True, crop_pct=None,
)

# 5-epoch fine-tune at 384 from the 224 weights: constant lr 1e-5, no warm-up, Mixup kept, no CutMix.
_FINETUNE_384: dict[str, Any] = dict(
    _IMAGENET, img_size=384, pretrain_size=224, pretrained=True, epochs=5, lr=1e-5, sched="constant",
    warmup_epochs=0, cutmix=0.0,
)

# A small TransNeXt (same blocks, fewer and narrower) for the 28x28 demo images upsampled to 32; the
# dense demos' trunk too.
DEMO_ARCH: dict[str, Any] = dict(
    embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), depths=(1, 1, 2, 1), mlp_ratios=(4, 4, 4, 4),
    sr_ratios=(8, 4, 2, 1), window_size=(3, 3, 3, None),
)


def _imagenet(top1: float, a: float | None = None, r: float | None = None, sketch: float | None = None,
              v2: float | None = None, c_mce: float | None = None) -> dict[str, dict[str, float]]:
    """Published ImageNet figures (robustness where published; no ImageNet-C mCE for the 384 fine-tunes)."""
    out: dict[str, dict[str, float]] = {"ImageNet-1K": {"top1": top1}}
    for dataset, value in (("ImageNet-A", a), ("ImageNet-R", r), ("ImageNet-Sketch", sketch), ("ImageNet-V2", v2)):
        if value is not None:
            out[dataset] = {"top1": value}
    if c_mce is not None:
        out["ImageNet-C"] = {"mce": c_mce}
    return out


# Weights.robustness key -> (published dataset, metric)
ROBUSTNESS_FIGURES: dict[str, tuple[str, str]] = {
    "imagenet_a": ("ImageNet-A", "top1"), "imagenet_r": ("ImageNet-R", "top1"), "imagenet_sketch": ("ImageNet-Sketch", "top1"),
    "imagenet_v2": ("ImageNet-V2", "top1"), "imagenet_c_mce": ("ImageNet-C", "mce"),
}

_CLS_NOTES = "ImageNet-1K from scratch, 300 epochs (docs/model.md section 7); top-1 and robustness as published."
_FT_NOTES = "5-epoch fine-tune at 384 px from the 224 weights (docs/model.md section 7); no ImageNet-C mCE is published for it."


def _classify(name: str, config: dict[str, Any], published: dict[str, dict[str, float]] | None = None, notes: str = "",
              weights: Sequence[str] = ()) -> Recipe:
    return Recipe(name, "classify", config, None, published or {}, notes, tuple(weights))


# ---------------------------------------------------------------------- dense backbone settings (docs/model.md section 8)
def _rates(tiny: float, small: float, base: float) -> dict[str, float]:
    return {"transnext_tiny": tiny, "transnext_small": small, "transnext_base": base}


def _backbone(name: str, task: str, settings: BackboneSettings) -> Recipe:
    config = dict(dense_preset=name, img_size=settings.img_size, pretrain_size=settings.pretrain_size, pos_bias=settings.pos_bias)
    return Recipe(name, task, config, settings, {}, settings.notes, (), kind="backbone")


_BACKBONES: tuple[Recipe, ...] = (
    _backbone("upernet", "segment", BackboneSettings(512, "interpolate", _rates(0.4, 0.6, 0.7), notes="UPerNet, ADE20K 160k")),
    _backbone("upernet_extrapolation", "segment", BackboneSettings(512, "extrapolate", _rates(0.4, 0.6, 0.7),
                                                                   notes="UPerNet configs with is_extrapolation=True")),
    _backbone("mask2former", "segment", BackboneSettings(512, "interpolate", _rates(0.3, 0.5, 0.6), notes="Mask2Former, ADE20K")),
    _backbone("mask_rcnn", "detect", BackboneSettings(800, "interpolate", _rates(0.4, 0.6, 0.7), notes="Mask R-CNN 1x, COCO")),
    _backbone("dino", "detect", BackboneSettings(800, "interpolate", _rates(0.3, 0.5, 0.6), notes="DINO 5-scale, COCO")),
    _backbone("dino_4scale", "detect", BackboneSettings(800, "interpolate", _rates(0.3, 0.5, 0.6), out_indices=(1, 2, 3),
                                                        notes="DINO 4-scale, COCO: the stride-4 map is not used")),
)
_BACKBONE_OF = {r.name: r for r in _BACKBONES}


def _trunk(name: str) -> dict[str, Any]:
    """The config options a dense recipe takes from its backbone settings (one source for both)."""
    return dict(_BACKBONE_OF[name].config)


def _dense(name: str, task: str, config: dict[str, Any], published: dict[str, dict[str, float]] | None = None,
           notes: str = "") -> Recipe:
    """A dense recipe; its backbone settings are those its ``dense_preset`` option names."""
    return Recipe(name, task, config, _BACKBONE_OF[config["dense_preset"]].backbone, published or {}, notes)


# ---------------------------------------------------------------------- dense recipes
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

_COCO = dict(train_split="train2017", val_split="val2017")
_ADE20K = dict(data_format="ade20k", num_classes=150, train_split="training", val_split="validation")

# Mask R-CNN 1x (mmdet): 12 epochs, AdamW 1e-4 / wd 0.05, x0.1 after epochs 8 and 11, linear warm-up
# over 500 iterations from 0.001 x lr, 2 images per GPU x 8 GPUs, resize to fit 1333x800, flip 0.5.
_MASK_RCNN_1X: dict[str, Any] = dict(
    _DENSE_COMMON, **_trunk("mask_rcnn"), **_COCO, detector="mask_rcnn", min_size=(800,), max_size=1333,
    hflip=0.5, batch_size=2, epochs=12, lr=1e-4, sched="step", decay_milestones=(8, 11), decay_rate=0.1,
    sched_per_step=True, warmup_steps=500, warmup_lr=1e-7, min_lr=0.0, pretrained=True,
    save_every_steps=LONG_RUN_SAVE_EVERY_STEPS,
)

# UPerNet 160k (mmseg): AdamW 6e-5 / wd 0.05, poly (power 1) to 0 over 160k iterations, linear
# warm-up over 1,500 iterations from 1e-6 x lr, 2 images per GPU x 8 GPUs, 512x512 crops.
_UPERNET_160K: dict[str, Any] = dict(
    _DENSE_COMMON, **_trunk("upernet"), **_ADE20K, crop_size=512, batch_size=2, max_steps=160_000, epochs=1,
    lr=6e-5, sched="poly", poly_power=1.0, min_lr=0.0, warmup_steps=1500, warmup_lr=6e-11, hflip=0.5,
    eval_every_steps=16_000, save_every_steps=LONG_RUN_SAVE_EVERY_STEPS, pretrained=True,
)

# DINO 12 epochs (mmdet 3): AdamW 1e-4, trunk lr x0.1, wd 0.05, gradient clip 0.1, x0.1 from epoch 11,
# no warm-up, 2 images per GPU x 8 GPUs, shorter side drawn from 480..800 (step 32) up to 1333;
# 900 queries, 100 denoising queries.
_DINO_12E: dict[str, Any] = dict(
    _DENSE_COMMON, **_COCO, detector="dino", min_size=tuple(range(480, 801, 32)), max_size=1333, hflip=0.5,
    batch_size=2, epochs=12, lr=1e-4, backbone_lr_mult=0.1, clip_grad=0.1, sched="step", decay_milestones=(11,),
    decay_rate=0.1, sched_per_step=True, warmup_steps=0, min_lr=0.0, pretrained=True, num_queries=900, dn_queries=100,
    save_every_steps=LONG_RUN_SAVE_EVERY_STEPS,
)
_DINO_NOTES = ("Box AP as published (docs/model.md section 1). The training settings (optimizer, schedule, batch, "
               "multi-scale resize, queries) transcribe the reference 12-epoch configs; docs/model.md does not state "
               "them. No warm-up and flip 0.5 are assumed from those configs; their second augmentation branch "
               "(resize and random crop) is not modelled.")

# Mask2Former 160k (mmseg 1.0): AdamW 1e-4, trunk lr x0.1, wd 0.05, poly (power 0.9) to 0 over 160k
# iterations, gradient clip 0.01, 2 images per GPU x 8 GPUs, 512x512 crops, 100 queries.
_MASK2FORMER_160K: dict[str, Any] = dict(
    _DENSE_COMMON, **_trunk("mask2former"), **_ADE20K, segmenter="mask2former", num_queries=100, crop_size=512,
    batch_size=2, max_steps=160_000, epochs=1, lr=1e-4, backbone_lr_mult=0.1, sched="poly", poly_power=0.9, min_lr=0.0,
    warmup_steps=0, clip_grad=0.01, hflip=0.5, eval_every_steps=16_000, save_every_steps=LONG_RUN_SAVE_EVERY_STEPS,
    pretrained=True,
)
_MASK2FORMER_NOTES = ("mIoU as published (docs/model.md section 1), single-scale as the reference reports it; "
                      "docs/model.md gives no multi-scale figure. The training settings transcribe the reference "
                      "configs; docs/model.md does not state them. No warm-up is assumed from those configs.")

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
_DEMO_NOTES = "Embedded demo scenes, minutes on a CPU; not a reference recipe (nothing published)."

_VARIANTS = ("tiny", "small", "base")


def _per_variant(family: str, task: str, config: dict[str, Any], published: Sequence[dict[str, dict[str, float]]],
                 notes: str = "") -> tuple[Recipe, ...]:
    """``family_tiny`` / ``_small`` / ``_base``: one config, one published entry per variant (in that order)."""
    return tuple(_dense(f"{family}_{v}", task, dict(config, model=f"transnext_{v}"), pub, notes)
                 for v, pub in zip(_VARIANTS, published, strict=True))


def _coco(box: float, mask: float | None = None) -> dict[str, dict[str, float]]:
    return {"COCO-val2017": {"box_ap": box} if mask is None else {"box_ap": box, "mask_ap": mask}}


def _ade(miou: float) -> dict[str, dict[str, float]]:
    return {"ADE20K-val": {"miou": miou}}


_REGISTRY: tuple[Recipe, ...] = (
    # ---- classification
    _classify("micro", dict(_IMAGENET, model="transnext_micro", drop_path=0.15),
              _imagenet(82.5, 29.9, 45.8, 33.0, 72.6, 50.8), _CLS_NOTES, ["transnext_micro.in1k"]),
    _classify("tiny", dict(_IMAGENET, model="transnext_tiny", drop_path=0.25),
              _imagenet(84.0, 39.9, 49.6, 37.6, 73.8, 46.5), _CLS_NOTES, ["transnext_tiny.in1k"]),
    _classify("small", dict(_IMAGENET, model="transnext_small", drop_path=0.45),
              _imagenet(84.7, 47.1, 52.5, 39.7, 74.8, 43.9), _CLS_NOTES, ["transnext_small.in1k"]),
    _classify("base", dict(_IMAGENET, model="transnext_base", drop_path=0.6),
              _imagenet(84.8, 50.6, 53.9, 41.4, 75.1, 43.5), _CLS_NOTES, ["transnext_base.in1k"]),
    _classify("micro_aaaa", dict(_IMAGENET, model="transnext_micro_aaaa", img_size=256, drop_path=0.15),
              _imagenet(82.6), _CLS_NOTES + " Trained and evaluated at 256 px; no robustness figures are published.",
              ["transnext_micro_aaaa.in1k"]),
    _classify("small_384", dict(_FINETUNE_384, model="transnext_small", drop_path=0.7),
              _imagenet(86.0, 58.3, 56.4, 43.2, 76.8), _FT_NOTES, ["transnext_small.in1k_384"]),
    _classify("base_384", dict(_FINETUNE_384, model="transnext_base", drop_path=0.8),
              _imagenet(86.2, 61.6, 57.7, 44.7, 77.0), _FT_NOTES, ["transnext_base.in1k_384"]),
    _classify("demo", dict(
        model="transnext_micro", model_kwargs=DEMO_ARCH, dataset="demo", img_size=32, pretrain_size=64,
        drop_path=0.05, batch_size=64, total_batch_size=None, epochs=20, opt="adamw", lr=2e-3, opt_eps=1e-8,
        weight_decay=0.05, sched="cosine", warmup_epochs=2, warmup_lr=1e-5, min_lr=1e-5, clip_grad=1.0,
        aa=None, reprob=0.0, scale=(0.6, 1.0), ratio=(0.8, 1.25), hflip=0.5, color_jitter=0.0,
        interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), mixup=0.0, cutmix=0.0,
        smoothing=0.1, repeated_aug=1, crop_pct=1.0, amp="none", compile=False, num_workers=1, threads=1,
        output="runs/demo", eval_every=1, log_every=20,
    ), notes="Embedded Animal-Shape demo data set (transnext demo); not a reference recipe (nothing published)."),
    # ---- dense backbone settings
    *_BACKBONES,
    # ---- detection
    *_per_variant("mask_rcnn_1x", "detect", _MASK_RCNN_1X, [_coco(49.9, 44.6), _coco(51.1, 45.5), _coco(51.7, 45.9)],
                  "Box / mask AP as published (docs/model.md section 1); settings of the reference Mask R-CNN 1x configs."),
    _dense("dino_4scale_12e_tiny", "detect", dict(_DINO_12E, **_trunk("dino_4scale"), num_feature_levels=4, model="transnext_tiny"),
           _coco(55.1), _DINO_NOTES),
    *_per_variant("dino_5scale_12e", "detect", dict(_DINO_12E, **_trunk("dino"), num_feature_levels=5),
                  [_coco(55.7), _coco(56.6), _coco(57.1)], _DINO_NOTES),
    _dense("detect_demo", "detect", dict(
        _DEMO_COMMON, detector="mask_rcnn", dense_preset="mask_rcnn", min_size=(128,), max_size=128, fpn_channels=64,
        anchor_sizes=(16, 32, 64, 128, 256),  # the reference anchors, scaled to 128 px scenes
        representation_size=256, mask_layers=(64, 64), batch_size=4, epochs=3, lr=1e-3, backbone_lr_mult=0.3, hflip=0.5,
        output="runs/detect_demo",
        detections_per_img=50,
        detector_kwargs=dict(rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
                             rpn_post_nms_top_n_test=150, box_batch_size_per_image=128),
    ), notes=_DEMO_NOTES),
    _dense("detect_demo_dino", "detect", dict(
        # DINO shrunk for 128 px scenes with a few objects each: 64-wide transformer, 2 + 3 layers, 60 queries
        _DEMO_COMMON, detector="dino", dense_preset="dino_4scale", num_feature_levels=4, min_size=(128,), max_size=128,
        num_queries=60, dn_queries=30, detections_per_img=50, batch_size=4, epochs=6, lr=5e-4, backbone_lr_mult=0.3, hflip=0.5,
        clip_grad=0.1, output="runs/detect_demo_dino",
        detector_kwargs=dict(embed_dims=64, num_heads=4, num_points=4, ffn_dims=256, num_encoder_layers=2, num_decoder_layers=3),
    ), notes=_DEMO_NOTES),
    # ---- segmentation
    *_per_variant("upernet_160k", "segment", _UPERNET_160K, [_ade(51.1), _ade(52.2), _ade(53.0)],
                  "mIoU as published (docs/model.md section 1; the test mode is not stated there); settings of the "
                  "reference UPerNet 160k configs."),
    *_per_variant("mask2former_160k", "segment", _MASK2FORMER_160K, [_ade(53.4), _ade(54.1), _ade(54.7)], _MASK2FORMER_NOTES),
    _dense("segment_demo", "segment", dict(
        # all 11 classes (background + the 10 animals); whole scenes resized to 96-192 px, 96 px crops (largest class
        # <= 75% of a crop, as the reference crops)
        _DEMO_COMMON, dense_preset="upernet", data_format="ade20k", num_classes=11, foreground_only=False, crop_size=96,
        resize_scale=(128, 128), ratio_range=(0.75, 1.5), channels=96, aux_channels=48, batch_size=16, epochs=8, lr=2e-3,
        backbone_lr_mult=0.3,
        output="runs/segment_demo",
    ), notes=_DEMO_NOTES),
    _dense("segment_demo_mask2former", "segment", dict(
        # the segment_demo data and crops with a small Mask2Former head (64 channels, 20 queries, 2 encoder and 3
        # decoder layers, 1,024 loss points for the 24 x 24 stride-4 masks of a 96 px crop)
        _DEMO_COMMON, dense_preset="mask2former", segmenter="mask2former", num_queries=20, data_format="ade20k", num_classes=11,
        foreground_only=False, crop_size=96, resize_scale=(128, 128), ratio_range=(0.75, 1.5), batch_size=16, epochs=8, lr=1e-3,
        backbone_lr_mult=0.3, clip_grad=1.0, output="runs/segment_demo_mask2former",
        segmenter_kwargs=dict(feat_channels=64, decoder_layers=3, encoder_layers=2, loss_kwargs=dict(num_points=1024),
                              head_kwargs=dict(num_heads=4, num_points=4, encoder_ffn_dims=128, decoder_ffn_dims=256, num_groups=8)),
    ), notes=_DEMO_NOTES),
)


def _build(records: Sequence[Recipe]) -> dict[str, Recipe]:
    out: dict[str, Recipe] = {}
    for r in records:
        if r.name in out:
            raise ValueError(f"recipe {r.name!r} is registered twice")
        out[r.name] = r
    return out


RECIPES: dict[str, Recipe] = _build(_REGISTRY)


# ---------------------------------------------------------------------- resolver
def list_recipes(task: str | None = None, kind: str | None = "recipe") -> list[str]:
    """Names of the recipes of ``task`` (None: all tasks) and ``kind`` (None: both kinds), in registry order."""
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return [n for n, r in RECIPES.items() if (task is None or r.task == task) and (kind is None or r.kind == kind)]


def get_recipe(name: str, task: str | None = None, kind: str | None = None) -> Recipe:
    """The recipe ``name``; with ``task`` / ``kind`` it must be of that task / kind.

    Raises:
        ValueError: unknown name, or one of another task or kind; the message lists the recipes
            that would have been accepted.
    """
    if not isinstance(name, str):
        raise TypeError(f"recipe name must be a str, got {type(name).__name__}")
    choices = list_recipes(task, kind="recipe" if kind is None else kind)
    what = f"{task} recipes" if task else "recipes"
    recipe = RECIPES.get(name)
    if recipe is not None and (task is None or recipe.task == task) and (kind is None or recipe.kind == kind):
        return recipe
    if recipe is not None:
        why = (f" (it is a {recipe.task} recipe)" if task is not None and recipe.task != task
               else " (it names backbone settings, not a training recipe)" if recipe.kind == "backbone"
               else " (it is a full training recipe, not backbone settings)")
    else:
        close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
        why = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    for_task = f" for task {task!r}" if task else ""
    raise ValueError(f"unknown recipe {name!r}{for_task}{why}; {what}: {', '.join(choices)}")


def recipe_config(recipe: str | Recipe, variant: str | None = None) -> dict[str, Any]:
    """The config dict of ``recipe`` (a copy: options of the task's config class), for ``variant`` if given.

    ``variant`` (``"transnext_small"`` or ``"small"``) replaces the recipe's ``model``. Dense
    recipes take the trunk's stochastic-depth rate from their backbone settings when the model is
    built, so a variant those settings publish no rate for is refused unless the config sets
    ``drop_path``; a classification recipe keeps its own ``drop_path``.
    """
    r = recipe if isinstance(recipe, Recipe) else get_recipe(recipe)
    config = dict(r.config)
    if variant is not None:
        if not isinstance(variant, str) or not variant:
            raise ValueError(f"variant must be a model name such as 'transnext_tiny', got {variant!r}")
        model = variant if variant.startswith("transnext_") else f"transnext_{variant}"
        if r.backbone is not None and config.get("drop_path") is None and model not in r.backbone.drop_path_rates:
            raise ValueError(f"recipe {r.name!r}: its backbone settings publish stochastic-depth rates for "
                             f"{', '.join(r.backbone.drop_path_rates)} only, not {model}; set drop_path in the config")
        config["model"] = model
    return config


def backbone_settings() -> dict[str, BackboneSettings]:
    """Name -> settings of every backbone record (``transnext.dense.DENSE_PRESETS``)."""
    return {n: r.backbone for n, r in RECIPES.items() if r.kind == "backbone" and r.backbone is not None}


def from_scratch_drop_path_rates() -> dict[str, float]:
    """Variant -> stochastic-depth rate of the published from-scratch ImageNet runs (``DROP_PATH_RATES``)."""
    return {r.config["model"]: r.config["drop_path"] for r in RECIPES.values()
            if r.task == "classify" and r.weights and not r.config.get("pretrained")}


def recipe_for_weights(weights_name: str) -> Recipe | None:
    """The recipe that trained the published weights ``variant.tag``, or None."""
    for r in RECIPES.values():
        if weights_name in r.weights:
            return r
    return None


# ---------------------------------------------------------------------- rendering
_DATASET_LABELS = {"COCO-val2017": "COCO val2017", "ADE20K-val": "ADE20K val"}
_METRIC_LABELS = {"box_ap": "box AP", "mask_ap": "mask AP", "miou": "mIoU", "top1": "top-1", "mce": "mCE"}
_HEAD_LABELS = {"mask_rcnn": "Mask R-CNN", "retinanet": "RetinaNet", "fcos": "FCOS", "dino": "DINO",
                "upernet": "UPerNet", "mask2former": "Mask2Former"}


def published_text(recipe: str | Recipe, datasets: Sequence[str] | None = None) -> str:
    """The published figures as text: ``"COCO val2017 box AP 49.9, mask AP 44.6"`` ("" when none)."""
    r = recipe if isinstance(recipe, Recipe) else get_recipe(recipe)
    parts = []
    for dataset, figures in r.published.items():
        if datasets is not None and dataset not in datasets:
            continue
        metrics = ", ".join(f"{_METRIC_LABELS.get(m, m)} {v:.1f}" for m, v in figures.items())
        parts.append(f"{_DATASET_LABELS.get(dataset, dataset)} {metrics}")
    return "; ".join(parts)


def _g(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _lr(x: float) -> str:
    """A learning rate as the configs write it (1e-4, 6e-5; 0.05 as is)."""
    if x and abs(x) < 1e-2:
        mantissa, exponent = f"{x:e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return _g(x)


def head_label(r: Recipe) -> str:
    """The head a recipe trains (\"Mask R-CNN\", \"DINO 5-scale\", \"UPerNet\" ...), from its config."""
    c = r.config
    if r.task == "classify":
        return "classifier"
    if r.task == "detect":
        head = _HEAD_LABELS.get(c.get("detector", "mask_rcnn"), str(c.get("detector")))
        if "num_feature_levels" in c:
            head += f" {c['num_feature_levels']}-scale"
        return head
    return _HEAD_LABELS.get(c.get("segmenter", "upernet"), str(c.get("segmenter")))


def summary(recipe: str | Recipe) -> str:
    """One line of the recipe's main settings, rendered from its config and backbone settings."""
    r = recipe if isinstance(recipe, Recipe) else get_recipe(recipe)
    c = r.config
    if r.kind == "backbone":
        b = r.backbone
        assert b is not None
        rates = "/".join(_g(v) for v in b.drop_path_rates.values())
        return (f"trunk at {b.img_size} px (pretrained at {b.pretrain_size}), {b.pos_bias} position bias, "
                f"stages {', '.join(map(str, b.out_indices))}, drop path T/S/B {rates}")
    parts = [f"{c['max_steps'] // 1000}k iterations" if c.get("max_steps") else f"{c.get('epochs')} epochs"]
    opt = {"adamw": "AdamW", "sgd": "SGD"}.get(c.get("opt", ""), c.get("opt"))
    parts.append(f"{opt} lr {_lr(c.get('lr'))}" + (f", trunk lr x{_g(c['backbone_lr_mult'])}"
                                                   if c.get("backbone_lr_mult", 1.0) != 1.0 else ""))
    parts.append(f"wd {_g(c.get('weight_decay'))}")
    sched = c.get("sched")
    if sched == "step":
        ms = ", ".join(_g(m) for m in c.get("decay_milestones", ()))
        parts.append(f"x{_g(c.get('decay_rate'))} from epoch {ms}" if len(c.get("decay_milestones", ())) == 1
                     else f"x{_g(c.get('decay_rate'))} after epochs {ms}")
    elif sched == "poly":
        parts.append(f"poly (power {_g(c.get('poly_power', 1.0))})")
    elif sched:
        parts.append(str(sched))
    if c.get("warmup_steps"):
        parts.append(f"warm-up {c['warmup_steps']} iterations")
    elif c.get("warmup_epochs"):
        parts.append(f"warm-up {c['warmup_epochs']} epochs")
    else:
        parts.append("no warm-up")
    parts.append(f"grad clip {_g(c['clip_grad'])}" if c.get("clip_grad") else "no gradient clipping")
    total = c.get("total_batch_size")
    parts.append(f"total batch {total} ({c.get('batch_size')} per GPU)" if total else f"batch {c.get('batch_size')}")
    if r.task == "detect":
        sizes = list(c.get("min_size", ()))
        if len(sizes) > 1:
            step = sizes[1] - sizes[0]
            parts.append(f"shorter side {sizes[0]}-{sizes[-1]} (step {step}), longer <= {c.get('max_size')}")
        elif sizes:
            parts.append(f"{c.get('max_size')}x{sizes[0]}")
        for key, label in (("num_queries", "queries"), ("dn_queries", "denoising queries")):
            if key in c:
                parts.append(f"{c[key]} {label}")
    elif r.task == "segment":
        parts.append(f"{c.get('crop_size')}x{c.get('crop_size')} crops")
        if "num_queries" in c:
            parts.append(f"{c['num_queries']} queries")
    else:
        parts.append(f"{c.get('img_size')} px")
    if c.get("drop_path") is not None:
        parts.append(f"drop path {_g(c['drop_path'])}")
    elif r.backbone is not None:
        parts.append(f"trunk drop path T/S/B {'/'.join(_g(v) for v in r.backbone.drop_path_rates.values())}")
    return ", ".join(parts)


def _family(name: str) -> tuple[str, str]:
    for v in _VARIANTS:
        if name.endswith(f"_{v}"):
            return name[: -len(v) - 1], v
    return name, ""


def _metric_header(records: Sequence[Recipe]) -> str:
    seen: dict[str, list[str]] = {}
    for r in records:
        for dataset, figures in r.published.items():
            seen.setdefault(dataset, [])
            seen[dataset] += [m for m in figures if m not in seen[dataset]]
    return "; ".join(f"{_DATASET_LABELS.get(d, d)} {' / '.join(_METRIC_LABELS.get(m, m) for m in ms)}" for d, ms in seen.items())


def markdown_tables(tasks: Sequence[str] = ("detect", "segment")) -> str:
    """Markdown table of the training recipes of ``tasks``: one row per family (``*_tiny`` / ``_small`` /
    ``_base`` together) or recipe, with settings and published figures rendered from the registry."""
    lines = ["| recipe | task | head | settings | published (ImageNet-1K pretrained trunk) |", "|---|---|---|---|---|"]
    for task in tasks:
        families: dict[str, list[Recipe]] = {}
        for name in list_recipes(task):
            families.setdefault(_family(name)[0], []).append(RECIPES[name])
        for records in families.values():
            variants = [_family(r.name)[1] for r in records]
            if all(variants):
                names = " / ".join([f"`{records[0].name}`"] + [f"`_{v}`" for v in variants[1:]])
            else:
                names = ", ".join(f"`{r.name}`" for r in records)
            if not all(variants):  # a recipe of its own: its figures as text
                published = "; ".join(published_text(r) for r in records) or "-"
            elif any(r.published for r in records):
                figures = ", ".join(
                    f"{v[0].upper()} " + " / ".join(f"{x:.1f}" for f in r.published.values() for x in f.values())
                    for r, v in zip(records, variants))
                published = f"{_metric_header(records)}: {figures}"
            else:
                published = "-"
            lines.append(f"| {names} | {task} | {head_label(records[0])} | {summary(records[0])} | {published} |")
    return "\n".join(lines)
