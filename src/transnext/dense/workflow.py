"""Evaluate, predict and demo for the dense tasks (what ``transnext detect|segment eval|predict|demo`` run).

* :func:`evaluate_detection` / :func:`evaluate_segmentation`: a checkpoint on a data split,
  returning the metrics and writing ``eval.json`` + a Markdown table (per-class AP / IoU).
* :func:`predict_detection` / :func:`predict_segmentation`: overlay PNGs (boxes with labels and
  scores, instance masks; colour-coded label maps with a legend) and ``predictions.json``.
* :func:`detection_demo` / :func:`segmentation_demo`: the embedded demo end to end (scenes
  composed at run time, training with the ``detect_demo`` / ``segment_demo`` recipes, the best
  checkpoint scored on the held-out ``test`` split next to a trivial baseline, predictions).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "detection_baseline",
    "detection_demo",
    "evaluate_detection",
    "evaluate_segmentation",
    "predict_detection",
    "predict_segmentation",
    "segmentation_baseline",
    "segmentation_demo",
]


def _device(name: str = "auto") -> torch.device:
    from ..engine.distributed import _pick_device

    return _pick_device(name, 0)


def _write_text(path: Path, text: str) -> Path:
    from ..checkpoints import atomic_write

    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) or v == -1.0 else f"{v:.2f}"


# ---------------------------------------------------------------------- detection
def _skip_line(skipped: int | None) -> list[str]:
    if not skipped:
        return []
    return ["", f"skipped images: {skipped} (unreadable or unusable, left out of the evaluation with their ground truth; "
                "see the warnings; --strict-data makes this an error)"]


def detection_markdown(full: dict[str, Any], title: str) -> str:
    tables = {t: r for t, r in full.items() if isinstance(r, dict) and "AP" in r}  # bbox / segm (not the image counts)
    lines = [f"## {title}", "", "| metric | AP | AP50 | AP75 | APs | APm | APl |", "|---|---|---|---|---|---|---|"]
    for t, r in tables.items():
        lines.append(f"| {t} | " + " | ".join(_fmt(r[k]) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")) + " |")
    lines += ["", "| class | " + " | ".join(f"{t} AP" for t in tables) + " |", "|---|" + "---|" * len(tables)]
    first = next(iter(tables.values()))
    for name in first["per_class"]:
        lines.append(f"| {name} | " + " | ".join(_fmt(tables[t]["per_class"][name]) for t in tables) + " |")
    if "images" in full:
        lines += ["", f"{full['images']} images evaluated"]
    lines += _skip_line(full.get("skipped_images"))
    return "\n".join(lines) + "\n"


def evaluate_detection(checkpoint: str | Path, data_dir: str | Path, split: str, batch_size: int = 2, device: str = "auto",
                       amp: str | None = None, strict: bool = False, num_workers: int = 2, output: str | Path | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """COCO AP of a detection checkpoint on ``<data_dir>`` split ``split`` (layout: :mod:`transnext.dense.config`).

    An image that cannot be read is left out together with its ground truth and counted
    (``skipped_images`` in the result and ``eval.json``, a line in ``eval.md``); ``strict`` stops at it.
    """
    from torch.utils.data import DataLoader

    from ..data.coco import CocoDetection, collate_detection
    from .config import coco_split_paths
    from .modeling import dense_model_from_checkpoint
    from .tasks import evaluate_detector

    dev = _device(device)
    model, info = dense_model_from_checkpoint(checkpoint, task="detect")
    images, ann = coco_split_paths(data_dir, split)
    ds = CocoDetection(images, ann, strict=strict, train=False, with_masks=info["arch"]["detector"] == "mask_rcnn")
    trained = [c for c in (info.get("classes") or [])[1:]]
    if trained and ds.classes != trained:
        raise ValueError(f"{ann} has categories {ds.classes[:5]}... but the model was trained on {trained[:5]}...")
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_detection)
    metrics, full = evaluate_detector(model.to(dev), loader, ds, dev, amp=amp, progress=progress)
    result = {"metrics": metrics, "coco": {k: v for k, v in full.items() if k not in ("results", "gt")}, "data": ds.report,
              "skipped_images": full["skipped_images"], "checkpoint": str(checkpoint), "split": split}
    if output is not None:
        out = Path(output)
        _write_text(out / "eval.json", json.dumps(result, indent=2))
        _write_text(out / "eval.md", detection_markdown(result["coco"], f"{Path(str(data_dir)).name} / {split}"))
    result["results"] = full["results"]  # the COCO result entries (not written to eval.json)
    result["gt"] = full["gt"]  # the ground truth scored: the images predicted (an unreadable one is left out)
    return result


def _load_rgb(path: str) -> Any:
    """8-bit RGB of an image file, fully decoded; an unreadable or non-image file is a DataError naming it."""
    from ..data import DataError, load_image

    try:
        return load_image(path)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for truncated, unknown or damaged files
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def _image_batches(paths: Sequence[str], batch_size: int, skipped: list[dict[str, Any]], progress: bool,
                   desc: str) -> Any:
    """Yield lists of ``(path, image)``, at most ``batch_size`` long and of one image size each (so that
    batching changes no prediction); unreadable files are warned about by name and appended to ``skipped``."""
    import warnings

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    bar = None
    if progress and len(paths) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc=desc, unit="img", dynamic_ncols=True, leave=False)
    batch: list[tuple[str, Any]] = []
    for path in paths:
        try:
            img = _load_rgb(path)
        except ValueError as e:
            warnings.warn(f"{e}; skipped", stacklevel=3)
            skipped.append({"path": str(path), "error": str(e)})
            if bar is not None:
                bar.update(1)
            continue
        if batch and (len(batch) >= batch_size or batch[0][1].size != img.size):
            yield batch
            if bar is not None:
                bar.update(len(batch))
            batch = []
        batch.append((path, img))
    if batch:
        yield batch
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()


def _in_input_order(paths: Sequence[str], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {str(p): i for i, p in enumerate(paths)}
    return sorted(records, key=lambda r: order[r["path"]])


@torch.no_grad()
def predict_detection(checkpoint: str | Path, inputs: Sequence[str | Path], output: str | Path,
                      score_thresh: float | None = None, device: str = "auto", batch_size: int = 1,
                      progress: bool = False) -> list[dict[str, Any]]:
    """Overlays (``<output>/<name>_pred.png``) and ``<output>/predictions.json`` for images or folders.

    One record per image, ``{"path", "overlay", "detections"}``; a file that cannot be read as an
    image is warned about, skipped and recorded as ``{"path", "error"}``. ``score_thresh`` None:
    :data:`transnext.dense.config.DEFAULT_SCORE_THRESH`.
    """
    from torchvision.transforms.functional import pil_to_tensor

    from ..data import find_images
    from .config import DEFAULT_SCORE_THRESH
    from .modeling import dense_model_from_checkpoint
    from .visualize import draw_detections

    dev = _device(device)
    model, info = dense_model_from_checkpoint(checkpoint, task="detect")
    model.to(dev)
    classes = info.get("classes") or [str(i) for i in range(info["arch"]["num_classes"])]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths = find_images([str(p) for p in inputs])
    records: list[dict[str, Any]] = []
    for batch in _image_batches(paths, batch_size, records, progress, "detect"):
        dets = model([pil_to_tensor(img).float().div(255).to(dev) for _, img in batch])
        for (path, img), det in zip(batch, dets):
            keep = det["scores"] >= (DEFAULT_SCORE_THRESH if score_thresh is None else score_thresh)
            boxes, labels, scores = det["boxes"][keep].cpu(), det["labels"][keep].cpu(), det["scores"][keep].cpu()
            masks = (det["masks"][keep][:, 0] > 0.5).cpu().numpy() if "masks" in det else None
            overlay = draw_detections(img, boxes.tolist(), labels.tolist(), scores.tolist(), classes, masks)
            png = out / (Path(path).stem + "_pred.png")
            overlay.save(png)
            records.append({"path": str(path), "overlay": str(png), "detections": [
                {"label": classes[int(lab)], "score": round(float(s), 4), "box_xyxy": [round(float(v), 1) for v in b]}
                | ({"mask_area": int(masks[k].sum())} if masks is not None else {})
                for k, (b, lab, s) in enumerate(zip(boxes, labels, scores))]})
    records = _in_input_order(paths, records)
    _write_text(out / "predictions.json", json.dumps(records, indent=2))
    return records


def detection_baseline(train_set: Any, test_set: Any) -> list[dict[str, Any]]:
    """Trivial detector: for every test image, the mean training box (relative coordinates) once per
    category, scored by the category's share of the training boxes."""
    from collections import Counter

    rel, counts = [], Counter()
    for iid in train_set.ids:
        W, H = train_set.images[iid]["width"], train_set.images[iid]["height"]
        for a in train_set.annotations[iid]:
            x, y, w, h = a["bbox"]
            rel.append((x / W, y / H, w / W, h / H))
            counts[a["category_id"]] += 1
    mean = [sum(r[k] for r in rel) / max(len(rel), 1) for k in range(4)]
    total = sum(counts.values()) or 1
    out = []
    for iid in test_set.ids:
        W, H = test_set.images[iid]["width"], test_set.images[iid]["height"]
        box = [mean[0] * W, mean[1] * H, mean[2] * W, mean[3] * H]
        x, y, w, h = box
        poly = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        for cid, n in counts.items():
            out.append(dict(image_id=iid, category_id=cid, bbox=box, score=n / total, segmentation=_poly_rle(poly, H, W)))
    return out


def _poly_rle(poly: list, H: int, W: int) -> dict[str, Any]:
    from ..data.coco import require_pycocotools

    mu = require_pycocotools()
    rle = mu.merge(mu.frPyObjects(poly, H, W))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


# ---------------------------------------------------------------------- segmentation
def segmentation_markdown(res: dict[str, Any], title: str) -> str:
    lines = [f"## {title}", "", f"mIoU {_fmt(res['mIoU'])}, mAcc {_fmt(res['mAcc'])}, aAcc {_fmt(res['aAcc'])} on {res.get('n', 0)} images",
             "", "| class | IoU | Acc |", "|---|---|---|"]
    for name, r in res["per_class"].items():
        lines.append(f"| {name} | {_fmt(r['IoU'])} | {_fmt(r['Acc'])} |")
    return "\n".join(lines) + "\n"


def _seg_dataset(data_dir: str | Path, split: str, info: dict[str, Any], data_format: str | None, strict: bool,
                 resize_scale: Sequence[int] | None) -> Any:
    from ..data.segmentation import SegmentationDataset, SegmentationEvalTransform

    root = Path(data_dir)
    fmt = data_format or info["data_cfg"].get("format", "ade20k")
    scale = tuple(resize_scale) if resize_scale else tuple(info["data_cfg"].get("resize_scale") or (2048, 512))
    classes = info.get("classes")
    # the ignore index the model was trained and validated with (data_cfg of the checkpoint), as training validation reads it
    return SegmentationDataset.from_folders(root / "images" / split, root / "annotations" / split, info["arch"]["num_classes"],
                                            strict=strict, what=f"{split} split", transform=SegmentationEvalTransform(scale),
                                            reduce_zero_label=fmt == "ade20k", classes=classes,
                                            ignore_index=int(info["data_cfg"].get("ignore_index", 255)),
                                            foreground_only=bool(info["data_cfg"].get("foreground_only")))


def evaluate_segmentation(checkpoint: str | Path, data_dir: str | Path, split: str, mode: str | None = None, stride: int | None = None,
                          crop: int | None = None, scales: Sequence[float] = (1.0,), flip: bool = False, data_format: str | None = None,
                          resize_scale: Sequence[int] | None = None, device: str = "auto", amp: str | None = None, strict: bool = False,
                          num_workers: int = 2, output: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """mIoU / mAcc / aAcc / per-class IoU of a segmentation checkpoint on a split (whole, slide, multi-scale + flip)."""
    from torch.utils.data import DataLoader

    from ..data.segmentation import collate_segmentation
    from .inference import check_slide
    from .modeling import dense_model_from_checkpoint
    from .tasks import evaluate_segmenter

    dev = _device(device)
    model, info = dense_model_from_checkpoint(checkpoint, task="segment")
    dc = info["data_cfg"]
    mode = mode or dc.get("eval_mode", "whole")
    crop = crop if crop is not None else dc.get("crop_size", 512)
    stride = stride if stride is not None else dc.get("eval_stride", 341)
    if mode == "slide":
        check_slide(crop, stride)  # before reading the data
    ds = _seg_dataset(data_dir, split, info, data_format, strict, resize_scale)
    loader = DataLoader(ds, batch_size=1, num_workers=num_workers, collate_fn=collate_segmentation)
    res = evaluate_segmenter(model.to(dev), loader, ds.num_classes, dev, ds.classes, None, mode, crop, stride, tuple(scales), flip,
                             ds.ignore_index, amp, progress)
    result = {"metrics": res, "checkpoint": str(checkpoint), "split": split, "mode": mode, "scales": list(scales), "flip": flip}
    if output is not None:
        out = Path(output)
        _write_text(out / "eval.json", json.dumps(result, indent=2))
        md = segmentation_markdown(res, f"{Path(str(data_dir)).name} / {split} ({mode}"
                                        f"{', multi-scale' if len(scales) > 1 else ''}{', flip' if flip else ''})")
        _write_text(out / "eval.md", md + "".join(line + "\n" for line in _skip_line(res.get("skipped"))))
    return result


@torch.no_grad()
def predict_segmentation(checkpoint: str | Path, inputs: Sequence[str | Path], output: str | Path, mode: str | None = None,
                         scales: Sequence[float] = (1.0,), flip: bool = False, device: str = "auto", batch_size: int = 1,
                         progress: bool = False) -> list[dict[str, Any]]:
    """Colour overlays with a legend and raw label PNGs (class indices) in ``output``, plus ``predictions.json``.

    A file that cannot be read as an image is warned about, skipped and recorded as ``{"path", "error"}``.
    """
    import numpy as np
    from PIL import Image

    from ..data import find_images
    from ..data.segmentation import SegmentationEvalTransform
    from .inference import segment_image
    from .modeling import dense_model_from_checkpoint
    from .visualize import draw_segmentation

    dev = _device(device)
    model, info = dense_model_from_checkpoint(checkpoint, task="segment")
    model.to(dev)
    dc = info["data_cfg"]
    classes = info.get("classes") or [str(i) for i in range(info["arch"]["num_classes"])]
    tf = SegmentationEvalTransform(tuple(dc.get("resize_scale") or (2048, 512)))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths = find_images([str(p) for p in inputs])
    records: list[dict[str, Any]] = []
    for batch in _image_batches(paths, batch_size, records, progress, "segment"):
        w, h = batch[0][1].size  # one size per batch
        x = torch.stack([tf(img, np.zeros((h, w), dtype=np.uint8))[0] for _, img in batch])
        scores = segment_image(model, x.to(dev), out_size=(h, w), num_classes=len(classes),
                               mode=mode or dc.get("eval_mode", "whole"), crop=dc.get("crop_size", 512),
                               stride=dc.get("eval_stride", 341), scales=scales, flip=flip)
        for (path, img), label in zip(batch, scores.argmax(1).cpu().numpy().astype(np.uint8)):
            stem = Path(path).stem
            draw_segmentation(img, label, classes).save(out / f"{stem}_overlay.png")
            Image.fromarray(label).save(out / f"{stem}_label.png")
            values, counts = np.unique(label, return_counts=True)
            records.append({"path": str(path), "overlay": str(out / f"{stem}_overlay.png"),
                            "label_map": str(out / f"{stem}_label.png"),
                            "classes": {classes[int(v)]: round(float(c) / label.size, 4) for v, c in zip(values, counts)}})
    records = _in_input_order(paths, records)
    _write_text(out / "predictions.json", json.dumps(records, indent=2))
    return records


def segmentation_baseline(train_set: Any, test_set: Any) -> dict[str, Any]:
    """Trivial segmenter: the most frequent training class everywhere."""
    import numpy as np

    from .metrics import SegmentationMetric

    counts = np.zeros(train_set.num_classes, dtype=np.int64)
    for _, label_path in train_set.pairs:
        lab = train_set.load_label(label_path)
        lab = lab[lab != train_set.ignore_index]
        counts += np.bincount(lab.ravel(), minlength=train_set.num_classes)[: train_set.num_classes]
    majority = int(counts.argmax())
    metric = SegmentationMetric(test_set.num_classes, test_set.ignore_index)
    for _, label_path in test_set.pairs:
        lab = torch.from_numpy(test_set.load_label(label_path))
        metric.update(torch.full_like(lab, majority), lab)
    res = metric.compute(test_set.classes)
    res["class"] = test_set.classes[majority]
    return res


# ---------------------------------------------------------------------- demos
DEMO_BACKBONE = "demo"  # backbone_weights naming the classification demo's trained TransNeXt (demo_backbone), the demos' default


def demo_backbone_cache() -> Path:
    """Where :func:`demo_backbone` keeps its model: ``$TRANSNEXT_CACHE_DIR`` (else ``$XDG_CACHE_HOME/transnext``, else
    ``~/.cache/transnext``) ``/demo_backbone``."""
    import os

    root = os.environ.get("TRANSNEXT_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "transnext") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "transnext")
    return Path(root) / "demo_backbone"


def demo_backbone(cache_dir: str | Path | None = None, progress: bool = True, overrides: dict[str, Any] | None = None) -> Path:
    """``best.pth`` of the classification demo (``transnext demo``'s preset), the trunk the dense demos start from.

    It is trained on the silhouettes of the classification training split only (the dense demo's ``val`` and
    ``test`` scenes use other silhouettes), once per user: the result is kept under ``cache_dir`` (default
    :func:`demo_backbone_cache`), in a folder named after the preset, so a changed preset trains anew. An
    interrupted training resumes from its ``last.pth`` on the next call.
    """
    import hashlib
    import os
    import shutil

    from ..engine.config import resolve_config
    from ..engine.presets import PRESETS
    from ..engine.trainer import train

    opts = {**PRESETS["demo"], **(overrides or {})}
    key = hashlib.sha256(json.dumps(opts, sort_keys=True, default=str).encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else demo_backbone_cache()
    final = root / f"cls_demo_{key}"
    if (final / "best.pth").is_file():
        return final / "best.pth"
    work = root / f"cls_demo_{key}.partial"
    work.mkdir(parents=True, exist_ok=True)
    _say(f"      no trained demo backbone in {root} yet: training the classification demo once "
         f"({opts['epochs']} epochs on the silhouettes of its training split; later runs reuse it)")
    cfg = resolve_config("demo", None, {**(overrides or {}), "output": str(work), "progress": progress, "resume": "auto"})
    train(cfg)
    (work / "last.pth").unlink(missing_ok=True)  # the optimizer state is not needed for the trunk
    try:
        os.replace(work, final)
    except OSError:  # another process finished first
        if not (final / "best.pth").is_file():
            raise
        shutil.rmtree(work, ignore_errors=True)
    return final / "best.pth"


def _demo_common(kind: str, output: str | Path, epochs: int | None, resume: str | None, progress: bool, config: str | None,
                 extra: dict[str, Any] | None, recipe: str | None = None) -> tuple[Any, Path]:
    from ..engine.config import load_config_file
    from .config import DetectionConfig, SegmentationConfig, resolve_dense_config

    out = Path(output)
    overrides: dict[str, Any] = {"output": str(out), "progress": progress, **(extra or {})}
    if epochs is not None:
        overrides["epochs"] = epochs
    if resume:
        overrides["resume"] = resume
    cls = DetectionConfig if kind == "detect" else SegmentationConfig
    cfg = resolve_dense_config(cls, recipe or f"{kind}_demo", config, overrides)
    # the trunk starts from the classification demo's trained model unless the options name weights
    # (``backbone_weights: null`` in --config: random initialisation) or change the trunk's architecture
    from ..engine.presets import DEMO_ARCH

    named = "backbone_weights" in overrides or (config is not None and "backbone_weights" in load_config_file(config))
    demo_trunk = cfg.model == "transnext_micro" and {k: tuple(v) if isinstance(v, list) else v
                                                     for k, v in dict(cfg.model_kwargs or {}).items()} == DEMO_ARCH
    if cfg.backbone_weights == DEMO_BACKBONE or (not named and not cfg.backbone_weights and demo_trunk):
        cfg.backbone_weights = str(demo_backbone(progress=progress))
    return cfg, out


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _trunk_start(cfg: Any) -> str:
    if not cfg.backbone_weights:
        return "random initialisation"
    return f"from {cfg.backbone_weights}"


def detection_demo(output: str | Path = "runs/detect_demo", epochs: int | None = None, resume: str | None = None, progress: bool = True,
                   config: str | None = None, num_predict: int = 6, extra: dict[str, Any] | None = None,
                   model: str = "mask_rcnn") -> dict[str, Any]:
    """Train Mask R-CNN (``model="dino"``: DINO, recipe ``detect_demo_dino``) on the demo scenes, score best.pth on the
    held-out test split beside a trivial baseline."""
    from ..data.coco import CocoDetection
    from ..data.dense_demo import ensure_dense_demo, write_dense_demo
    from .config import coco_split_paths
    from .metrics import class_agnostic, coco_evaluate
    from .train import train_detector

    t0 = time.perf_counter()
    if model not in ("mask_rcnn", "dino"):
        raise ValueError(f"the detection demo trains mask_rcnn or dino, not {model!r}")
    cfg, out = _demo_common("detect", output, epochs, resume, progress, config, extra,
                            recipe="detect_demo" if model == "mask_rcnn" else f"detect_demo_{model}")
    data = ensure_dense_demo(cfg.data_dir) if cfg.data_dir else write_dense_demo(out / "demo_data")
    cfg.data_dir = str(data)
    counts = json.loads((data / "demo_manifest.json").read_text())["counts"]
    _say(f"[1/4] demo scenes in {data} ({', '.join(f'{k} {v}' for k, v in counts.items())} images, "
         f"{time.perf_counter() - t0:.0f} s)")
    _say(f"[2/4] training {cfg.detector} on a small {cfg.model}-style trunk ({_trunk_start(cfg)}; {cfg.epochs} epochs, "
         f"{cfg.max_size} px) -> {out}")
    summary = train_detector(cfg)
    t_train = time.perf_counter() - t0
    _say("[3/4] scoring best.pth on the held-out test split (not used for checkpoint selection)")
    test_split = cfg.test_split or "test"
    res = evaluate_detection(out / "best.pth", data, test_split, batch_size=4, num_workers=0, output=out / "test_eval", progress=progress)
    train_set = CocoDetection(*coco_split_paths(data, cfg.train_split), train=True)
    test_set = CocoDetection(*coco_split_paths(data, test_split))
    base_results = detection_baseline(train_set, test_set)
    base = coco_evaluate(test_set.coco_gt(), base_results)
    # localisation alone (categories merged), for the model and the baseline: what a short CPU run learns first
    agnostic = coco_evaluate(*class_agnostic(res["gt"], res["results"]), iou_types=("bbox",))["bbox"]
    agnostic_base = coco_evaluate(*class_agnostic(test_set.coco_gt(), base_results), iou_types=("bbox",))["bbox"]
    _say(f"[4/4] predicting {num_predict} held-out images")
    images, _ = coco_split_paths(data, test_split)
    picks = sorted(images.glob("*.png"))[:num_predict]
    preds = predict_detection(out / "best.pth", picks, out / "predictions", score_thresh=0.15)  # a short run scores low
    total = time.perf_counter() - t0
    m = res["metrics"]
    result = {
        "test_bbox_AP": m["bbox_AP"], "test_bbox_AP50": m["bbox_AP50"], "test_segm_AP": m.get("segm_AP"),
        "test_segm_AP50": m.get("segm_AP50"), "test_images": m["n"], "baseline_bbox_AP": base["bbox"]["AP"],
        "baseline_bbox_AP50": base["bbox"]["AP50"], "baseline_segm_AP": base["segm"]["AP"],
        "class_agnostic_bbox_AP": agnostic["AP"], "class_agnostic_bbox_AP50": agnostic["AP50"],
        "baseline_class_agnostic_bbox_AP": agnostic_base["AP"], "baseline_class_agnostic_bbox_AP50": agnostic_base["AP50"],
        "best_val": summary["best_metrics"], "train_time_s": t_train, "total_time_s": total, "epochs": cfg.epochs,
        "backbone_weights": cfg.backbone_weights, "checkpoint": str(out / "best.pth"), "predictions": str(out / "predictions"),
    }
    _write_text(out / "demo_summary.json", json.dumps(result, indent=2, default=str))
    print(detection_markdown(res["coco"], "held-out test split"), end="")
    mask = f", mask AP {m['segm_AP']:.2f}" if "segm_AP" in m else ""
    print(f"\nheld-out test: box AP {m['bbox_AP']:.2f} (AP50 {m['bbox_AP50']:.2f}){mask} "
          f"on {m['n']} images; trivial baseline box AP {base['bbox']['AP']:.2f} (AP50 {base['bbox']['AP50']:.2f}); "
          f"training {t_train / 60:.1f} min, total {total / 60:.1f} min")
    print(f"class-agnostic (localisation only): box AP {agnostic['AP']:.2f} (AP50 {agnostic['AP50']:.2f}); "
          f"baseline {agnostic_base['AP']:.2f} (AP50 {agnostic_base['AP50']:.2f})")
    print(f"outputs: {out}/best.pth, last.pth, metrics.jsonl, curves.png, test_eval/, predictions/ ({len(preds)} overlays), "
          "demo_summary.json")
    return result


def segmentation_demo(output: str | Path = "runs/segment_demo", epochs: int | None = None, resume: str | None = None, progress: bool = True,
                      config: str | None = None, num_predict: int = 6, extra: dict[str, Any] | None = None,
                      model: str = "upernet") -> dict[str, Any]:
    """Train UPerNet (``model="mask2former"``: Mask2Former, recipe ``segment_demo_mask2former``) on the demo scenes, score
    best.pth on the held-out test split beside the majority-class baseline."""
    from ..data.dense_demo import ensure_dense_demo, write_dense_demo
    from .metrics import foreground_iou
    from .tasks import segmentation_dataset
    from .train import train_segmenter

    t0 = time.perf_counter()
    if model not in ("upernet", "mask2former"):
        raise ValueError(f"the segmentation demo trains upernet or mask2former, not {model!r}")
    cfg, out = _demo_common("segment", output, epochs, resume, progress, config, extra,
                            recipe="segment_demo" if model == "upernet" else f"segment_demo_{model}")
    data = ensure_dense_demo(cfg.data_dir) if cfg.data_dir else write_dense_demo(out / "demo_data")
    cfg.data_dir = str(data)
    counts = json.loads((data / "demo_manifest.json").read_text())["counts"]
    _say(f"[1/4] demo scenes in {data} ({', '.join(f'{k} {v}' for k, v in counts.items())} images, "
         f"{time.perf_counter() - t0:.0f} s)")
    head = "Mask2Former" if cfg.segmenter == "mask2former" else "UPerNet"
    _say(f"[2/4] training {head} on a small {cfg.model}-style trunk ({_trunk_start(cfg)}; {cfg.epochs} epochs, "
         f"{cfg.crop_size} px crops) -> {out}")
    summary = train_segmenter(cfg)
    t_train = time.perf_counter() - t0
    _say("[3/4] scoring best.pth on the held-out test split (not used for checkpoint selection)")
    test_split = cfg.test_split or "test"
    res = evaluate_segmentation(out / "best.pth", data, test_split, num_workers=0, output=out / "test_eval", progress=progress)
    m = res["metrics"]
    fg_iou = foreground_iou(m["confusion"])  # class 0 is the background: "any animal" against it
    base = segmentation_baseline(segmentation_dataset(cfg, cfg.train_split, train=False),
                                 segmentation_dataset(cfg, test_split, train=False))
    _say(f"[4/4] predicting {num_predict} held-out images")
    picks = sorted((Path(data) / "images" / test_split).glob("*.png"))[:num_predict]
    preds = predict_segmentation(out / "best.pth", picks, out / "predictions")
    total = time.perf_counter() - t0
    result = {
        "test_mIoU": m["mIoU"], "test_mAcc": m["mAcc"], "test_aAcc": m["aAcc"], "test_images": m["n"],
        "baseline_mIoU": base["mIoU"], "baseline_mAcc": base["mAcc"], "baseline_aAcc": base["aAcc"], "baseline_class": base["class"],
        "test_foreground_IoU": fg_iou, "baseline_foreground_IoU": 0.0,
        "best_val": summary["best_metrics"], "train_time_s": t_train, "total_time_s": total, "epochs": cfg.epochs,
        "backbone_weights": cfg.backbone_weights, "checkpoint": str(out / "best.pth"), "predictions": str(out / "predictions"),
    }
    _write_text(out / "demo_summary.json", json.dumps(result, indent=2, default=str))
    print(segmentation_markdown(m, "held-out test split"), end="")
    print(f"\nheld-out test: mIoU {m['mIoU']:.2f}, mAcc {m['mAcc']:.2f}, aAcc {m['aAcc']:.2f} on {m['n']} images; "
          f"trivial baseline ('{base['class']}' everywhere) mIoU {base['mIoU']:.2f}, aAcc {base['aAcc']:.2f}; "
          f"training {t_train / 60:.1f} min, total {total / 60:.1f} min")
    print(f"foreground (any animal vs background) IoU {fg_iou:.2f}; baseline 0.00")
    print(f"outputs: {out}/best.pth, last.pth, metrics.jsonl, curves.png, test_eval/, predictions/ ({len(preds)} overlays), "
          "demo_summary.json")
    return result
