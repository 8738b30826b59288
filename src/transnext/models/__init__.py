"""TransNeXt architecture, variants and builders."""

from .registry import (
    DROP_PATH_RATES,
    VARIANTS,
    WEIGHTS,
    Weights,
    build_variant,
    create_model,
    get_weights,
    list_models,
    list_pretrained,
    variant_kwargs,
)
from .transnext import TransNeXt, param_groups_weight_decay

__all__ = [
    "DROP_PATH_RATES",
    "VARIANTS",
    "WEIGHTS",
    "TransNeXt",
    "Weights",
    "build_variant",
    "create_model",
    "get_weights",
    "list_models",
    "list_pretrained",
    "param_groups_weight_decay",
    "variant_kwargs",
]
