"""Batched top-k prediction over image files."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .amp import autocast

__all__ = ["class_names_for", "predict_images"]


def class_names_for(num_classes: int, classes: Sequence[str] | None = None) -> list[str]:
    """Checkpoint class names, else ImageNet's for 1000 classes, else ``class_<i>``."""
    if classes and len(classes) == num_classes:
        return list(classes)
    if num_classes == 1000:
        from ..data.classes import imagenet_class_names

        return imagenet_class_names()
    return [f"class_{i}" for i in range(num_classes)]


@torch.no_grad()
def predict_images(
    model: torch.nn.Module,
    paths: Sequence[str],
    transform: Any,
    classes: Sequence[str],
    topk: int = 5,
    batch_size: int = 32,
    device: torch.device | None = None,
    amp: str | None = "none",
    strict: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One record per path: ``{"path", "predictions": [{"index", "label", "prob"}, ...]}`` or ``{"path", "error"}``."""
    from ..data import DataError, load_image

    device = device or torch.device("cpu")
    model.eval()
    k = max(1, min(topk, len(classes)))
    results: list[dict[str, Any]] = []
    bar = None
    if progress and len(paths) > batch_size:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="predict", unit="img", dynamic_ncols=True, leave=False)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        tensors, ok = [], []
        for p in chunk:
            try:
                tensors.append(transform(load_image(p)))
                ok.append(p)
            except Exception as e:
                msg = f"cannot read image {p}: {type(e).__name__}: {e}"
                if strict:
                    raise DataError(msg) from e
                warnings.warn(msg + "; skipped", stacklevel=2)
                results.append({"path": p, "error": msg})
        if tensors:
            x = torch.stack(tensors).to(device)
            with autocast(device, amp):
                logits = model(x)
            probs = logits.float().softmax(dim=1)
            top_p, top_i = probs.topk(k, dim=1)
            for p, ps, idx in zip(ok, top_p.tolist(), top_i.tolist()):
                results.append({"path": p, "predictions": [
                    {"index": int(i), "label": classes[i], "prob": float(q)} for i, q in zip(idx, ps)
                ]})
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    order = {p: i for i, p in enumerate(paths)}
    results.sort(key=lambda r: order[r["path"]])
    return results
