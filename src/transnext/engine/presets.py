"""The classification recipes as presets: a view of the recipe registry (:mod:`transnext.recipes`).

Each preset is a dict of :class:`~transnext.engine.config.TrainConfig` fields (the published
ImageNet-1K recipe of docs/model.md section 7, and the embedded-demo preset); anything in it can be
overridden by a config file or a flag. The records themselves, with their published figures, are
``transnext.recipes.RECIPES``.
"""

from __future__ import annotations

from typing import Any

from ..recipes import DEMO_ARCH, list_recipes, recipe_config

__all__ = ["DEMO_ARCH", "PRESETS", "get_preset", "list_presets", "preset_for_model"]

PRESETS: dict[str, dict[str, Any]] = {name: recipe_config(name) for name in list_recipes("classify")}


def list_presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> dict[str, Any]:
    key = name.lower().removeprefix("transnext_")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return dict(PRESETS[key])


def preset_for_model(model: str) -> str | None:
    """The training preset of a variant name (``transnext_small.in1k_384`` -> ``small_384``)."""
    variant, _, tag = model.lower().partition(".")
    key = variant.removeprefix("transnext_")
    if tag.endswith("384") or key.endswith("_384"):
        key = key.removesuffix("_384") + "_384"
    return key if key in PRESETS else None
