"""Detection and segmentation as tasks of the shared training loop (:mod:`transnext.engine.task`).

The loop (checkpoints, exact resume, DDP, AMP, schedules, logging, curves) is the one
classification uses; these classes only say how to build the data and the model, what the loss
of a batch is, and how to evaluate:

* :class:`DetectionTask`: COCO-format data (or the demo scenes) -> a torchvision detector on
  TransNeXt + FPN; the loss is the sum of the detector's loss dict (its parts are logged);
  evaluation is pycocotools' bbox (and segm) AP; ``best.pth`` follows box AP.
* :class:`SegmentationTask`: ADE20K-format data (or the demo scenes) -> UPerNet; cross-entropy
  with the auxiliary head at weight 0.4; evaluation is mIoU / mAcc / aAcc with the configured
  inference mode; ``best.pth`` follows mIoU.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..engine.task import StepOutput, Task, TaskData

if TYPE_CHECKING:
    from ..engine.distributed import DistInfo
    from ..engine.trainer import TrainRun
    from .config import DetectionConfig, SegmentationConfig

__all__ = ["DetectionTask", "SegmentationTask", "dense_param_groups", "evaluate_detector", "evaluate_segmenter", "reference_param_groups"]


def reference_param_groups(model: torch.nn.Module, weight_decay: float, keys: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """The reference dense configs' rule: no weight decay on parameters whose name contains one of ``keys``."""
    from .config import REFERENCE_NO_DECAY_KEYS

    keys = keys or REFERENCE_NO_DECAY_KEYS
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in keys) else decay).append(p)
    return [dict(params=no_decay, weight_decay=0.0), dict(params=decay, weight_decay=weight_decay)]


def _trunk(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """``(prefix, TransNeXt)`` of a dense model's trunk."""
    from ..models.transnext import TransNeXt

    for name, m in model.named_modules():
        if isinstance(m, TransNeXt):
            return (name + "." if name else ""), m
    return None


def dense_param_groups(model: torch.nn.Module, cfg: Any) -> list[dict[str, Any]]:
    """Optimizer groups: the weight-decay rule (reference keys, or no decay on 1-D parameters), times the
    learning-rate scales of the trunk: ``backbone_lr_mult`` and, with ``layer_decay``, ``layer_decay**(L - layer)``
    per layer of the trunk's ``group_matcher`` (stem first; the heads keep scale 1)."""
    from .config import REFERENCE_NO_DECAY_KEYS

    found = _trunk(model)
    layer_of: dict[str, int] = {}
    num_layers = 0
    if found is not None and cfg.layer_decay is not None:
        from timm.models import group_parameters

        prefix, trunk = found
        groups = group_parameters(trunk, trunk.group_matcher(coarse=False))
        ids = sorted(groups)
        for rank, gid in enumerate(ids):  # dense, 0-based layer numbers
            for n in groups[gid]:
                layer_of[prefix + n] = rank
        num_layers = len(ids)
    prefix = found[0] if found is not None else None
    keys = REFERENCE_NO_DECAY_KEYS if cfg.reference_no_decay else ()
    nd_keys = set(found[1].no_weight_decay_keywords()) if found is not None else set()
    # a head's own no-decay names (Mask2Former's query and level embeddings, as the reference's embed_mult)
    head_nd = set(model.no_weight_decay_keywords()) if hasattr(model, "no_weight_decay_keywords") else set()
    buckets: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.reference_no_decay:
            wd = 0.0 if any(k in name for k in (*keys, *head_nd)) else cfg.weight_decay
        else:
            wd = 0.0 if (p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in (*nd_keys, *head_nd))) else cfg.weight_decay
        scale = 1.0
        if prefix is not None and name.startswith(prefix):
            scale = cfg.backbone_lr_mult
            if name in layer_of:
                scale *= cfg.layer_decay ** (num_layers - layer_of[name])
        buckets.setdefault((wd, scale), []).append(p)
    return [dict(params=ps, weight_decay=wd, lr_scale=scale) for (wd, scale), ps in sorted(buckets.items(), key=lambda kv: kv[0])]


def _demo_root(cfg: Any) -> Path:
    from ..data.dense_demo import ensure_dense_demo, write_dense_demo

    # a given folder of demo scenes is used as it is; the default one is (re)written when stale
    return ensure_dense_demo(cfg.data_dir) if cfg.data_dir else write_dense_demo(Path(cfg.output) / "demo_data")


def _announce(msg: str, info: Any) -> None:
    if info is None or info.is_main:
        print(msg, file=sys.stderr, flush=True)


def _nothing_evaluated(skipped: int) -> str:
    if skipped:
        return (f"no image could be evaluated: all {skipped} image(s) were skipped as unreadable or unusable "
                "(see the warnings above); fix or remove them (--strict-data stops at the first one and names it)")
    return "no image to evaluate: the evaluation data is empty"


# ---------------------------------------------------------------------- detection
def coco_dataset(cfg: Any, split: str, train: bool) -> Any:
    from ..data.coco import CocoDetection, DetectionTransform
    from .config import coco_split_paths

    root = _demo_root(cfg) if cfg.dataset == "demo" else Path(cfg.data_dir)
    images, ann = coco_split_paths(root, split)
    with_masks = getattr(cfg, "detector", "mask_rcnn") == "mask_rcnn"
    return CocoDetection(images, ann, DetectionTransform(cfg.hflip) if train else None, strict=cfg.strict_data, train=train,
                         with_masks=with_masks)


@torch.no_grad()
def evaluate_detector(model: torch.nn.Module, loader: Any, dataset: Any, device: torch.device, info: Any = None,
                      amp: str | None = None, progress: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(scalar metrics, full COCO figures incl. per-class AP and the raw ``results`` entries)``.

    Only the images actually predicted are scored: one that could not be read is left out together
    with its ground truth (``full["gt"]`` is the ground truth used), and counted in ``metrics["skipped"]``
    and ``full["skipped_images"]``. No image predicted at all is an error.
    """
    from ..data import DataError
    from ..data.datasets import iter_batches
    from ..engine.distributed import all_gather_object
    from .metrics import coco_evaluate, detections_to_coco

    model.eval()
    results: list[dict[str, Any]] = []
    seen: list[int] = []
    n = skipped = 0
    autocast = _autocast(device, amp)
    for images, targets, n_skipped in iter_batches(_bar(loader, progress, "evaluating")):
        skipped += n_skipped
        if not images:
            continue
        with autocast:
            outputs = model([im.to(device) for im in images])
        outputs = [{k: v.float() if v.is_floating_point() else v for k, v in o.items()} for o in outputs]
        ids = [int(t["image_id"]) for t in targets]
        results.extend(detections_to_coco(outputs, ids, dataset.label_to_cat_id))
        seen.extend(ids)
        n += len(images)
    if info is not None and info.distributed:
        gathered = all_gather_object((results, n, skipped, seen), info)
        results = [r for g in gathered for r in g[0]]
        n, skipped = sum(g[1] for g in gathered), sum(g[2] for g in gathered)
        seen = [i for g in gathered for i in g[3]]
    if n == 0:
        raise DataError(_nothing_evaluated(skipped))
    iou_types = ("bbox", "segm") if getattr(dataset, "with_masks", False) else ("bbox",)
    gt = dataset.coco_gt(seen)
    full = coco_evaluate(gt, results, iou_types=iou_types)
    full["images"], full["skipped_images"] = n, skipped
    full["results"], full["gt"] = results, gt
    metrics: dict[str, Any] = {}
    for t in iou_types:
        for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            metrics[f"{t}_{k}"] = full[t][k]
    metrics["n"] = n
    if skipped:
        metrics["skipped"] = skipped
    return metrics, full


class DetectionTask(Task):
    """COCO-format detection / instance segmentation with a torchvision detector on TransNeXt."""

    name = "detection"
    best_metric = "bbox_AP"
    higher_is_better = True
    curve_metrics = ("bbox_AP", "segm_AP")

    def __init__(self) -> None:
        self.cfg: DetectionConfig | None = None
        self.train_set: Any = None
        self.val_set: Any = None
        self.last_full: dict[str, Any] = {}

    def build_data(self, cfg: Any, info: DistInfo) -> TaskData:
        self.cfg = cfg
        if cfg.dataset == "folder" and not cfg.data_dir:
            raise ValueError("no training data: pass --data-dir DIR (COCO layout) or --dataset demo")
        self.train_set = coco_dataset(cfg, cfg.train_split, train=True)
        _announce(f"training data: {self.train_set.describe()}", info)
        val = None
        try:
            val = coco_dataset(cfg, cfg.val_split, train=False)
            _announce(f"validation data: {val.describe()}", info)
        except Exception as e:  # a missing validation split is allowed; a broken one is not
            from ..data import DataError

            if not (isinstance(e, DataError) and "not found" in str(e)):
                raise
            _announce(f"no validation split ({e}); best.pth follows the last epoch", info)
        if val is not None and val.classes != self.train_set.classes:
            raise ValueError(f"validation categories {val.classes} differ from the training categories {self.train_set.classes}")
        self.val_set = val
        return TaskData(self.train_set, val, list(self.train_set.classes), val_batch_size=max(1, cfg.batch_size))

    def num_classes(self) -> int:
        assert self.train_set is not None
        return len(self.train_set.classes) + 1  # + background (label 0)

    def build_model(self, cfg: Any, data: TaskData, init_weights: bool) -> torch.nn.Module:
        from .modeling import build_dense_model, dense_arch

        if cfg.num_classes is not None and cfg.num_classes != self.num_classes():
            raise ValueError(f"--num-classes {cfg.num_classes} does not match the data: {self.num_classes() - 1} categories "
                             f"+ background = {self.num_classes()}")
        self.arch = dense_arch(cfg, self.num_classes(), "detect")
        weights = None
        if init_weights:
            weights = cfg.backbone_weights or (True if cfg.pretrained else None)
        model = build_dense_model(self.arch, backbone_weights=weights, grad_checkpointing=cfg.grad_checkpointing)
        if init_weights and cfg.initial_checkpoint:
            _load_initial(model, cfg.initial_checkpoint)
        return model.train()

    def collate(self, items: list) -> Any:
        from ..data.coco import collate_detection

        return collate_detection(items)

    def train_step(self, model: torch.nn.Module, batch: Any, run: TrainRun) -> StepOutput:
        images, targets, skipped = batch
        if not images:
            return StepOutput(None, 0, skipped)
        dev = run.device
        images = [im.to(dev, non_blocking=True) for im in images]
        targets = [{k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        loss = sum(losses.values())
        return StepOutput(loss, len(images), skipped, {k: float(v.detach()) for k, v in losses.items()})

    def evaluate(self, model: torch.nn.Module, loader: Any, run: TrainRun) -> dict[str, float]:
        metrics, full = evaluate_detector(model, loader, self.val_set, run.device, run.info, run.amp)
        self.last_full = {k: v for k, v in full.items() if k not in ("results", "gt")}
        return metrics

    def param_groups(self, model: torch.nn.Module, cfg: Any) -> list[dict[str, Any]]:
        return dense_param_groups(model, cfg)

    def checkpoint_extras(self, model: torch.nn.Module) -> dict[str, Any]:
        assert self.train_set is not None
        return {"arch": self.arch, "classes": ["__background__", *self.train_set.classes],
                "label_to_cat_id": dict(self.train_set.label_to_cat_id), "categories": list(self.train_set.categories),
                "data_cfg": {"format": "coco"}}

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        parts = [f"box AP {metrics['bbox_AP']:.2f}"]
        if "segm_AP" in metrics:
            parts.append(f"mask AP {metrics['segm_AP']:.2f}")
        return ", ".join(parts) + f" ({metrics.get('n', 0)} images)"

    def title(self, model: torch.nn.Module, cfg: Any) -> str:
        return f"{cfg.detector} {cfg.model}" + (f" ({cfg.preset})" if cfg.preset else "")


# ---------------------------------------------------------------------- segmentation
def segmentation_dataset(cfg: Any, split: str, train: bool) -> Any:
    from ..data.segmentation import SegmentationDataset, SegmentationEvalTransform, SegmentationTrainTransform

    root = _demo_root(cfg) if cfg.dataset == "demo" else Path(cfg.data_dir)
    classes = _class_names(cfg)
    if train:
        tf: Any = SegmentationTrainTransform(
            crop_size=cfg.crop_size, scale=tuple(int(s) for s in cfg.resize_scale), ratio_range=tuple(cfg.ratio_range),
            cat_max_ratio=cfg.cat_max_ratio, flip=cfg.hflip, photometric=cfg.photometric, ignore_index=cfg.ignore_index)
    else:
        tf = SegmentationEvalTransform(tuple(int(s) for s in cfg.resize_scale))
    num_classes = cfg.num_classes or (len(classes) if classes else None)
    if num_classes is None:
        raise ValueError("how many classes? pass --num-classes N (ADE20K: 150) or --class-names FILE")
    return SegmentationDataset.from_folders(
        root / "images" / split, root / "annotations" / split, num_classes, strict=cfg.strict_data, what=f"{split} split",
        transform=tf, reduce_zero_label=cfg.data_format == "ade20k", ignore_index=cfg.ignore_index, classes=classes,
        foreground_only=cfg.foreground_only)


def _class_names(cfg: Any) -> list[str] | None:
    if cfg.foreground_only:
        return ["background", "foreground"]
    if cfg.dataset == "demo":
        from ..data.dense_demo import SEGMENT_DEMO_CLASSES

        return list(SEGMENT_DEMO_CLASSES)
    path = Path(cfg.class_names) if cfg.class_names else (Path(cfg.data_dir) / "classes.txt" if cfg.data_dir else None)
    if cfg.class_names and not path.is_file():
        raise FileNotFoundError(f"class names file not found: {path}")
    if path is not None and path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if cfg.num_classes is not None and len(names) != cfg.num_classes:
            raise ValueError(f"{cfg.class_names} names {len(names)} classes but --num-classes is {cfg.num_classes}")
        return names
    return None


@torch.no_grad()
def evaluate_segmenter(model: torch.nn.Module, loader: Any, num_classes: int, device: torch.device, classes: list[str] | None = None,
                       info: Any = None, mode: str = "whole", crop: int = 512, stride: int = 341, scales: tuple = (1.0,),
                       flip: bool = False, ignore_index: int = 255, amp: str | None = None, progress: bool = False) -> dict[str, Any]:
    """mIoU / mAcc / aAcc (+ ``per_class``) of ``model`` over ``loader`` (one image per item; labels at full size).

    Skipped items are counted in ``skipped``; no image evaluated at all is an error (not NaN metrics).
    """
    from ..data import DataError
    from ..data.datasets import iter_batches
    from ..engine.distributed import reduce_sum
    from .inference import check_slide, segment_image
    from .metrics import SegmentationMetric

    if mode == "slide":
        check_slide(crop, stride)  # before any image: a bad setting fails at once, not after a pass over the data
    model.eval()
    metric = SegmentationMetric(num_classes, ignore_index)
    n = skipped = 0
    autocast = _autocast(device, amp)
    for images, labels, n_skipped in iter_batches(_bar(loader, progress, "evaluating")):
        skipped += n_skipped
        if images is None:
            continue
        for x, y in zip(images, labels):
            with autocast:
                scores = segment_image(model, x.unsqueeze(0).to(device), out_size=y.shape[-2:], num_classes=num_classes,
                                       mode=mode, crop=crop, stride=stride, scales=scales, flip=flip)
            metric.update(scores.argmax(1)[0].cpu(), y)
            n += 1
    if info is not None and info.distributed:
        flat = reduce_sum(metric.confusion.flatten().tolist() + [float(n), float(skipped)], info)
        metric.confusion = torch.tensor(flat[:-2], dtype=torch.float64).reshape(num_classes, num_classes)
        n, skipped = int(flat[-2]), int(flat[-1])
    if n == 0:
        raise DataError(_nothing_evaluated(skipped))
    out = metric.compute(classes)
    out["confusion"] = metric.confusion.tolist()  # [label, prediction] pixel counts
    out["n"] = n
    if skipped:
        out["skipped"] = skipped
    return out


class SegmentationTask(Task):
    """Semantic segmentation with UPerNet on TransNeXt; ``best.pth`` follows validation mIoU."""

    name = "segmentation"
    best_metric = "mIoU"
    higher_is_better = True
    curve_metrics = ("mIoU", "mAcc", "aAcc")

    def __init__(self) -> None:
        self.cfg: SegmentationConfig | None = None
        self.classes: list[str] = []
        self.last_full: dict[str, Any] = {}

    def build_data(self, cfg: Any, info: DistInfo) -> TaskData:
        self.cfg = cfg
        if cfg.dataset == "folder" and not cfg.data_dir:
            raise ValueError("no training data: pass --data-dir DIR (images/<split> + annotations/<split>) or --dataset demo")
        train = segmentation_dataset(cfg, cfg.train_split, train=True)
        self.num_classes = train.num_classes
        self.classes = list(train.classes)
        _announce(f"training data: {len(train)} images, {train.num_classes} classes", info)
        val = None
        root = Path(cfg.data_dir) if cfg.dataset != "demo" else None
        if root is None or (root / "images" / cfg.val_split).is_dir():
            val = segmentation_dataset(cfg, cfg.val_split, train=False)
            _announce(f"validation data: {len(val)} images", info)
        else:
            _announce(f"no validation split {root}/images/{cfg.val_split}; best.pth follows the last epoch", info)
        return TaskData(train, val, self.classes, val_batch_size=1)

    def build_model(self, cfg: Any, data: TaskData, init_weights: bool) -> torch.nn.Module:
        from .modeling import build_dense_model, dense_arch

        self.arch = dense_arch(cfg, self.num_classes, "segment")
        weights = None
        if init_weights:
            weights = cfg.backbone_weights or (True if cfg.pretrained else None)
        model = build_dense_model(self.arch, backbone_weights=weights, grad_checkpointing=cfg.grad_checkpointing)
        if init_weights and cfg.initial_checkpoint:
            _load_initial(model, cfg.initial_checkpoint)
        return model.train()

    def collate(self, items: list) -> Any:
        from ..data.segmentation import collate_segmentation

        return collate_segmentation(items)

    def train_step(self, model: torch.nn.Module, batch: Any, run: TrainRun) -> StepOutput:
        from .upernet import segmentation_loss

        images, labels, skipped = batch
        if images is None:
            return StepOutput(None, 0, skipped)
        if isinstance(images, list):  # training crops are padded to one size; anything else is a bug upstream
            raise ValueError("training crops of different sizes in one batch; check --crop-size")
        cfg = self.cfg
        images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
        if getattr(cfg, "segmenter", "upernet") == "mask2former":  # the model computes its own matching losses
            losses = model(images, labels)
        else:
            losses = segmentation_loss(model(images), labels, ignore_index=cfg.ignore_index, aux_weight=cfg.aux_weight)
        return StepOutput(losses["loss"], images.shape[0], skipped, {k: float(v.detach()) for k, v in losses.items() if k != "loss"})

    def evaluate(self, model: torch.nn.Module, loader: Any, run: TrainRun) -> dict[str, float]:
        cfg = self.cfg
        full = evaluate_segmenter(model, loader, self.num_classes, run.device, self.classes, run.info, cfg.eval_mode, cfg.crop_size,
                                  cfg.eval_stride, tuple(cfg.eval_scales), cfg.eval_flip, cfg.ignore_index, run.amp)
        self.last_full = full
        return {k: v for k, v in full.items() if k not in ("per_class", "confusion")}

    def param_groups(self, model: torch.nn.Module, cfg: Any) -> list[dict[str, Any]]:
        return dense_param_groups(model, cfg)

    def checkpoint_extras(self, model: torch.nn.Module) -> dict[str, Any]:
        cfg = self.cfg
        return {"arch": self.arch, "classes": self.classes,
                "data_cfg": {"format": cfg.data_format, "foreground_only": bool(cfg.foreground_only),
                             "resize_scale": [int(s) for s in cfg.resize_scale], "crop_size": cfg.crop_size,
                             "ignore_index": cfg.ignore_index, "eval_mode": cfg.eval_mode, "eval_stride": cfg.eval_stride}}

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        return f"mIoU {metrics['mIoU']:.2f}, mAcc {metrics['mAcc']:.2f}, aAcc {metrics['aAcc']:.2f} ({metrics.get('n', 0)} images)"

    def title(self, model: torch.nn.Module, cfg: Any) -> str:
        name = "Mask2Former" if getattr(cfg, "segmenter", "upernet") == "mask2former" else "UPerNet"
        return f"{name} {cfg.model}" + (f" ({cfg.preset})" if cfg.preset else "")


# ---------------------------------------------------------------------- helpers
def _load_initial(model: torch.nn.Module, path: str) -> None:
    """Weights of an earlier dense run (same architecture); heads of another class count are kept fresh.

    Read by the project's one safe loader (:func:`transnext.checkpoints.load_checkpoint`: weights only, no
    pickled code, NaN/Inf refused), without the classification key filter and loading whatever fits.
    """
    from ..checkpoints import load_checkpoint

    report = load_checkpoint(model, path, strict=False, filter_fn=None)
    own = len(model.state_dict())
    left = len(report["missing_keys"]) + len(report["mismatched_keys"])
    if left >= own:
        raise ValueError(f"--initial-checkpoint {path}: no tensor matches this model "
                         "(use --backbone-weights for a classification checkpoint)")
    if left:
        _announce(f"--initial-checkpoint: {own - left} tensors loaded, {left} kept at their initial values", None)


def _autocast(device: torch.device, amp: str | None) -> Any:
    """The shared AMP rule (:func:`transnext.engine.amp.autocast`); unset (``None``) keeps the dense
    evaluations in full precision on every device, as they always ran."""
    from ..engine.amp import autocast

    return autocast(device, "none" if amp is None else amp)


def _bar(loader: Any, progress: bool, desc: str) -> Any:
    if not progress:
        return loader
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return loader
    return tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True, file=sys.stderr)
