"""A small dense demo data set, composed at run time from the embedded animal silhouettes.

Each scene is a ``size x size`` RGB image: a dark procedural textured background (smooth colour
noise, stripes or checks) with 1-3 animals pasted on it, each a silhouette from
``demo_animals.npz`` scaled to 5/16-5/8 of the image side (40-80 px at 128), flipped at random
and filled with its own bright, faintly textured colour: bright shapes on a dark ground, as the
silhouettes the demo trunk is pretrained on (``transnext demo``). Later animals may occlude
earlier ones; an instance that keeps less than 35% of its pixels (or fewer than 40) is dropped.
Everything follows from ``seed``: the same call writes the same files.

:func:`write_dense_demo` writes the three splits in both formats under one root::

    images/{train,val,test}/000000.png
    annotations/instances_{train,val,test}.json   COCO instances, RLE masks, categories 1..10
    annotations/{train,val,test}/000000.png       ADE20K-style label maps: 0 = ignore,
                                                  1 = background, 2..11 = the animals
    classes.txt                                   the 11 segmentation class names

``train`` scenes use the silhouettes of the classification training split; ``val`` (checkpoint
selection) and ``test`` (the reported figures) use two disjoint halves of its validation split,
so the reported numbers come from animals the model has never seen.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .demo import DEMO_CLASSES, demo_arrays

__all__ = ["DENSE_DEMO_SPLITS", "SEGMENT_DEMO_CLASSES", "compose_scene", "ensure_dense_demo", "write_dense_demo"]

DENSE_DEMO_SPLITS = {"train": 800, "val": 48, "test": 96}
SEGMENT_DEMO_CLASSES = ("background", *DEMO_CLASSES)
BG_RANGE, BG_TEXTURE = (10, 110), 0.6  # background base colour per channel (0-255), texture amplitude
FG_RANGE, FG_TEXTURE = (150, 255), 0.4  # the animals'
SIDE_RANGE = (5 / 16, 5 / 8)  # side of an animal's (square) silhouette, as a fraction of the scene side
_VERSION = 4


def _texture(rng: Any, size: int, base: Any, kind: int, amplitude: float = 1.0) -> Any:
    """An HxWx3 float texture around colour ``base`` (0-255); ``amplitude`` scales its pattern."""
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == 0:  # smooth colour noise: a coarse random grid upsampled bilinearly
        g = rng.integers(-60, 60, size=(5, 5, 3)).astype(np.float32)
        from PIL import Image

        layers = [np.asarray(Image.fromarray(g[..., c]).resize((size, size), Image.BILINEAR)) for c in range(3)]
        tex = np.stack(layers, -1)
    elif kind == 1:  # stripes at a random angle
        a = rng.uniform(0, np.pi)
        period = rng.uniform(6, 20)
        s = np.sin((np.cos(a) * xx + np.sin(a) * yy) * 2 * np.pi / period)[..., None]
        tex = s * rng.integers(15, 50, size=3).astype(np.float32)
    else:  # checks
        cell = int(rng.integers(5, 16))
        s = (((yy // cell) + (xx // cell)) % 2 * 2 - 1)[..., None]
        tex = s * rng.integers(10, 40, size=3).astype(np.float32)
    noise = rng.normal(0, 8, size=(size, size, 3)).astype(np.float32)
    return np.clip(base[None, None, :] + amplitude * tex + noise, 0, 255)


def compose_scene(rng: Any, silhouettes: Any, labels: Any, size: int = 128) -> dict[str, Any]:
    """One scene: ``image`` (HxWx3 uint8), ``masks`` (N, H, W bool), ``labels`` (N,) in 0..9, ``semantic`` (HxW)."""
    import numpy as np
    from PIL import Image

    # dark textured background, bright animals: the polarity of the silhouettes the demo trunk was trained on
    bg = _texture(rng, size, rng.uniform(BG_RANGE[0], BG_RANGE[1], size=3).astype(np.float32), int(rng.integers(0, 3)), BG_TEXTURE)
    image = bg
    owner = np.full((size, size), -1, dtype=np.int64)
    full_area: list[int] = []
    cls: list[int] = []
    for k in range(int(rng.integers(1, 4))):
        i = int(rng.integers(0, len(silhouettes)))
        side = int(rng.integers(int(size * SIDE_RANGE[0]), int(size * SIDE_RANGE[1]) + 1))  # 40-80 px at 128
        sil = Image.fromarray(silhouettes[i]).resize((side, side), Image.BILINEAR)
        m = np.asarray(sil) > 127
        if rng.random() < 0.5:
            m = m[:, ::-1]
        ys, xs = np.nonzero(m)
        if len(ys) < 40:
            continue
        m = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        h, w = m.shape
        y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        colour = rng.uniform(FG_RANGE[0], FG_RANGE[1], size=3).astype(np.float32)
        fg = _texture(rng, size, colour, int(rng.integers(0, 3)), FG_TEXTURE)
        canvas = np.zeros((size, size), dtype=bool)
        canvas[y0:y0 + h, x0:x0 + w] = m
        image = np.where(canvas[..., None], fg, image)
        owner[canvas] = k
        full_area.append(int(m.sum()))
        cls.append(int(labels[i]))
    masks, kept = [], []
    for k, area in enumerate(full_area):
        visible = owner == k
        if visible.sum() >= max(40, 0.35 * area):
            masks.append(visible)
            kept.append(cls[k])
    semantic = np.zeros((size, size), dtype=np.uint8)  # 0 = background; every visible animal pixel has its class
    for k, c in enumerate(cls):
        semantic[owner == k] = c + 1
    return dict(image=image.round().astype(np.uint8),
                masks=np.stack(masks) if masks else np.zeros((0, size, size), bool),
                labels=np.asarray(kept, dtype=np.int64), semantic=semantic)


def _split_pool(split: str) -> tuple[Any, Any]:
    z = demo_arrays()
    if split == "train":
        return z["train_images"], z["train_labels"]
    sl = slice(0, None, 2) if split == "val" else slice(1, None, 2)
    return z["val_images"][sl], z["val_labels"][sl]


def _fingerprint(size: int, counts: dict[str, int], seed: int) -> str:
    return hashlib.sha256(json.dumps([_VERSION, size, sorted(counts.items()), seed]).encode()).hexdigest()[:16]


def write_dense_demo(root: str | os.PathLike, size: int = 128, counts: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write the demo scenes under ``root`` (see the module docstring); reuses a complete earlier copy."""
    import numpy as np
    from PIL import Image

    from ..checkpoints import atomic_write
    from .coco import require_pycocotools

    mask_utils = require_pycocotools()
    counts = dict(counts or DENSE_DEMO_SPLITS)
    root = Path(root)
    stamp = root / "demo_manifest.json"
    fp = _fingerprint(size, counts, seed)
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()).get("fingerprint") == fp:
                return root
        except (OSError, json.JSONDecodeError):
            pass
    for split_no, (split, n) in enumerate(counts.items()):
        rng = np.random.default_rng([seed, split_no, _VERSION])
        sils, labs = _split_pool(split)
        img_dir, lab_dir = root / "images" / split, root / "annotations" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lab_dir.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            scene = compose_scene(rng, sils, labs, size)
            name = f"{i:06d}.png"
            Image.fromarray(scene["image"]).save(img_dir / name)
            Image.fromarray((scene["semantic"] + 1).astype(np.uint8)).save(lab_dir / name)  # 0 stays free for "ignore"
            images.append(dict(id=i + 1, file_name=name, width=size, height=size))
            for m, c in zip(scene["masks"], scene["labels"]):
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
                anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=int(c) + 1, bbox=[x, y, w, h],
                                 area=float(mask_utils.area(rle)), iscrowd=0,
                                 segmentation=dict(size=[size, size], counts=rle["counts"].decode("ascii"))))
        coco = dict(info=dict(description=f"transnext dense demo ({split})"), images=images, annotations=anns,
                    categories=[dict(id=k + 1, name=c) for k, c in enumerate(DEMO_CLASSES)])
        text = json.dumps(coco)
        atomic_write(root / "annotations" / f"instances_{split}.json", lambda tmp, t=text: Path(tmp).write_text(t))
    classes_txt = "\n".join(SEGMENT_DEMO_CLASSES) + "\n"  # segmentation class names, read by ``transnext segment``
    atomic_write(root / "classes.txt", lambda tmp: Path(tmp).write_text(classes_txt))
    manifest = json.dumps(dict(fingerprint=fp, size=size, counts=counts, seed=seed,
                               segment_classes=list(SEGMENT_DEMO_CLASSES), detect_classes=list(DEMO_CLASSES)), indent=2)
    atomic_write(stamp, lambda tmp: Path(tmp).write_text(manifest))
    return root


def ensure_dense_demo(root: str | os.PathLike) -> Path:
    """``root`` as is when it already holds demo scenes (any size or split sizes), else the default scenes written there."""
    root = Path(root)
    if (root / "demo_manifest.json").is_file():
        return root
    return write_dense_demo(root)
