"""Evaluation: top-1 / top-5 / loss on a data set, and the robustness benchmarks.

Benchmarks in their standard layouts:

* ``folder``: an ImageFolder tree (``<root>/<class>/<images>``; ``<root>/val`` is used when present).
  Folders named by ImageNet WordNet ids map to their ImageNet indices for 1000-class models.
* ``imagenet-a`` / ``imagenet-r``: ``<root>/<wnid>/...`` over a 200-class subset; predictions are
  taken over the logits of those 200 classes only.
* ``imagenet-sketch``: ``<root>/<wnid>/...`` (all 1000 classes).
* ``imagenet-v2``: ``<root>/<class index 0..999>/...`` (folders named by the integer index).
* ``imagenet-c``: ``<root>/<corruption>/<severity 1..5>/<wnid>/...``; per corruption and severity
  error, corruption error CE normalised by AlexNet's, and the mean (mCE).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .amp import autocast
from .distributed import DistInfo, reduce_sum

__all__ = [
    "ALEXNET_ERRORS",
    "BENCHMARKS",
    "detect_benchmark",
    "evaluate",
    "markdown_table",
    "run_benchmark",
]

BENCHMARKS = ("folder", "imagenet-a", "imagenet-r", "imagenet-sketch", "imagenet-v2", "imagenet-c")

# AlexNet top-1 error per ImageNet-C corruption, averaged over the 5 severities: the standard
# normaliser of the corruption error (Hendrycks & Dietterich, 2019).
ALEXNET_ERRORS = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592,
    "contrast": 0.853204, "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500,
}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Any,
    device: torch.device,
    amp: str | None = "none",
    class_subset: Sequence[int] | None = None,
    info: DistInfo | None = None,
    progress: bool = False,
    desc: str = "eval",
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over ``loader`` (``(x, y, n_skipped)`` batches).

    ``class_subset``: model output indices to restrict the prediction to; targets are then
    positions within that list. Under DDP each process evaluates its shard and the counts are summed.
    """
    info = info or DistInfo(device=device)
    was_training = model.training
    model.eval()
    subset = torch.as_tensor(list(class_subset), device=device) if class_subset is not None else None
    correct1 = correct5 = loss_sum = n = skipped = 0.0
    bar = None
    if progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(loader), desc=desc, unit="batch", dynamic_ncols=True, leave=False)
    t0 = time.perf_counter()
    for x, y, n_skip in loader:
        skipped += n_skip
        if x is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                logits = model(x)
            logits = logits.float()
            if subset is not None:
                logits = logits.index_select(1, subset)
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top.eq(y[:, None])
            correct1 += hit[:, 0].sum().item()
            correct5 += hit.any(dim=1).sum().item()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            n += y.numel()
        if bar is not None:
            bar.update(1)
            if n:
                bar.set_postfix(top1=f"{100 * correct1 / n:.2f}", img_s=f"{n / (time.perf_counter() - t0):.0f}")
    if bar is not None:
        bar.close()
    correct1, correct5, loss_sum, n, skipped = reduce_sum([correct1, correct5, loss_sum, n, skipped], info)
    model.train(was_training)
    if n == 0:
        return {"top1": math.nan, "top5": math.nan, "loss": math.nan, "n": 0, "skipped": int(skipped)}
    return {"top1": 100 * correct1 / n, "top5": 100 * correct5 / n, "loss": loss_sum / n, "n": int(n), "skipped": int(skipped)}


# ---------------------------------------------------------------------- benchmarks
def detect_benchmark(root: str | Path) -> str:
    """Guess a benchmark from the folder name and layout (defaults to ``folder``)."""
    root = Path(root)
    name = root.name.lower().replace("_", "-")
    if name in ("imagenet-a", "imagenet-r", "imagenet-sketch", "imagenet-c"):
        return name
    if name in ("sketch",):
        return "imagenet-sketch"
    if "imagenetv2" in name or "imagenet-v2" in name:
        return "imagenet-v2"
    if root.is_dir():
        subs = {p.name for p in root.iterdir() if p.is_dir()}
        if subs and subs <= set(ALEXNET_ERRORS):
            return "imagenet-c"
    return "folder"


def _class_map(
    root: Path, benchmark: str, num_classes: int, classes: Sequence[str] | None
) -> tuple[dict[str, int] | None, list[int] | None]:
    """Folder name -> target index, and the model-output subset (None: all outputs)."""
    from ..data.classes import imagenet_wnids, robustness_subset_wnids

    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    wnids = imagenet_wnids()
    wnid_idx = {w: i for i, w in enumerate(wnids)}
    if benchmark == "imagenet-v2":
        bad = [f for f in folders if not f.isdigit() or int(f) >= num_classes]
        if bad:
            raise ValueError(
                f"{root}: ImageNet-V2 class folders are named by class index 0..{num_classes - 1}; found {', '.join(bad[:5])}"
            )
        return {f: int(f) for f in folders}, None
    wnid_folders = num_classes == 1000 and bool(folders) and all(f in wnid_idx for f in folders)
    if benchmark in ("imagenet-a", "imagenet-r", "imagenet-sketch", "imagenet-c") or (benchmark == "folder" and wnid_folders):
        if num_classes != 1000:
            raise ValueError(f"{benchmark} needs a 1000-class ImageNet model; this model has {num_classes} outputs")
        unknown = [f for f in folders if f not in wnid_idx]
        if unknown:
            raise ValueError(f"{root}: folders that are not ImageNet WordNet ids: {', '.join(unknown[:5])}")
        if benchmark in ("imagenet-a", "imagenet-r"):
            subset = robustness_subset_wnids(benchmark)
            if subset is None:
                subset = folders
                if len(subset) != 200:
                    warnings.warn(f"{benchmark}: {len(subset)} class folders (the full set has 200): logits restricted to "
                                  "those present", stacklevel=3)
            outside = [f for f in folders if f not in subset]
            if outside:
                raise ValueError(f"{root}: class folders outside the {benchmark} 200-class subset: {', '.join(outside[:5])}")
            pos = {w: i for i, w in enumerate(subset)}
            return {f: pos[f] for f in folders}, [wnid_idx[w] for w in subset]
        return {f: wnid_idx[f] for f in folders}, None
    # plain folder: names from the checkpoint's class list, else sorted order
    if classes:
        unknown = [f for f in folders if f not in classes]
        if unknown:
            known = ", ".join(list(classes)[:5])
            raise ValueError(f"{root}: class folders not among the model's classes ({known}, ...): {', '.join(unknown[:5])}")
        return {f: list(classes).index(f) for f in folders}, None
    if len(folders) > num_classes:
        raise ValueError(f"{root} has {len(folders)} class folders but the model has {num_classes} outputs")
    if len(folders) != num_classes:
        warnings.warn(f"{root}: {len(folders)} class folders for a {num_classes}-class model; folder i (sorted) = class i", stacklevel=3)
    return {f: i for i, f in enumerate(folders)}, None


def _loader(samples: list, transform: Any, batch_size: int, num_workers: int, strict: bool, info: DistInfo) -> Any:
    from torch.utils.data import DataLoader

    from ..data import ImageFileDataset, ShardSampler, collate_skip

    ds = ImageFileDataset(samples, transform, strict=strict)
    return DataLoader(
        ds, batch_size=batch_size, sampler=ShardSampler(len(ds), info.rank, info.world_size), num_workers=num_workers,
        collate_fn=collate_skip, generator=torch.Generator().manual_seed(0),
        pin_memory=info.device.type == "cuda",
    )


def run_benchmark(
    model: torch.nn.Module,
    root: str | Path,
    benchmark: str = "auto",
    transform: Any = None,
    batch_size: int = 64,
    num_workers: int = 4,
    device: torch.device | None = None,
    amp: str = "none",
    strict: bool = False,
    classes: Sequence[str] | None = None,
    info: DistInfo | None = None,
    progress: bool = False,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on one benchmark folder; returns its metrics (and the mCE for ImageNet-C)."""
    from ..data import DataError, scan_image_folder

    root = Path(root)
    if not root.exists():
        raise DataError(f"evaluation folder not found: {root}")
    if benchmark == "auto":
        benchmark = detect_benchmark(root)
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)} or auto")
    device = device or torch.device("cpu")
    info = info or DistInfo(device=device)
    num_classes = int(getattr(model, "num_classes", 0) or 1000)
    if benchmark == "folder" and (root / "val").is_dir():
        root = root / "val"

    def one(folder: Path, desc: str) -> dict[str, Any]:
        cmap, subset = _class_map(folder, benchmark, num_classes, classes)
        samples, _ = scan_image_folder(folder, class_to_idx=cmap, strict=strict, what=benchmark)
        loader = _loader(samples, transform, batch_size, num_workers, strict, info)
        r = evaluate(model, loader, device, amp, subset, info, progress, desc, channels_last)
        if r["skipped"]:
            warnings.warn(f"{folder}: {r['skipped']} unreadable image(s) skipped", stacklevel=2)
        return r

    if benchmark != "imagenet-c":
        out = one(root, benchmark)
        return {"benchmark": benchmark, "path": str(root), **out}

    corruptions = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not corruptions:
        raise DataError(f"{root}: no corruption folders; expected {root}/<corruption>/<severity 1-5>/<wnid>/<images>")
    unknown = [c for c in corruptions if c not in ALEXNET_ERRORS]
    if unknown:
        warnings.warn(f"imagenet-c: corruptions without an AlexNet reference are left out of the mCE: {', '.join(unknown)}", stacklevel=2)
    per: dict[str, Any] = {}
    ces = []
    total = {"n": 0, "skipped": 0}
    for c in corruptions:
        sev_dirs = sorted((p for p in (root / c).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        if not sev_dirs:
            raise DataError(f"{root / c}: no severity folders 1..5")
        errs = {}
        for s in sev_dirs:
            r = one(s, f"{c}/{s.name}")
            errs[s.name] = {"top1": r["top1"], "top5": r["top5"], "loss": r["loss"], "n": r["n"], "error": 100 - r["top1"]}
            total["n"] += r["n"]
            total["skipped"] += r["skipped"]
        mean_err = sum(v["error"] for v in errs.values()) / len(errs)
        entry: dict[str, Any] = {"severities": errs, "mean_error": mean_err, "complete": len(errs) == 5}
        if c in ALEXNET_ERRORS:
            entry["ce"] = mean_err / (100 * ALEXNET_ERRORS[c]) * 100
            ces.append(entry["ce"])
        per[c] = entry
    missing = sorted(set(ALEXNET_ERRORS) - set(corruptions))
    mce = sum(ces) / len(ces) if ces else math.nan
    return {
        "benchmark": "imagenet-c", "path": str(root), "mce": mce, "corruptions": per, "n": total["n"],
        "skipped": total["skipped"], "top1": 100 - sum(p["mean_error"] for p in per.values()) / len(per),
        "complete": not missing and all(p["complete"] for p in per.values()), "missing_corruptions": missing,
    }


def markdown_table(results: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """Results as a markdown table (plus a per-corruption table for ImageNet-C)."""
    lines = [f"## {title}", ""] if title else []
    lines += ["| benchmark | top-1 (%) | top-5 (%) | loss | mCE | images |", "|---|---:|---:|---:|---:|---:|"]

    def fmt(v: Any) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

    for r in results:
        lines.append(
            f"| {r['benchmark']} | {fmt(r.get('top1'))} | {fmt(r.get('top5'))} | {fmt(r.get('loss'))} | "
            f"{fmt(r.get('mce'))} | {r.get('n', 0)} |"
        )
    for r in results:
        if r["benchmark"] != "imagenet-c":
            continue
        sev = sorted({s for c in r["corruptions"].values() for s in c["severities"]}, key=int)
        lines += ["", "| corruption | " + " | ".join(f"err s{s}" for s in sev) + " | mean err | CE |",
                  "|---|" + "---:|" * (len(sev) + 2)]
        for name, c in r["corruptions"].items():
            cells = [fmt(c["severities"][s]["error"]) if s in c["severities"] else "-" for s in sev]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(c['mean_error'])} | {fmt(c.get('ce'))} |")
    return "\n".join(lines) + "\n"
