"""Pooled-key branch of Aggregated Attention: ``AdaptiveAvgPool(GELU(sr(x)))`` as one op.

Plain autograd keeps two full-resolution tensors per block for this branch (the 1x1 conv output
for GELU and the GELU output for the pooling, which saves its input only for its shape). The op
below keeps nothing beyond ``x`` (which the q/kv projections keep anyway) and recomputes the 1x1
conv in backward: one C x C matmul per token, a small price for two activations per block.
The 1x1 conv runs as a matmul on the (B, N, C) tokens, which are a channels-last map. Which
formulation runs is decided by :mod:`transnext.ops.dispatch`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import autocast_dtype, autocast_off, map_to_tokens, tokens_to_map

__all__ = ["inference", "plain", "recompute"]


class _SrGeluPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, size, pool):
        low = autocast_dtype(x)
        with autocast_off(x.device.type):
            if low is not None:
                x, weight = x.to(low), weight.to(low)
                bias = None if bias is None else bias.to(low)
            w = weight.reshape(weight.shape[0], -1)
            y = F.gelu(F.linear(x, w, bias))
            out = map_to_tokens(F.adaptive_avg_pool2d(tokens_to_map(y, size), pool))
        ctx.save_for_backward(x, w, bias)
        ctx.size, ctx.pool = size, pool
        ctx.weight_shape = weight.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w, bias = ctx.saved_tensors
        size = ctx.size
        with autocast_off(x.device.type):
            grad = grad.to(x.dtype)
            y = F.linear(x, w, bias)  # recomputed 1x1 conv
            g_map = tokens_to_map(grad, ctx.pool)
            d_act = torch.ops.aten._adaptive_avg_pool2d_backward(g_map, tokens_to_map(y, size))
            d_y = torch.ops.aten.gelu_backward(map_to_tokens(d_act), y)
            del d_act, y
            d2 = d_y.reshape(-1, d_y.shape[-1])
            needs = ctx.needs_input_grad
            d_x = (d2 @ w).view(x.shape) if needs[0] else None
            d_w = (d2.t() @ x.reshape(-1, x.shape[-1])).view(ctx.weight_shape) if needs[1] else None
            d_b = d2.sum(0) if needs[2] and bias is not None else None
        return d_x, d_w, d_b, None, None


def plain(x: Tensor, weight: Tensor, bias: Tensor | None, size: tuple[int, int], pool: tuple[int, int]) -> Tensor:
    """The reference formulation: a 1x1 convolution on the map, GELU, adaptive pooling."""
    y = F.gelu(F.conv2d(tokens_to_map(x, size), weight, bias))
    return map_to_tokens(F.adaptive_avg_pool2d(y, pool))


def recompute(x: Tensor, weight: Tensor, bias: Tensor | None, size: tuple[int, int], pool: tuple[int, int]) -> Tensor:
    """With autograd: keeps nothing beyond x; the 1x1 conv is recomputed in backward."""
    return _SrGeluPool.apply(x, weight, bias, size, pool)


def inference(x: Tensor, weight: Tensor, bias: Tensor | None, size: tuple[int, int], pool: tuple[int, int]) -> Tensor:
    """Without autograd, and for graph capture: the 1x1 conv as a product on the tokens."""
    return _inference(x, weight, bias, size, pool)


def _inference(x: Tensor, weight: Tensor, bias: Tensor | None, size: tuple[int, int], pool: tuple[int, int]) -> Tensor:
    """No-grad path: the 1x1 conv as one matmul on the tokens, GELU, adaptive pooling."""
    y = F.linear(x, weight.reshape(weight.shape[0], -1), bias)
    y = F.gelu(y)
    return map_to_tokens(F.adaptive_avg_pool2d(tokens_to_map(y, size), pool))
