"""Parameter and multiply-add counts, measured with ``torch.utils.flop_counter`` on the meta device.

Convention (the one that reproduces the published GFLOPs, docs/model.md section 1): one multiply-add
counts once; matrix products and convolutions are counted (``FlopCounterMode`` reports two FLOPs
per multiply-add, halved here; ``scaled_dot_product_attention`` counts as its two products); the
local window attention is counted in its matrix-product (reference) form; the position-bias MLP
is evaluated as in every training forward pass, not served from the inference cache.
Element-wise work (softmax, GELU, LayerNorm, pooling) is not counted. Counting runs on a
meta-device copy, so it allocates no weights and takes seconds even for the largest variant.

The same counter measures any ``nn.Module`` (timm models, feature extractors) through
:func:`measure_factory`, so comparisons with other architectures use one convention.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Complexity", "count_params", "measure", "measure_factory"]


@dataclass(frozen=True)
class Complexity:
    """Measured size and cost of a model at one input size."""

    params: int
    macs: int
    input_size: tuple[int, int]
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gflops(self) -> float:
        """Multiply-adds in units of 1e9 (the 'GFLOPs' of the paper's tables)."""
        return self.macs / 1e9


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(
    model: nn.Module | str,
    input_size: int | tuple[int, int] | None = None,
    include_position_bias: bool = True,
    **create_kwargs,
) -> Complexity:
    """Parameters and multiply-adds of ``model`` (an instance or a model name) for one image.

    Args:
        model: a :class:`~transnext.models.TransNeXt` (left untouched; a meta copy is measured)
            or a name for :func:`transnext.create_model` (with ``create_kwargs``).
        input_size: (H, W) or a square size; default: the model's ``img_size``.
        include_position_bias: count the bias MLP (as in training and in the reference
            forward pass); ``False`` gives the cost of a cached-inference forward.
    """
    if isinstance(model, str):
        from ..models import create_model

        def build(device: str) -> nn.Module:
            if device == "meta":
                try:  # no weights at all where the constructor supports the meta device
                    with torch.device("meta"):
                        return create_model(model, **create_kwargs)
                except (NotImplementedError, RuntimeError):
                    pass
            return create_model(model, **create_kwargs).to(device)
    else:
        def build(device: str) -> nn.Module:
            clone = copy.deepcopy(model).to(device)
            for m in clone.modules():  # a fresh copy computes its tables (and the bias) again
                for cache in ("_bias_cache", "_cache"):
                    if isinstance(getattr(m, cache, None), dict):
                        getattr(m, cache).clear()
            return clone

    return measure_factory(build, input_size, include_position_bias)


def measure_factory(
    build: Callable[[str], nn.Module],
    input_size: int | tuple[int, int] | None = None,
    include_position_bias: bool = True,
) -> Complexity:
    """Parameters and multiply-adds of the model ``build(device)`` returns, for one image.

    ``build`` is called with ``"meta"`` first (no weights allocated); where a kernel has no meta
    implementation it is called again with ``"cpu"``. Any module works (its ``forward`` is what
    is counted, e.g. a timm ``features_only`` model counts the backbone alone);
    ``include_position_bias`` only matters for TransNeXt models.
    """
    try:
        return _measure(build("meta"), input_size, include_position_bias, "meta")
    except (NotImplementedError, RuntimeError):
        # Some kernels have no meta implementation: count with real (CPU) tensors instead.
        return _measure(build("cpu"), input_size, include_position_bias, "cpu")


def _measure(model: nn.Module, input_size, include_position_bias: bool, device: str) -> Complexity:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    for m in model.modules():  # the model itself or a wrapped one (a dense backbone)
        if hasattr(m, "set_attn_backend"):
            m.set_attn_backend("reference")  # the local window as matrix products
            break
    if input_size is None:
        if not hasattr(model, "img_size"):
            raise ValueError(f"{type(model).__name__} has no img_size: pass input_size=(H, W)")
        input_size = tuple(model.img_size)
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    x = torch.zeros(1, getattr(model, "in_chans", 3), *size, device=device)
    counter = FlopCounterMode(display=False)
    # The first pass of a fresh model evaluates the bias MLP (as every reference forward pass
    # does); later inference passes take it from the cache, so for the cached cost count the
    # second pass.
    with torch.no_grad():
        if not include_position_bias:
            model(x)
        with counter:
            model(x)
    by_op = {str(k).split(".")[1] if "." in str(k) else str(k): v // 2 for k, v in counter.get_flop_counts()["Global"].items()}
    return Complexity(count_params(model), counter.get_total_flops() // 2, size, by_op)
