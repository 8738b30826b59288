"""Evaluation: top-1 / top-5 / loss on a data set, and the robustness benchmarks.

Benchmarks in their standard layouts:

* ``folder``: an ImageFolder tree (``<root>/<class>/<images>``; ``<root>/val`` is used when present).
  Folders named by ImageNet WordNet ids map to their ImageNet indices for 1000-class models.
* ``imagenet-a`` / ``imagenet-r``: ``<root>/<wnid>/...`` over a 200-class subset; predictions are
  taken over the logits of those 200 classes only.
* ``imagenet-sketch``: ``<root>/<wnid>/...`` (all 1000 classes).
* ``imagenet-v2``: ``<root>/<class index 0..999>/...`` (folders named by the integer index).
* ``imagenet-c``: ``<root>/<corruption>/<severity 1..5>/<wnid>/...``; per corruption and severity
  error, corruption error CE normalised by AlexNet's, and the mean (mCE); with the model's clean
  ImageNet error also the relative CE and relative mCE (degradation beyond the clean error,
  normalised by AlexNet's degradation). Its own protocol by default: the images are already
  224 x 224, so they are centre-cropped to 224 and not resized (:func:`benchmark_transform`).

``auto`` identifies the benchmark from the folder name, else from the layout
(:func:`identify_benchmark`): 1000 class-index folders ``0..999`` are ImageNet-V2, corruption /
severity / class trees ImageNet-C, WordNet-id folders equal to the ImageNet-A or ImageNet-R
200-class set those benchmarks. A layout that fits two benchmarks (a few class-index folders, or
WordNet ids inside a 200-class subset) is refused with a message naming ``--benchmark``, since
scoring it the wrong way gives a plausible but wrong figure.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .amp import autocast
from .distributed import DistInfo, reduce_sum

__all__ = [
    "ALEXNET_CLEAN_ERROR",
    "ALEXNET_ERRORS",
    "BENCHMARKS",
    "Detection",
    "add_relative_mce",
    "benchmark_transform",
    "detect_benchmark",
    "evaluate",
    "identify_benchmark",
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
# AlexNet's top-1 error on clean ImageNet val: the normaliser's offset in the relative CE.
ALEXNET_CLEAN_ERROR = 0.4348
# The four extra corruptions released with ImageNet-C (no AlexNet reference: outside the mCE).
IMAGENET_C_EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")


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
    from ..data.datasets import iter_batches

    for x, y, n_skip in iter_batches(loader):  # a worker's --strict-data error surfaces as the original one-line error
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
@dataclass(frozen=True)
class Detection:
    """Which benchmark a folder is, and why (printed by ``transnext eval``)."""

    benchmark: str
    reason: str


_NAMES = {"imagenet-a": "imagenet-a", "imagenet-r": "imagenet-r", "imagenet-sketch": "imagenet-sketch", "sketch": "imagenet-sketch",
          "imagenet-c": "imagenet-c"}


def _subdirs(path: Path) -> list[str]:
    try:
        return sorted(e.name for e in path.iterdir() if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []


def _is_severity(name: str) -> bool:
    return name.isdigit() and 1 <= int(name) <= 5


def identify_benchmark(root: str | Path, num_classes: int = 1000) -> Detection:
    """The benchmark of ``root`` from its name, else its layout; raises ValueError when ambiguous.

    ``num_classes``: outputs of the model to evaluate (ImageNet benchmarks need 1000).
    """
    from ..data.classes import imagenet_wnids, robustness_subset_wnids

    root = Path(root)
    name = root.name.lower().replace("_", "-")
    if name in _NAMES:
        return Detection(_NAMES[name], f"from the folder name {root.name!r}")
    if "imagenetv2" in name or "imagenet-v2" in name:
        return Detection("imagenet-v2", f"from the folder name {root.name!r}")
    subs = _subdirs(root)
    if not subs:
        return Detection("folder", "no sub-folders")
    hint = "pass --benchmark NAME (or NAME=PATH) to say which"
    # ImageNet-C: <corruption>/<severity 1..5>/<class>/...
    known_c = set(ALEXNET_ERRORS) | set(IMAGENET_C_EXTRA)
    sev = {s: _subdirs(root / s) for s in subs}
    if all(v and all(_is_severity(x) for x in v) for v in sev.values()):
        n_known = len(set(subs) & known_c)
        return Detection("imagenet-c", f"from the layout: {len(subs)} corruption folder(s) ({n_known} known ImageNet-C "
                                       "corruptions) of severity folders 1..5")
    wnid_set = set(imagenet_wnids())
    if all(_is_severity(s) for s in subs) and all(set(_subdirs(root / s)) and set(_subdirs(root / s)) <= wnid_set for s in subs):
        raise ValueError(f"{root} looks like one ImageNet-C corruption (<severity>/<wnid>/<images>); evaluate the folder "
                         f"above it, which holds all corruptions (imagenet-c=PATH), or {hint}")
    if num_classes != 1000:
        return Detection("folder", "class folders (the model does not have the 1000 ImageNet classes)")
    if all(s.isdigit() for s in subs):
        if set(subs) == {str(i) for i in range(1000)}:
            return Detection("imagenet-v2", "from the layout: 1000 class-index folders 0..999")
        raise ValueError(
            f"{root}: {len(subs)} folders named by numbers ({', '.join(subs[:4])}{', ...' if len(subs) > 4 else ''}) for a "
            "1000-class model: ImageNet-V2 (folder name = class index) with classes missing, or a plain folder (classes in "
            f"sorted name order) give different scores; {hint}: --benchmark imagenet-v2 or --benchmark folder"
        )
    if set(subs) <= wnid_set:
        if len(subs) == 1000:
            return Detection("folder", "from the layout: 1000 ImageNet WordNet-id folders (scored over all 1000 classes)")
        for bench in ("imagenet-a", "imagenet-r"):
            subset = robustness_subset_wnids(bench)
            if subset is not None and set(subs) == set(subset):
                return Detection(bench, f"from the layout: WordNet-id folders equal to the {bench} 200-class set")
        inside = [b for b in ("imagenet-a", "imagenet-r") if set(subs) <= set(robustness_subset_wnids(b) or ())]
        if inside:
            raise ValueError(
                f"{root}: all {len(subs)} WordNet-id folders belong to the 200-class set of {' and '.join(inside)}: that "
                "benchmark restricts the prediction to its 200 classes, a plain ImageNet folder does not, and the scores "
                f"differ; {hint}: " + " or ".join(f"--benchmark {b}" for b in (*inside, "folder"))
            )
        return Detection("folder", f"from the layout: {len(subs)} ImageNet WordNet-id folders (scored over all 1000 classes)")
    return Detection("folder", "class folders")


def detect_benchmark(root: str | Path, num_classes: int = 1000) -> str:
    """The benchmark name of :func:`identify_benchmark` (raises ValueError when ambiguous)."""
    return identify_benchmark(root, num_classes).benchmark


def benchmark_transform(benchmark: str, data_cfg: dict[str, Any], imagenet_c_protocol: str = "standard") -> tuple[Any, str]:
    """The evaluation transform of ``benchmark`` and a description of it.

    ImageNet-C keeps its own protocol unless ``imagenet_c_protocol="model"``: its images are
    already 224 x 224, so they are centre-cropped to 224 without resizing, as in the benchmark's
    reference evaluation. Every other benchmark uses the model's transform (``data_cfg``).
    """
    from ..data import build_eval_transform, eval_crop
    from ..data.transforms import imagenet_c_transform
    from ..preprocessing import IMAGENET_MEAN, IMAGENET_STD

    mean = tuple(data_cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(data_cfg.get("std") or IMAGENET_STD)
    if imagenet_c_protocol not in ("standard", "model"):
        raise ValueError(f"imagenet_c_protocol must be 'standard' or 'model', got {imagenet_c_protocol!r}")
    if benchmark == "imagenet-c" and imagenet_c_protocol == "standard":
        return imagenet_c_transform(mean, std), "ImageNet-C protocol: centre crop 224, no resize"
    size = int(data_cfg["img_size"])
    interpolation = data_cfg.get("interpolation") or "bicubic"
    pct, mode = eval_crop(size, data_cfg.get("crop_pct"))
    desc = (f"resize to {size}x{size} ({interpolation})" if mode == "squash" else
            f"resize short side to {math.floor(size / pct)} ({interpolation}), centre crop {size}")
    return build_eval_transform(size, data_cfg.get("crop_pct"), interpolation, mean, std), desc


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
    clean_top1: float | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on one benchmark folder; returns its metrics (and the mCE for ImageNet-C).

    ``benchmark="auto"`` identifies it (:func:`identify_benchmark`; the result's ``detection``
    says how). ``clean_top1``: the model's clean ImageNet top-1, for ImageNet-C's relative mCE.
    """
    from ..data import DataError, scan_image_folder

    root = Path(root)
    if not root.exists():
        raise DataError(f"evaluation folder not found: {root}")
    num_classes = int(getattr(model, "num_classes", 0) or 1000)
    detection = "given"
    if benchmark == "auto":
        found = identify_benchmark(root, num_classes)
        benchmark, detection = found.benchmark, found.reason
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)} or auto")
    device = device or torch.device("cpu")
    info = info or DistInfo(device=device)
    if benchmark == "folder" and (root / "val").is_dir():
        root = root / "val"

    def one(folder: Path, desc: str) -> dict[str, Any]:
        cmap, subset = _class_map(folder, benchmark, num_classes, classes)
        samples, _ = scan_image_folder(folder, class_to_idx=cmap, strict=strict,
                                       what="image" if benchmark == "folder" else benchmark)
        loader = _loader(samples, transform, batch_size, num_workers, strict, info)
        r = evaluate(model, loader, device, amp, subset, info, progress, desc, channels_last)
        if r["skipped"]:
            warnings.warn(f"{folder}: {r['skipped']} unreadable image(s) skipped", stacklevel=2)
        return r

    if benchmark != "imagenet-c":
        out = one(root, benchmark)
        folders = _subdirs(root)
        clean = benchmark == "folder" and num_classes == 1000 and len(folders) == 1000 and set(folders) <= set(_wnids())
        return {"benchmark": benchmark, "path": str(root), "detection": detection, "class_folders": len(folders),
                "imagenet_val": clean, **out}

    corruptions = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not corruptions:
        raise DataError(f"{root}: no corruption folders; expected {root}/<corruption>/<severity 1-5>/<wnid>/<images>")
    not_c = [c for c in corruptions if not any(_is_severity(x) for x in _subdirs(root / c))]
    if not_c and not any(c in ALEXNET_ERRORS for c in corruptions):
        raise DataError(f"{root}: not an ImageNet-C tree: expected {root}/<corruption>/<severity 1-5>/<wnid>/<images>, "
                        f"found {', '.join(not_c[:5])} without severity folders")
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
    result = {
        "benchmark": "imagenet-c", "path": str(root), "detection": detection, "mce": mce, "corruptions": per, "n": total["n"],
        "skipped": total["skipped"], "top1": 100 - sum(p["mean_error"] for p in per.values()) / len(per),
        "complete": not missing and all(p["complete"] for p in per.values() if "ce" in p), "missing_corruptions": missing,
        "incomplete_corruptions": sorted(c for c, p in per.items() if "ce" in p and not p["complete"]),
        "relative_mce": None, "clean_top1": None,
    }
    if clean_top1 is not None:
        add_relative_mce(result, clean_top1)
    return result


def _wnids() -> list[str]:
    from ..data.classes import imagenet_wnids

    return imagenet_wnids()


def add_relative_mce(result: dict[str, Any], clean_top1: float) -> dict[str, Any]:
    """Add relative CE per corruption and the relative mCE to an ImageNet-C result, in place.

    Relative CE of a corruption = (mean error - clean error) / (AlexNet's mean error - AlexNet's
    clean error), in %: how much the corruption degrades the model beyond its clean error,
    relative to how much it degrades AlexNet.
    """
    clean_err = 100 - clean_top1
    rel = []
    for name, entry in result["corruptions"].items():
        if name in ALEXNET_ERRORS:
            entry["relative_ce"] = (entry["mean_error"] - clean_err) / (100 * (ALEXNET_ERRORS[name] - ALEXNET_CLEAN_ERROR)) * 100
            rel.append(entry["relative_ce"])
    result["clean_top1"] = clean_top1
    result["relative_mce"] = sum(rel) / len(rel) if rel else math.nan
    return result


def markdown_table(results: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """Results as a markdown table (plus a per-corruption table for ImageNet-C).

    An mCE over fewer than the 15 corruptions x 5 severities is marked ``(incomplete)`` with a
    note saying what is missing: it is not comparable with published figures.
    """
    lines = [f"## {title}", ""] if title else []
    lines += ["| benchmark | top-1 (%) | top-5 (%) | loss | mCE | rel. mCE | images |", "|---|---:|---:|---:|---:|---:|---:|"]

    def fmt(v: Any) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

    notes = []
    for r in results:
        mce, rel = fmt(r.get("mce")), fmt(r.get("relative_mce"))
        if r["benchmark"] == "imagenet-c" and not r.get("complete", True):
            mce += " (incomplete)" if mce != "-" else ""
            rel += " (incomplete)" if rel != "-" else ""
            parts = []
            if r.get("missing_corruptions"):
                parts.append(f"{len(r['missing_corruptions'])} of 15 corruptions missing ({', '.join(r['missing_corruptions'])})")
            if r.get("incomplete_corruptions"):
                parts.append(f"fewer than 5 severities for {', '.join(r['incomplete_corruptions'])}")
            notes.append(f"imagenet-c ({r['path']}): incomplete mCE, not comparable with published figures: " + "; ".join(parts))
        if r["benchmark"] == "imagenet-c" and r.get("relative_mce") is None:
            notes.append("imagenet-c: relative mCE needs the clean ImageNet top-1 (evaluate the ImageNet val folder in the "
                         "same call, or pass --clean-top1)")
        lines.append(
            f"| {r['benchmark']} | {fmt(r.get('top1'))} | {fmt(r.get('top5'))} | {fmt(r.get('loss'))} | "
            f"{mce} | {rel} | {r.get('n', 0)} |"
        )
    if notes:
        lines += [""] + [f"Note: {n}" for n in notes]
    for r in results:
        if r["benchmark"] != "imagenet-c":
            continue
        sev = sorted({s for c in r["corruptions"].values() for s in c["severities"]}, key=int)
        lines += ["", "| corruption | " + " | ".join(f"err s{s}" for s in sev) + " | mean err | CE | rel. CE |",
                  "|---|" + "---:|" * (len(sev) + 3)]
        for name, c in r["corruptions"].items():
            cells = [fmt(c["severities"][s]["error"]) if s in c["severities"] else "-" for s in sev]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(c['mean_error'])} | {fmt(c.get('ce'))} | "
                         f"{fmt(c.get('relative_ce'))} |")
    return "\n".join(lines) + "\n"
