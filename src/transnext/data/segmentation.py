"""Semantic segmentation data: ADE20K-format folders or a generic "images + masks" layout.

* ADE20K layout: ``root/images/<split>/*.jpg`` and ``root/annotations/<split>/*.png`` (same stem),
  label value 0 = "other" (ignored) and 1..150 the classes; ``reduce_zero_label`` maps 0 to the
  ignore index 255 and ``k`` to ``k - 1``, as the reference does.
* generic layout: any image folder and a mask folder with the same stems, label values
  ``0..num_classes-1`` and ``ignore_index`` (255) for unlabelled pixels.

Items are checked when they are loaded: an image and a label of different sizes, or label values
outside ``0..num_classes-1`` other than the ignore index (in ``foreground_only`` mode, which
merges every class but 0: source values outside the 8-bit range 0..255, e.g. a 16-bit label map),
give ``None`` (skipped, counted by :func:`collate_segmentation`, with a warning naming the file) or, with ``strict``, a
:class:`~transnext.data.DataError`. Pairing problems (a label without its image or the reverse)
are found when the folder is opened, with the same rule.

The reference training pipeline (mmseg ADE20K 512x512) is :class:`SegmentationTrainTransform`:
resize to fit 2048x512 times a ratio drawn from 0.5-2.0 (keeping the aspect ratio), random crop
512x512 whose largest class covers at most 75% of the labelled pixels (10 tries), horizontal flip
0.5, photometric distortion, normalisation, padding to 512x512 with 0 (image) / 255 (label).
:class:`SegmentationEvalTransform` resizes to fit 2048x512 and keeps the label at its original
size (metrics are computed at the original resolution).
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .datasets import IMG_EXTENSIONS, DataError, load_image

__all__ = [
    "SegmentationDataset",
    "SegmentationEvalTransform",
    "SegmentationTrainTransform",
    "collate_segmentation",
    "photometric_distortion",
]

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


def _stems(folder: Path, exts: Sequence[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(tuple(exts)):
                continue
            p = Path(dirpath) / name
            out[str(p.relative_to(folder).with_suffix(""))] = p
    return out


class SegmentationDataset:
    """Image / label-map pairs with the checks of the module docstring.

    Args:
        pairs: ``[(image path, label path), ...]``.
        num_classes: classes after ``reduce_zero_label``.
        transform: ``(PIL image, uint8 label array) -> (image, label)``.
        reduce_zero_label: ADE20K convention (0 = ignore, k -> k - 1).
        classes: class names (length ``num_classes``).
        foreground_only: merge every class but 0 into class 1 (binary segmentation; ``num_classes`` 2).
    """

    def __init__(self, pairs: Sequence[tuple[str, str]], num_classes: int, transform: Callable | None = None,
                 reduce_zero_label: bool = False, ignore_index: int = 255, strict: bool = False,
                 classes: Sequence[str] | None = None, foreground_only: bool = False) -> None:
        if not pairs:
            raise DataError("the segmentation data set has no image/label pairs")
        if classes is not None and len(classes) != num_classes:
            raise DataError(f"{len(classes)} class names for {num_classes} classes")
        self.pairs = [(str(a), str(b)) for a, b in pairs]
        self.num_classes = num_classes
        self.transform = transform
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.strict = strict
        self.foreground_only = foreground_only
        if foreground_only and num_classes != 2:
            raise DataError(f"foreground-only segmentation has 2 classes (background, foreground), not {num_classes}")
        self.classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]

    @classmethod
    def from_folders(cls, image_dir: str | os.PathLike, label_dir: str | os.PathLike, num_classes: int,
                     strict: bool = False, what: str = "segmentation", **kwargs: Any) -> SegmentationDataset:
        """Pair ``image_dir/<stem>.<img ext>`` with ``label_dir/<stem>.png`` (sub-folders allowed)."""
        image_dir, label_dir = Path(image_dir), Path(label_dir)
        for d, kind in ((image_dir, "image"), (label_dir, "label")):
            if not d.is_dir():
                raise DataError(f"{what} {kind} folder not found: {d}")
        images = _stems(image_dir, IMG_EXTENSIONS)
        labels = _stems(label_dir, (".png",))
        if not images:
            raise DataError(f"{what} image folder {image_dir} holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
        if not labels:
            raise DataError(f"{what} label folder {label_dir} holds no .png label maps")
        no_label = sorted(set(images) - set(labels))
        no_image = sorted(set(labels) - set(images))
        problems = ((no_label, "images without a label map", label_dir), (no_image, "label maps without an image", image_dir))
        for missing, kind, other in problems:
            if missing:
                msg = f"{what}: {len(missing)} {kind} in {other} (first: {missing[0]})"
                if strict:
                    raise DataError(msg + " (--strict-data)")
                warnings.warn(msg + "; skipped", stacklevel=2)
        pairs = [(str(images[s]), str(labels[s])) for s in sorted(set(images) & set(labels))]
        if not pairs:
            raise DataError(f"{what}: no image in {image_dir} has a label map with the same name in {label_dir}")
        return cls(pairs, num_classes, strict=strict, **kwargs)

    @classmethod
    def ade20k(cls, root: str | os.PathLike, split: str = "training", num_classes: int = 150, **kwargs: Any) -> SegmentationDataset:
        """ADE20K layout (``images/<split>``, ``annotations/<split>``) with ``reduce_zero_label``."""
        root = Path(root)
        if not (root / "images" / split).is_dir():
            raise DataError(f"ADE20K-format folder expected: {root}/images/{split}/ and {root}/annotations/{split}/ (not found)")
        kwargs.setdefault("reduce_zero_label", True)
        return cls.from_folders(root / "images" / split, root / "annotations" / split, num_classes, what=f"{root.name}/{split}", **kwargs)

    def __len__(self) -> int:
        return len(self.pairs)

    def _bad(self, msg: str) -> None:
        if self.strict:
            raise DataError(msg + " (--strict-data)")
        warnings.warn(msg + "; skipped", stacklevel=3)

    @staticmethod
    def _read_label(path: str) -> Any:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"label map {path} has mode {im.mode}; expected a single-channel PNG of class indices")
            return np.array(im, dtype=np.int64)

    def load_label(self, path: str) -> Any:
        """The label map of ``path`` after ``reduce_zero_label`` and the foreground merge."""
        return self._convert(self._read_label(path))

    def _source_out_of_range(self, raw: Any, path: str) -> str | None:
        """Foreground-only mode merges every class > 0, so the class-count check cannot catch a value that is no
        class index at all (a 16-bit map of values x257): the source values must be 8-bit class indices."""
        import numpy as np

        bad = (raw < 0) | (raw > 255)
        if not self.reduce_zero_label:
            bad &= raw != self.ignore_index
        if not bad.any():
            return None
        values = sorted(np.unique(raw[bad]).tolist())
        meaning = "0 = ignore, 1 = background, 2..254 = foreground" if self.reduce_zero_label else \
            f"0 = background, {self.ignore_index} = ignore, any other value = foreground"
        return (f"label map {path} has values {values[:8]} outside 0..255 (foreground-only mode reads 8-bit class indices: "
                f"{meaning})")

    def _convert(self, label: Any) -> Any:
        import numpy as np

        if self.reduce_zero_label:
            # mmseg's reduce_zero_label: 0 -> 255 (ignore), k -> k - 1, and a 255 stays 255.
            label = np.where(label == 0, 256, label) - 1
            label[label == 254] = 255
            label[label == 255] = self.ignore_index
        if self.foreground_only:
            label = np.where((label != self.ignore_index) & (label > 0), 1, label)
        return label

    def __getitem__(self, index: int) -> tuple[Any, Any] | None:
        import numpy as np

        img_path, label_path = self.pairs[index]
        try:
            img = load_image(img_path)
        except Exception as e:  # PIL raises many types for broken files
            self._bad(f"cannot read image {img_path}: {type(e).__name__}: {e}")
            return None
        try:
            raw = self._read_label(label_path)
        except DataError:
            raise
        except Exception as e:
            self._bad(f"cannot read label map {label_path}: {type(e).__name__}: {e}")
            return None
        if self.foreground_only:
            problem = self._source_out_of_range(raw, label_path)
            if problem is not None:
                self._bad(problem)
                return None
        label = self._convert(raw)
        if label.shape != (img.height, img.width):
            self._bad(f"image {img_path} is {img.width}x{img.height} but its label map {label_path} is {label.shape[1]}x{label.shape[0]}")
            return None
        bad = (label != self.ignore_index) & ((label < 0) | (label >= self.num_classes))
        if bad.any():
            values = sorted(set(np.unique(label[bad]).tolist()))
            shown = [v + 1 for v in values] if self.reduce_zero_label else values
            self._bad(f"label map {label_path} has values {shown[:8]} outside the {self.num_classes} classes "
                      f"(expected {'1' if self.reduce_zero_label else '0'}..{self.num_classes - (0 if self.reduce_zero_label else 1)}"
                      f"{', 0 = ignore' if self.reduce_zero_label else f' and {self.ignore_index} = ignore'})")
            return None
        label = label.astype(np.uint8)
        if self.transform is not None:
            return self.transform(img, label)
        return img, label


def _rescale_size(w: int, h: int, scale: tuple[float, float]) -> tuple[int, int]:
    """Keep-ratio size fitting (long, short) = ``scale`` (mmcv's ``rescale_size``)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(w, h), short_edge / min(w, h))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def photometric_distortion(img: Any, brightness: float = 32, contrast: tuple[float, float] = (0.5, 1.5),
                           saturation: tuple[float, float] = (0.5, 1.5), hue: int = 18) -> Any:
    """mmseg's ``PhotoMetricDistortion`` on an HxWx3 float array (0-255): each step with prob 0.5.

    Brightness shift, contrast (before or after the colour steps, at random), saturation scale,
    hue shift (``hue`` on OpenCV's 0-180 hue scale).
    """
    import numpy as np

    def contrast_step(x: Any) -> Any:
        return np.clip(x * random.uniform(*contrast), 0, 255) if random.randint(0, 1) else x

    img = img.astype(np.float32)
    if random.randint(0, 1):
        img = np.clip(img + random.uniform(-brightness, brightness), 0, 255)
    mode = random.randint(0, 1)
    if mode == 1:
        img = contrast_step(img)
    do_sat, do_hue = random.randint(0, 1), random.randint(0, 1)
    if do_sat or do_hue:
        from PIL import Image

        hsv = np.array(Image.fromarray(img.round().astype(np.uint8)).convert("HSV"), dtype=np.float32)
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * random.uniform(*saturation), 0, 255)
        if do_hue:
            hsv[..., 0] = (hsv[..., 0] + random.randint(-hue, hue) * 256 / 180) % 256
        img = np.array(Image.fromarray(hsv.round().astype(np.uint8), "HSV").convert("RGB"), dtype=np.float32)
    if mode == 0:
        img = contrast_step(img)
    return img


def _normalize(img: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    import numpy as np
    import torch

    arr = (np.asarray(img, dtype=np.float32) - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class SegmentationTrainTransform:
    """The reference training pipeline (see the module docstring); returns ``(3xSxS float, SxS long)``."""

    def __init__(self, crop_size: int = 512, scale: tuple[int, int] = (2048, 512), ratio_range: tuple[float, float] = (0.5, 2.0),
                 cat_max_ratio: float = 0.75, flip: float = 0.5, photometric: bool = True, ignore_index: int = 255,
                 mean: Sequence[float] = IMAGENET_MEAN_255, std: Sequence[float] = IMAGENET_STD_255) -> None:
        self.crop_size = crop_size
        self.scale = scale
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio
        self.flip = flip
        self.photometric = photometric
        self.ignore_index = ignore_index
        self.mean, self.std = mean, std

    def _crop_box(self, label: Any) -> tuple[int, int]:
        import numpy as np

        H, W = label.shape
        c = self.crop_size
        y = x = 0
        for _ in range(10):
            y, x = random.randint(0, max(H - c, 0)), random.randint(0, max(W - c, 0))
            if self.cat_max_ratio >= 1:
                break
            values, counts = np.unique(label[y:y + c, x:x + c], return_counts=True)
            counts = counts[values != self.ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return y, x

    def __call__(self, img: Any, label: Any) -> tuple[Any, Any]:
        import numpy as np
        import torch
        from PIL import Image

        r = random.uniform(*self.ratio_range)
        w, h = _rescale_size(img.width, img.height, (self.scale[0] * r, self.scale[1] * r))
        img = img.resize((w, h), Image.BILINEAR)
        label = np.array(Image.fromarray(label).resize((w, h), Image.NEAREST))
        c = self.crop_size
        y, x = self._crop_box(label)
        img = np.asarray(img, dtype=np.float32)[y:y + c, x:x + c]
        label = label[y:y + c, x:x + c]
        if self.flip > 0 and random.random() < self.flip:
            img, label = img[:, ::-1], label[:, ::-1]
        if self.photometric:
            img = photometric_distortion(img)
        image = _normalize(img, self.mean, self.std)
        target = torch.from_numpy(np.ascontiguousarray(label)).long()
        ph, pw = c - image.shape[1], c - image.shape[2]
        if ph > 0 or pw > 0:  # pad bottom/right: 0 in normalised image space, ignore in the label
            image = torch.nn.functional.pad(image, (0, pw, 0, ph), value=0.0)
            target = torch.nn.functional.pad(target, (0, pw, 0, ph), value=self.ignore_index)
        return image, target


class SegmentationEvalTransform:
    """Resize to fit ``scale`` (keep ratio), normalise; the label stays at its original size."""

    def __init__(self, scale: tuple[int, int] | None = (2048, 512), mean: Sequence[float] = IMAGENET_MEAN_255,
                 std: Sequence[float] = IMAGENET_STD_255) -> None:
        self.scale = scale
        self.mean, self.std = mean, std

    def __call__(self, img: Any, label: Any) -> tuple[Any, Any]:
        import torch
        from PIL import Image

        if self.scale is not None:
            img = img.resize(_rescale_size(img.width, img.height, self.scale), Image.BILINEAR)
        return _normalize(img, self.mean, self.std), torch.from_numpy(label).long()


def collate_segmentation(batch: list) -> tuple[Any, Any, int]:
    """``(images, labels, n_skipped)``: stacked tensors when all sizes agree, else lists."""
    import torch

    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    images, labels = [b[0] for b in kept], [b[1] for b in kept]
    if len({tuple(i.shape) for i in images}) == 1 and len({tuple(t.shape) for t in labels}) == 1:
        return torch.stack(images), torch.stack(labels), skipped
    return images, labels, skipped
