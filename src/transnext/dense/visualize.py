"""Overlay images for ``predict``: boxes with labels and scores, instance masks, colour-coded label maps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["draw_detections", "draw_segmentation", "palette"]


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct colours (golden-ratio hue steps, fixed saturation / value)."""
    import colorsys

    return [tuple(int(255 * v) for v in colorsys.hsv_to_rgb((0.13 + i * 0.618034) % 1.0, 0.75, 0.95)) for i in range(n)]  # type: ignore[misc]


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
    for box, label, score in zip(boxes, labels, scores):
        colour = colours[int(label) % len(colours)]
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        name = classes[int(label)] if 0 <= int(label) < len(classes) else str(label)
        text = f"{name} {float(score):.2f}"
        tw, th = draw.textbbox((0, 0), text)[2:]
        ty = y1 - th - 2 if y1 - th - 2 >= 0 else y1
        draw.rectangle([x1, ty, x1 + tw + 2, ty + th + 2], fill=colour)
        draw.text((x1 + 1, ty + 1), text, fill=(0, 0, 0))
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
