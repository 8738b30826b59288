"""Overlay images for ``predict``: boxes with labels and scores, instance masks, colour-coded label maps."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

__all__ = ["draw_detections", "draw_segmentation", "label_boxes", "palette"]


@functools.lru_cache(maxsize=1)
def _qualitative() -> tuple[tuple[int, int, int], ...]:
    """A fixed order of well-separated colours: each one the candidate farthest (in RGB) from those before it."""
    import colorsys

    cands = [tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h / 24, s, v))
             for h in range(24) for s, v in ((0.9, 0.95), (0.5, 1.0), (0.95, 0.55))]
    chosen = [cands.pop(0)]  # red first
    while cands:
        far = max(range(len(cands)), key=lambda i: min(sum((a - b) ** 2 for a, b in zip(cands[i], c)) for c in chosen))
        chosen.append(cands.pop(far))
    return tuple(chosen)  # type: ignore[return-value]


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` colours indexed by class: a fixed qualitative palette (72 colours, the first ones the most distinct), then repeated."""
    base = _qualitative()
    return [base[i % len(base)] for i in range(n)]


def _text_colour(fill: Sequence[int]) -> tuple[int, int, int]:
    """Black on light fills, white on dark ones (Rec. 601 luma)."""
    r, g, b = fill[:3]
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b >= 128 else (255, 255, 255)


def _overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def label_boxes(boxes: Sequence[Sequence[float]], text_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int],
                pad: int = 2) -> list[tuple[int, int, int, int] | None]:
    """Where each box's label goes: ``(x1, y1, x2, y2)`` of the label background, always inside the image.

    A label sits on the box's top edge, outside; at the top of the image it flips inside, below the
    edge. Labels that would cover an already placed one try the box's inside top, then its bottom,
    then below it; with no free place left the label is left out (None: its box is still drawn,
    and listed in predictions.json), so that a crowd of low scores cannot bury the best ones.
    Labels wider than the image are cut at its right edge.
    """
    W, H = image_size
    out: list[tuple[int, int, int, int] | None] = []
    placed: list[tuple[int, int, int, int]] = []
    for box, (tw, th) in zip(boxes, text_sizes):
        w, h = min(tw + pad, W), min(th + pad, H)
        x1, y1, _, y2 = (float(v) for v in box)
        left = int(min(max(x1, 0), W - w))
        tries = [y1 - h, y1, y2 - h, y2]
        tops = [int(min(max(t, 0), H - h)) for t in tries if t >= 0 and t + h <= H] or [int(min(max(y1, 0), H - h))]
        rects = [(left, t, left + w, t + h) for t in tops]
        free = [r for r in rects if not any(_overlap(r, p) for p in placed)]
        out.append(free[0] if free else None)
        if free:
            placed.append(free[0])
    return out


def draw_detections(image: Any, boxes: Sequence[Sequence[float]], labels: Sequence[int], scores: Sequence[float],
                    classes: Sequence[str], masks: Any | None = None, alpha: float = 0.45) -> Any:
    """PIL image with masks blended in and boxes labelled ``name score`` (``labels`` index ``classes``)."""
    import numpy as np
    from PIL import Image, ImageDraw

    colours = palette(max(len(classes), 1))
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    if masks is not None:
        for m, label in zip(masks, labels):
            m = np.asarray(m, dtype=bool)
            arr[m] = (1 - alpha) * arr[m] + alpha * np.asarray(colours[int(label) % len(colours)], dtype=np.float32)
    out = Image.fromarray(arr.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    # the best detections get the first pick of label places
    order = sorted(range(len(boxes)), key=lambda k: -float(scores[k]))
    texts = []
    for k in order:
        label = int(labels[k])
        name = classes[label] if 0 <= label < len(classes) else str(label)
        texts.append(f"{name} {float(scores[k]):.2f}")
    sizes = [tuple(draw.textbbox((0, 0), t)[2:]) for t in texts]
    for k in order:
        colour = colours[int(labels[k]) % len(colours)]
        draw.rectangle([float(v) for v in boxes[k]], outline=colour, width=2)
    for k, text, rect in zip(order, texts, label_boxes([boxes[k] for k in order], sizes, out.size)):
        if rect is None:
            continue
        colour = colours[int(labels[k]) % len(colours)]
        draw.rectangle([rect[0], rect[1], rect[2] - 1, rect[3] - 1], fill=colour)
        draw.text((rect[0] + 1, rect[1] + 1), text, fill=_text_colour(colour))
    return out


def draw_segmentation(image: Any, label_map: Any, classes: Sequence[str], alpha: float = 0.5, ignore_index: int = 255) -> Any:
    """Side panel legend + the image with the label map blended in (classes present only)."""
    import numpy as np
    from PIL import Image, ImageDraw

    colours = np.asarray(palette(len(classes)), dtype=np.float32)
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    lab = np.asarray(label_map)
    valid = lab != ignore_index
    blended = arr.copy()
    blended[valid] = (1 - alpha) * arr[valid] + alpha * colours[lab[valid]]
    present = [int(c) for c in np.unique(lab[valid])]
    fg = Image.fromarray(blended.round().astype(np.uint8))
    row = 14
    legend_w = 10 + max((len(classes[c]) for c in present), default=4) * 7 + 20
    out = Image.new("RGB", (fg.width + legend_w, max(fg.height, row * len(present) + 8)), (255, 255, 255))
    out.paste(fg, (0, 0))
    draw = ImageDraw.Draw(out)
    for k, c in enumerate(present):
        y = 4 + k * row
        draw.rectangle([fg.width + 4, y, fg.width + 14, y + 10], fill=tuple(int(v) for v in colours[c]))
        draw.text((fg.width + 18, y - 1), classes[c], fill=(0, 0, 0))
    return out
