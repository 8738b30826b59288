"""COCO-format detection / instance segmentation data: an image folder + an ``instances`` JSON.

:class:`CocoDetection` checks the annotation file when it is opened and says what is wrong:
missing keys, duplicate ids, an empty file or image list are errors; annotations that cannot be
used (zero-area or degenerate boxes, boxes entirely outside their image, unknown image or
category ids, malformed segmentations) and images missing on disk are skipped, counted and
reported in :attr:`CocoDetection.report` (``strict=True``, the ``--strict-data`` flag, makes each
of them an error). Boxes that stick out of their image are clipped to it (counted as well).

Category ids need not be contiguous (COCO's run 1-90 with gaps): they are mapped in id order to
labels ``1..K`` (0 is torchvision's background), and :attr:`CocoDetection.label_to_cat_id` maps
predictions back for the COCO evaluation.

Items are ``(image, target)``: a float tensor ``3xHxW`` in [0, 1] at the original size (torchvision
detectors resize and normalise themselves) and ``{"boxes" (N, 4) xyxy, "labels" (N,), "masks"
(N, H, W) uint8, "image_id", "iscrowd" (N,), "area" (N,)}``; ``None`` for an unreadable image.
Crowd regions are left out of training targets (like mmdet's ignored boxes) and kept for the
evaluation.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .datasets import DataError, load_image

__all__ = ["CocoDetection", "DetectionTransform", "collate_detection", "require_pycocotools"]


def require_pycocotools() -> Any:
    try:
        from pycocotools import mask as mask_utils
    except ImportError as e:
        raise ImportError("COCO masks and evaluation need pycocotools: pip install 'transnext-pytorch[dense]'") from e
    return mask_utils


def _fmt_counts(counts: Counter) -> str:
    return ", ".join(f"{n} {what}" for what, n in counts.most_common())


class CocoDetection:
    """COCO instances data set with validation (see the module docstring).

    Args:
        image_dir: folder the ``file_name`` entries are relative to.
        ann_file: the instances JSON.
        transform: ``(image, target) -> (image, target)`` (e.g. :class:`DetectionTransform`).
        strict: every skip becomes a :class:`DataError`.
        train: leave out images without usable (non-crowd) annotations, as the reference does
            for training (``filter_empty_gt``); evaluation keeps every image.
        with_masks: decode instance masks (Mask R-CNN); box-only detectors can skip them.
    """

    def __init__(self, image_dir: str | os.PathLike, ann_file: str | os.PathLike, transform: Callable | None = None,
                 strict: bool = False, train: bool = False, with_masks: bool = True) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transform = transform
        self.strict = strict
        self.with_masks = with_masks
        self.skipped: Counter = Counter()
        self.notes: list[str] = []
        data = self._read_json()
        self._parse(data, train)

    # ------------------------------------------------------------------ loading and checks
    def _read_json(self) -> dict[str, Any]:
        if not self.ann_file.is_file():
            raise DataError(f"annotation file not found: {self.ann_file} (a COCO instances JSON)")
        if not self.image_dir.is_dir():
            raise DataError(f"image folder not found: {self.image_dir} (the folder the 'file_name' entries of {self.ann_file.name} are in)")
        text = self.ann_file.read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"annotation file {self.ann_file} is empty (expected a COCO JSON object with images, annotations, categories)")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"annotation file {self.ann_file} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise DataError(f"annotation file {self.ann_file}: expected a JSON object, got a {type(data).__name__}")
        missing = [k for k in ("images", "annotations", "categories") if k not in data]
        if missing:
            raise DataError(f"annotation file {self.ann_file} lacks the key(s) {', '.join(missing)} "
                            "(a COCO instances file has 'images', 'annotations' and 'categories')")
        for k in ("images", "annotations", "categories"):
            if not isinstance(data[k], list):
                raise DataError(f"annotation file {self.ann_file}: '{k}' must be a list, got {type(data[k]).__name__}")
        return data

    def _skip(self, what: str, detail: str) -> None:
        if self.strict:
            raise DataError(f"{self.ann_file.name}: {detail} (--strict-data; without it this is skipped and counted)")
        self.skipped[what] += 1

    @staticmethod
    def _need(entry: Any, keys: Sequence[str], what: str, index: int, file: Path) -> None:
        if not isinstance(entry, dict):
            raise DataError(f"{file.name}: {what} #{index} is not an object")
        missing = [k for k in keys if k not in entry]
        if missing:
            raise DataError(f"{file.name}: {what} #{index} (id {entry.get('id', '?')}) lacks {', '.join(missing)}")

    def _parse(self, data: dict[str, Any], train: bool) -> None:
        f = self.ann_file
        if not data["categories"]:
            raise DataError(f"{f}: the 'categories' list is empty")
        if not data["images"]:
            raise DataError(f"{f}: the 'images' list is empty")
        for i, c in enumerate(data["categories"]):
            self._need(c, ("id", "name"), "category", i, f)
        cat_ids = [int(c["id"]) for c in data["categories"]]
        dup = [k for k, n in Counter(cat_ids).items() if n > 1]
        if dup:
            raise DataError(f"{f}: duplicate category ids {sorted(dup)[:10]}")
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        self.categories = [dict(id=int(c["id"]), name=str(c["name"])) for c in cats]
        self.classes = [c["name"] for c in self.categories]
        self.cat_id_to_label = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.label_to_cat_id = {v: k for k, v in self.cat_id_to_label.items()}
        if [c["id"] for c in self.categories] != list(range(1, len(cats) + 1)):
            self.notes.append(f"category ids {self.categories[0]['id']}..{self.categories[-1]['id']} are not 1..{len(cats)}: "
                              f"mapped in id order to labels 1..{len(cats)}")

        images: dict[int, dict[str, Any]] = {}
        for i, im in enumerate(data["images"]):
            self._need(im, ("id", "file_name", "width", "height"), "image", i, f)
            iid = int(im["id"])
            if iid in images:
                raise DataError(f"{f}: duplicate image id {iid}")
            if int(im["width"]) < 1 or int(im["height"]) < 1:
                raise DataError(f"{f}: image id {iid} has size {im['width']}x{im['height']}")
            if not (self.image_dir / im["file_name"]).is_file():
                self._skip("images missing on disk", f"image {im['file_name']} (id {iid}) is listed but not found in {self.image_dir}")
                continue
            images[iid] = dict(id=iid, file_name=str(im["file_name"]), width=int(im["width"]), height=int(im["height"]))

        per_image: dict[int, list[dict[str, Any]]] = {i: [] for i in images}
        seen_ids: set[int] = set()
        listed = {int(im["id"]) for im in data["images"]}
        for i, a in enumerate(data["annotations"]):
            self._need(a, ("image_id", "category_id", "bbox"), "annotation", i, f)
            aid = int(a.get("id", -(i + 1)))
            if aid in seen_ids:
                raise DataError(f"{f}: duplicate annotation id {aid}")
            seen_ids.add(aid)
            iid, cid = int(a["image_id"]), int(a["category_id"])
            if iid not in listed:
                self._skip("annotations of unknown images", f"annotation {aid} refers to image id {iid}, which 'images' does not list")
                continue
            if iid not in images:
                continue  # its image is missing on disk (counted above)
            if cid not in self.cat_id_to_label:
                self._skip("annotations of unknown categories", f"annotation {aid} has category id {cid}, which 'categories' does not list")
                continue
            ann = self._check_annotation(a, aid, images[iid])
            if ann is not None:
                per_image[iid].append(ann)

        if train:
            empty = [i for i, anns in per_image.items() if not any(not a["iscrowd"] for a in anns)]
            if empty:
                self.notes.append(f"{len(empty)} image(s) without usable annotations left out of training")
            for i in empty:
                del images[i], per_image[i]
        if not images:
            raise DataError(f"{f}: no usable images ({self.describe()})")
        self.ids = sorted(images)
        self.images = images
        self.annotations = per_image
        if not any(per_image.values()):
            raise DataError(f"{f}: no usable annotations ({self.describe()})")
        if self.skipped:
            warnings.warn(f"{f.name}: {_fmt_counts(self.skipped)} (unusable entries skipped, stray boxes clipped; "
                          "use --strict-data to make this an error)", stacklevel=3)

    def _check_annotation(self, a: dict[str, Any], aid: int, image: dict[str, Any]) -> dict[str, Any] | None:
        bbox = a["bbox"]
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            self._skip("malformed boxes", f"annotation {aid}: bbox must be [x, y, width, height], got {bbox!r}")
            return None
        x, y, w, h = (float(v) for v in bbox)
        W, H = image["width"], image["height"]
        if not (w > 0 and h > 0):
            self._skip("zero-area boxes", f"annotation {aid}: box {bbox} has zero or negative width/height")
            return None
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(W)), min(y + h, float(H))
        if x2 <= x1 or y2 <= y1:
            self._skip("boxes outside their image", f"annotation {aid}: box {bbox} lies outside its {W}x{H} image")
            return None
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            if self.strict:
                raise DataError(f"{self.ann_file.name}: annotation {aid}: box {bbox} extends outside its {W}x{H} image (--strict-data)")
            self.skipped["boxes clipped to their image"] += 1
        seg = a.get("segmentation")
        if self.with_masks:
            ok = (isinstance(seg, list) and seg and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg)) or (
                isinstance(seg, dict) and "counts" in seg and "size" in seg and list(seg["size"]) == [H, W])
            if not ok:
                self._skip("malformed segmentations",
                           f"annotation {aid}: segmentation must be polygons (lists of >= 3 x,y pairs) or an RLE of size [{H}, {W}]")
                return None
        iscrowd = int(a.get("iscrowd", 0))
        area = float(a["area"]) if isinstance(a.get("area"), (int, float)) else (x2 - x1) * (y2 - y1)
        return dict(id=aid, image_id=image["id"], category_id=int(a["category_id"]), bbox=[x1, y1, x2 - x1, y2 - y1],
                    area=area, iscrowd=iscrowd, segmentation=seg)

    def describe(self) -> str:
        parts = [f"{len(getattr(self, 'ids', []))} images"]
        if self.skipped:
            parts.append(_fmt_counts(self.skipped))
        parts.extend(self.notes)
        return "; ".join(parts)

    @property
    def report(self) -> dict[str, Any]:
        """Counts of what was skipped or changed while reading the annotation file."""
        return {"images": len(self.ids), "skipped": dict(self.skipped), "notes": list(self.notes)}

    def coco_gt(self, image_ids: Any = None) -> dict[str, Any]:
        """The checked annotations as a COCO dict (ground truth of the evaluation).

        ``image_ids``: keep only these images and their annotations (the images actually predicted:
        an unreadable image is left out with its ground truth, as if the file did not list it).
        """
        keep = None if image_ids is None else {int(i) for i in image_ids}
        ids = [i for i in self.ids if keep is None or i in keep]
        anns = [dict(a) for i in ids for a in self.annotations[i]]
        for a in anns:
            if a["segmentation"] is None or not self.with_masks:
                x, y, w, h = a["bbox"]
                a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        return dict(images=[self.images[i] for i in ids], annotations=anns, categories=self.categories)

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.ids)

    def decode_masks(self, anns: list[dict[str, Any]], H: int, W: int) -> Any:
        import numpy as np
        import torch

        if not anns:
            return torch.zeros((0, H, W), dtype=torch.uint8)
        mask_utils = require_pycocotools()
        out = np.zeros((len(anns), H, W), dtype=np.uint8)
        for k, a in enumerate(anns):
            seg = a["segmentation"]
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, H, W))
            elif isinstance(seg["counts"], list):
                rle = mask_utils.frPyObjects(seg, H, W)
            else:
                rle = seg
            out[k] = mask_utils.decode(rle)
        return torch.from_numpy(out)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]] | None:
        import torch
        from torchvision.transforms.functional import pil_to_tensor

        info = self.images[self.ids[index]]
        path = self.image_dir / info["file_name"]
        try:
            img = load_image(str(path))
        except Exception as e:  # PIL raises many types for broken files
            msg = f"cannot read image {path}: {type(e).__name__}: {e}"
            if self.strict:
                raise DataError(msg + " (--strict-data)") from e
            warnings.warn(msg + "; skipped", stacklevel=2)
            return None
        W, H = img.size
        if (W, H) != (info["width"], info["height"]):
            msg = f"image {path} is {W}x{H} but the annotation file says {info['width']}x{info['height']}"
            if self.strict:
                raise DataError(msg + " (--strict-data)")
            warnings.warn(msg + "; skipped", stacklevel=2)
            return None
        anns = [a for a in self.annotations[self.ids[index]] if not a["iscrowd"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
                             dtype=torch.float32).reshape(-1, 4)
        target: dict[str, Any] = {
            "boxes": boxes,
            "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": info["id"],
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
        }
        if self.with_masks:
            target["masks"] = self.decode_masks(anns, H, W)
        image = pil_to_tensor(img).float().div_(255)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


class DetectionTransform:
    """Training augmentation of the reference 1x configs: horizontal flip with probability ``flip``.

    Resizing (fit into 1333x800 keeping the ratio; multi-scale with a tuple ``min_size``) and
    normalisation happen inside the torchvision detector, per batch.
    """

    def __init__(self, flip: float = 0.5) -> None:
        self.flip = flip

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if self.flip > 0 and random.random() < self.flip:
            W = image.shape[-1]
            image = image.flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = W - target["boxes"][:, [2, 0]]
            target = dict(target, boxes=boxes)
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def collate_detection(batch: list) -> tuple[list[Any], list[dict[str, Any]], int]:
    """``(images, targets, n_skipped)`` as lists (detectors batch images of different sizes)."""
    kept = [b for b in batch if b is not None]
    return [b[0] for b in kept], [b[1] for b in kept], len(batch) - len(kept)
