"""The embedded demo data set: 10 classes of 28x28 animal silhouettes shipped in the package.

``demo_animals.npz`` (about 2.6 MB, no download) holds a fixed split of the Animal-Shape data set
(licence: ``demo_animals_LICENSE.txt`` beside it): 8,257 development and 1,459 held-out images of
bear, bird, cat, cow, dog, elephant, giraffe, horse, sheep, zebra. Three splits are served:

* ``train``: the development images minus the validation ones (7,430 images);
* ``val``: a fixed, class-stratified tenth of the development images (827), used to select the
  best checkpoint during training;
* ``test``: the 1,459 held-out images, seen only by the final report.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from .datasets import ArrayDataset, DataError

__all__ = ["DEMO_CLASSES", "DEMO_SPLITS", "demo_arrays", "demo_dataset", "demo_split", "nearest_neighbour_top1", "write_demo_images"]

DEMO_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
DEMO_SPLITS = ("train", "val", "test")
_VAL_FRACTION = 0.1  # of each class of the development images
_SPLIT_SEED = 0


@lru_cache(maxsize=1)
def demo_arrays() -> dict[str, Any]:
    import numpy as np

    ref = resources.files("transnext.data").joinpath("demo_animals.npz")
    try:
        with ref.open("rb") as f, np.load(f, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (FileNotFoundError, OSError, ValueError) as e:
        raise DataError(f"the embedded demo data (transnext/data/demo_animals.npz) is missing or damaged: {e}") from e


@lru_cache(maxsize=4)
def _split_indices(split: str) -> Any:
    """Indices into the development arrays of ``train`` or ``val`` (fixed, class-stratified)."""
    import numpy as np

    labels = np.asarray(demo_arrays()["train_labels"])
    rng = np.random.default_rng(_SPLIT_SEED)
    val = []
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0]
        val.extend(rng.permutation(members)[: int(round(len(members) * _VAL_FRACTION))].tolist())
    in_val = np.zeros(len(labels), bool)
    in_val[val] = True
    return np.nonzero(in_val if split == "val" else ~in_val)[0]


def demo_split(split: str) -> tuple[Any, Any]:
    """``(images uint8 (N, 28, 28), labels (N,))`` of ``train``, ``val`` or ``test``."""
    if split not in DEMO_SPLITS:
        raise DataError(f"the demo data set has splits {', '.join(map(repr, DEMO_SPLITS))}, not {split!r}")
    z = demo_arrays()
    if split == "test":
        return z["val_images"], z["val_labels"]
    idx = _split_indices(split)
    return z["train_images"][idx], z["train_labels"][idx]


def demo_dataset(split: str, transform: Any = None) -> ArrayDataset:
    """``split``: ``"train"``, ``"val"`` (checkpoint selection) or ``"test"`` (held out)."""
    images, labels = demo_split(split)
    return ArrayDataset(images, labels, [str(c) for c in demo_arrays()["classes"]], transform)


def nearest_neighbour_top1(train: tuple[Any, Any], test: tuple[Any, Any], chunk: int = 512) -> float:
    """Top-1 (%) of a pixel 1-nearest-neighbour classifier (Euclidean distance on raw pixels): the
    baseline a trained model should beat."""
    import numpy as np
    import torch

    xtr = torch.from_numpy(np.asarray(train[0], np.float32).reshape(len(train[0]), -1))
    ytr = torch.from_numpy(np.asarray(train[1], np.int64))
    xte = torch.from_numpy(np.asarray(test[0], np.float32).reshape(len(test[0]), -1))
    yte = torch.from_numpy(np.asarray(test[1], np.int64))
    sq_tr = (xtr * xtr).sum(1)
    right = 0
    for i in range(0, len(xte), chunk):
        q = xte[i:i + chunk]
        d = sq_tr[None, :] - 2 * q @ xtr.T  # |q|^2 is the same for every candidate
        right += int((ytr[d.argmin(1)] == yte[i:i + chunk]).sum())
    return 100.0 * right / max(len(xte), 1)


def write_demo_images(out_dir: str | Path, n: int = 8, split: str = "test", scale: int = 1) -> list[Path]:
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
