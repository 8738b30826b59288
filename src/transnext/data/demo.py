"""The embedded demo data set: 10 classes of 28x28 animal silhouettes shipped in the package.

``demo_animals.npz`` (about 2.6 MB, no download) holds a fixed train/val split of the
Animal-Shape data set (licence: ``demo_animals_LICENSE.txt`` beside it): 8,257 training and
1,459 validation images of bear, bird, cat, cow, dog, elephant, giraffe, horse, sheep, zebra.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from .datasets import ArrayDataset, DataError

__all__ = ["DEMO_CLASSES", "demo_arrays", "demo_dataset", "write_demo_images"]

DEMO_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


@lru_cache(maxsize=1)
def demo_arrays() -> dict[str, Any]:
    import numpy as np

    ref = resources.files("transnext.data").joinpath("demo_animals.npz")
    try:
        with ref.open("rb") as f, np.load(f, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (FileNotFoundError, OSError, ValueError) as e:
        raise DataError(f"the embedded demo data (transnext/data/demo_animals.npz) is missing or damaged: {e}") from e


def demo_dataset(split: str, transform: Any = None) -> ArrayDataset:
    """``split``: ``"train"`` or ``"val"``."""
    if split not in ("train", "val"):
        raise DataError(f"the demo data set has splits 'train' and 'val', not {split!r}")
    z = demo_arrays()
    return ArrayDataset(z[f"{split}_images"], z[f"{split}_labels"], [str(c) for c in z["classes"]], transform)


def write_demo_images(out_dir: str | Path, n: int = 8, split: str = "val", scale: int = 1) -> list[Path]:
    """Write ``n`` images of ``split`` (one per class first) as PNG files named ``<i>_<class>.png``."""
    import numpy as np
    from PIL import Image

    ds = demo_dataset(split)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(ds.labels)
    chosen: list[int] = []
    for c in range(len(ds.classes)):  # one per class, then fill in order
        hits = np.nonzero(labels == c)[0]
        if len(hits):
            chosen.append(int(hits[0]))
    chosen = (chosen + [i for i in range(len(ds)) if i not in chosen])[:n]
    paths = []
    for k, i in enumerate(chosen):
        img = Image.fromarray(ds.images[i])
        if scale > 1:
            img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        p = out / f"{k:02d}_{ds.classes[ds.labels[i]]}.png"
        img.save(p)
        paths.append(p)
    return paths
