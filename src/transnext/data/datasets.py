"""Image data sets: ImageFolder layout with clear errors, corrupt-file handling, arrays in memory.

Every data set here returns ``(PIL image, target)``, or ``None`` for a file that cannot be
decoded (unless ``strict``, which raises :class:`DataError`). :func:`collate_skip` drops those
``None`` items from a batch and reports how many it dropped, so the count survives worker
processes and reaches the training and evaluation loops.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "IMG_EXTENSIONS",
    "ArrayDataset",
    "DataError",
    "ImageFileDataset",
    "collate_skip",
    "find_images",
    "load_image",
    "iter_batches",
    "scan_image_folder",
    "worker_errors",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class DataError(ValueError):
    """A data set folder or image file is missing, empty, or unreadable."""


def _worker_original(e: BaseException) -> BaseException | None:
    """The error a DataLoader worker raised, rebuilt from the message torch re-raises it with in the main
    process ("Caught X in DataLoader worker process N. Original Traceback ..."); None for any other error."""
    text = str(e)
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return None
    cls = type(e)
    name = cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
    marker = f"\n{name}: "
    at = text.rfind(marker)
    if at >= 0:
        try:
            return cls(text[at + len(marker):].rstrip("\n"))
        except Exception:  # an error type that takes other arguments: fall through to the last line
            pass
    last = [line for line in text.splitlines() if line.strip()][-1]
    return RuntimeError(last)


@contextlib.contextmanager
def worker_errors() -> Iterator[None]:
    """Re-raise an error from a DataLoader worker as the original error and message (a file that
    cannot be read with ``strict``), without the worker's traceback folded into the message."""
    try:
        yield
    except Exception as e:
        original = _worker_original(e)
        if original is None:
            raise
        raise original from None


def iter_batches(loader: Any) -> Iterator[Any]:
    """The batches of ``loader``, with worker errors re-raised as :func:`worker_errors` does."""
    with worker_errors():
        yield from loader


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _layout_hint(root: Path) -> str:
    return f"expected an ImageFolder layout: {root}/<class name>/<image files> ({', '.join(IMG_EXTENSIONS[:4])}, ...)"


def scan_image_folder(
    root: str | os.PathLike,
    class_to_idx: dict[str, int] | None = None,
    strict: bool = False,
    what: str = "dataset",
) -> tuple[list[tuple[str, int]], list[str]]:
    """List ``(path, class index)`` of an ImageFolder tree and its class folder names.

    ``class_to_idx`` maps folder names to indices (default: sorted folder names -> 0..n-1);
    folders it does not list are an error. Class folders without images are reported with a
    warning (an error with ``strict``); their index stays reserved so labels keep their meaning.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{what} folder not found: {root} ({_layout_hint(root)})")
    if not root.is_dir():
        raise DataError(f"{what} path is not a folder: {root} ({_layout_hint(root)})")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    class_dirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    if not class_dirs:
        loose = [e.name for e in entries if e.is_file() and _is_image(e.name)]
        if loose:
            raise DataError(
                f"{what} folder {root} holds {len(loose)} images but no class folders; {_layout_hint(root)}"
            )
        raise DataError(f"{what} folder {root} is empty; {_layout_hint(root)}")
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(class_dirs)}
    else:
        unknown = [c for c in class_dirs if c not in class_to_idx]
        if unknown:
            shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown) - 8} more)" if len(unknown) > 8 else "")
            raise DataError(f"{what} folder {root}: class folders not known to the model's class list: {shown}")
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for c in class_dirs:
        found = []
        for dirpath, dirnames, filenames in os.walk(root / c, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
        if not found:
            empty.append(c)
        samples.extend((p, class_to_idx[c]) for p in found)
    if not samples:
        raise DataError(f"{what} folder {root}: no image files in any of its {len(class_dirs)} class folders; {_layout_hint(root)}")
    if empty:
        shown = ", ".join(empty[:8]) + (f", ... ({len(empty) - 8} more)" if len(empty) > 8 else "")
        msg = f"{what} folder {root}: {len(empty)} class folder(s) without images: {shown}"
        if strict:
            raise DataError(msg + " (--strict-data)")
        warnings.warn(msg + "; their classes get no samples", stacklevel=2)
    return samples, class_dirs


def find_images(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Expand files and folders (recursively, sorted) into image file paths."""
    out: list[str] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(
                os.path.join(d, f) for d, dn, fs in os.walk(p, followlinks=True) for f in fs
                if _is_image(f) and not any(part.startswith(".") for part in Path(d).relative_to(p).parts)
            )
            if not found:
                raise DataError(f"no image files in folder {p} (looked for {', '.join(IMG_EXTENSIONS)})")
            out.extend(found)
        elif p.is_file():
            out.append(str(p))
        else:
            raise DataError(f"image or folder not found: {p}")
    return out


ALPHA_WARNING = "images with an alpha channel are composed on a white background before the model sees them"


def to_rgb(img: Any) -> Any:
    """8-bit RGB of any PIL image: deep grey scaled to 8 bits, transparency composed on white.

    PIL's own ``convert("RGB")`` clips 16-bit grey values at 255 (a 16-bit photo becomes white)
    and drops alpha, leaving whatever colour the transparent pixels happen to store.
    """
    import numpy as np
    from PIL import Image

    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            top = 1.0 if arr.size and float(arr.max()) <= 1.0 else 255.0
        else:
            # 16-bit files (PNG, TIFF) decode as "I;16" or "I": their range is 0..65535
            top = 65535.0 if img.mode.startswith("I;16") or (arr.size and float(arr.max()) > 255) else 255.0
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        warnings.warn(ALPHA_WARNING, stacklevel=3)
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str) -> Any:
    """Decode an image fully (so truncated files fail here) and convert it to 8-bit RGB (:func:`to_rgb`)."""
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return to_rgb(img)


class ImageFileDataset:
    """Images from ``samples = [(path, target), ...]``; corrupt files give ``None`` (or raise)."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable | None = None,
        strict: bool = False,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.strict = strict
        self.classes = list(classes) if classes is not None else None

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path, target = self.samples[index]
        try:
            img = load_image(path)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            msg = f"cannot read image {path}: {type(e).__name__}: {e}"
            if self.strict:
                raise DataError(msg + " (remove or replace the file, or run without --strict-data to skip it)") from e
            warnings.warn(msg + "; skipped", stacklevel=2)
            return None
        if self.transform is not None:
            img = self.transform(img)
        return img, target


class ArrayDataset:
    """Grayscale or RGB images held in a uint8 array (N, H, W[, 3]), served as PIL RGB images."""

    def __init__(self, images: Any, labels: Sequence[int], classes: Sequence[str], transform: Callable | None = None) -> None:
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = [int(t) for t in labels]
        self.classes = list(classes)
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        img = Image.fromarray(self.images[index]).convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[index]


def collate_skip(batch: list) -> tuple[Any, Any, int]:
    """Default collation after dropping ``None`` (unreadable) items: ``(images, targets, n_skipped)``.

    ``images`` and ``targets`` are None when every item of the batch was unreadable.
    """
    from torch.utils.data import default_collate

    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    images, targets = default_collate(kept)
    return images, targets, skipped
