"""torch.fx symbolic tracing: the modules the tracer must keep whole (leaf modules).

FX traces with proxies instead of tensors, so Python control flow on sizes or on the geometry
tables breaks it. The attention mixers and Conv-GLU decide their kernels from the input size, the
backend and the geometry of their stage, so they are traced as single calls, the way timm models
declare such modules with ``register_notrace_module``::

    from torchvision.models.feature_extraction import create_feature_extractor
    from transnext.integrations.fx import fx_tracer_kwargs

    create_feature_extractor(model, return_nodes=[...], tracer_kwargs=fx_tracer_kwargs())

With timm installed, ``import transnext`` registers the same modules with timm, so timm's
``create_feature_extractor`` and ``features_only=True, feature_cls="fx"`` use them too.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from torch import nn

from ..models.geometry import GeometryTables
from ..models.transnext import AggregatedAttention, ConvGLU, FullAttention

__all__ = ["FX_LEAF_MODULES", "fx_tracer_kwargs", "register_with_timm"]

# GeometryTables looks up the size-dependent tables of a stage: sizes are known only when the graph runs.
FX_LEAF_MODULES: tuple[type[nn.Module], ...] = (AggregatedAttention, FullAttention, ConvGLU, GeometryTables)


def fx_tracer_kwargs() -> dict[str, Any]:
    """``tracer_kwargs`` for torchvision's ``create_feature_extractor`` / ``get_graph_node_names``."""
    return dict(leaf_modules=list(FX_LEAF_MODULES))


def register_with_timm() -> None:
    """Declare the leaf modules to timm's FX helpers (a no-op without timm)."""
    if importlib.util.find_spec("timm") is None:
        return
    from timm.layers import register_notrace_module

    for module in FX_LEAF_MODULES:
        register_notrace_module(module)
