"""ImageNet-1K class names (shipped with the package) and the 200-class robustness subsets."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

__all__ = ["imagenet_class_names", "imagenet_wnids", "robustness_subset_wnids", "short_name"]


@lru_cache(maxsize=1)
def _rows() -> tuple[tuple[str, str], ...]:
    text = resources.files("transnext.data").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    rows = tuple(tuple(line.split("\t", 1)) for line in text.splitlines() if line.strip())
    if len(rows) != 1000:
        raise RuntimeError(f"imagenet_classes.txt is damaged: {len(rows)} rows instead of 1000")
    return rows  # type: ignore[return-value]


def imagenet_wnids() -> list[str]:
    """WordNet ids of the 1000 classes in index order (n01440764, ...)."""
    return [w for w, _ in _rows()]


def imagenet_class_names(full: bool = False) -> list[str]:
    """Readable class names in index order: the first lemma ("tench"), or all lemmas with ``full``."""
    return [names if full else short_name(names) for _, names in _rows()]


def short_name(names: str) -> str:
    return names.split(",", 1)[0].strip()


@lru_cache(maxsize=4)
def robustness_subset_wnids(benchmark: str) -> list[str] | None:
    """The 200 WordNet ids of ImageNet-A or ImageNet-R, in ImageNet index order.

    The lists come with timm (a dependency of the ``train`` extra). Returns None when timm does
    not have them; callers then use the class folders that are present.
    """
    fname = {"imagenet-a": "imagenet_a_synsets.txt", "imagenet-r": "imagenet_r_synsets.txt"}.get(benchmark)
    if fname is None:
        return None
    try:
        text = resources.files("timm.data").joinpath("_info", fname).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, OSError):
        return None
    wnids = [w.strip() for w in text.split() if w.strip()]
    order = {w: i for i, w in enumerate(imagenet_wnids())}
    return sorted((w for w in wnids if w in order), key=order.__getitem__)
