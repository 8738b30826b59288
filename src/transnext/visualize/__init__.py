"""See what the model sees: effective receptive fields, aggregated-attention maps, class activation maps.

The computations need torch only; drawing figures needs the optional ``visualize`` extra
(matplotlib), and class activation maps the ``grad-cam`` package of the same extra.
"""

from ._common import ImageBatch, LoadedModel, load_images, load_model
from .attention import AttentionMaps, attention_layer, attention_maps, query_grid
from .cam import CAM_METHODS, CamResult, class_activation_maps, token_reshape
from .erf import AREA_THRESHOLDS, ErfResult, area_ratio, effective_receptive_field, input_gradient_map
from .plot import plot_attention, plot_cam, plot_erf

__all__ = [
    "AREA_THRESHOLDS",
    "AttentionMaps",
    "CAM_METHODS",
    "CamResult",
    "ErfResult",
    "ImageBatch",
    "LoadedModel",
    "area_ratio",
    "attention_layer",
    "attention_maps",
    "class_activation_maps",
    "effective_receptive_field",
    "input_gradient_map",
    "load_images",
    "load_model",
    "plot_attention",
    "plot_cam",
    "plot_erf",
    "query_grid",
    "token_reshape",
]
