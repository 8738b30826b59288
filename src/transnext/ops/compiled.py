"""The eager kernels as registered custom ops, for ``torch.compile``.

Traced into a graph, the model's ops would run their plain functional formulation (the one
export needs): whole logits even where the eager kernels go in blocks, unchunked Conv-GLU
buffers, a 1x1 convolution for the pooling branch. The compiler does not fuse its way back to
the eager kernels, so a compiled model ran slower than the eager one. Under ``torch.compile`` at
inference (no gradient wanted, no autocast) the ops are therefore these opaque custom ops, each
running exactly the eager no-grad code; the compiler keeps everything around them (projections,
norms, residuals) to itself. In training (no autocast) Conv-GLU runs its eager recomputing
autograd Function as ``conv_glu_train`` and its backward op, the attention
``transnext::blocked_aggregated_attention`` (``ops/blocked.py``). torch.export / ONNX never see
these ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import autocast_dtype, inference_chunks, is_exporting, needs_grad
from .bias import SeparableBias

__all__ = ["capture_mode", "aggregated_attention", "conv_glu", "conv_glu_train", "sr_gelu_pool"]


def capture_mode(x: Tensor, *tensors: Tensor | None) -> str | None:
    """``"inference"`` or ``"training"`` while ``torch.compile`` traces a forward without autocast
    (by whether any of ``x, *tensors`` needs a gradient); None otherwise (eager, export, autocast)."""
    if not torch.compiler.is_compiling() or is_exporting() or autocast_dtype(x) is not None:
        return None
    return "training" if needs_grad(x, *tensors) else "inference"


# ------------------------------------------------------------------------------ aggregated attention
@torch.library.custom_op("transnext::aggregated_attention_inference", mutates_args=())
def _attention_op(
    q: Tensor, k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor, query_embedding: Tensor, temperature: Tensor,
    length_scale: Tensor, local_bias: Tensor, bias_table: Tensor, bias_y_index: Tensor, bias_y_weight: Tensor,
    dense_bias: bool, learnable_tokens: Tensor, learnable_bias: Tensor, padding_mask: Tensor, height: int,
    width: int, window: int,
) -> Tensor:
    from .torch_backend import aggregated_attention as eager  # imported here: torch_backend imports this module

    bias = bias_table if dense_bias else SeparableBias(bias_table, bias_y_index, bias_y_weight)
    size = (height, width)
    with torch.no_grad():
        chunks = inference_chunks(q.transpose(1, 2).flatten(2), size) or [(0, q.shape[0], 0, height)]
        out = q.new_empty(q.shape)
        for b0, b1, _, _ in chunks:  # groups of images, as the eager layer runs them
            out[b0:b1] = eager(
                q[b0:b1], k[b0:b1], v[b0:b1], k_pool[b0:b1], v_pool[b0:b1], query_embedding, temperature,
                length_scale, local_bias, bias, learnable_tokens, learnable_bias, padding_mask, size, window,
            )
    return out


@_attention_op.register_fake
def _(q, k, v, k_pool, v_pool, query_embedding, temperature, length_scale, local_bias, bias_table, bias_y_index,
      bias_y_weight, dense_bias, learnable_tokens, learnable_bias, padding_mask, height, width, window):
    return q.new_empty(q.shape)


def aggregated_attention(
    q: Tensor, k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor, query_embedding: Tensor, temperature: Tensor,
    length_scale: Tensor, local_bias: Tensor, pool_bias, learnable_tokens: Tensor, learnable_bias: Tensor,
    padding_mask: Tensor, size: tuple[int, int], window: int,
) -> Tensor:
    """The eager ``torch``-backend Aggregated Attention (no grad) as one opaque op."""
    dense = isinstance(pool_bias, Tensor)
    table = pool_bias if dense else pool_bias.table
    y_index = padding_mask.new_zeros((1,), dtype=torch.long) if dense else pool_bias.y_index
    y_weight = q.new_ones((1,)) if dense else pool_bias.y_weight
    return _attention_op(
        q, k, v, k_pool, v_pool, query_embedding, temperature, length_scale, local_bias, table, y_index, y_weight,
        dense, learnable_tokens, learnable_bias, padding_mask, int(size[0]), int(size[1]), window,
    )


# ------------------------------------------------------------------------------ Conv-GLU
@torch.library.custom_op("transnext::conv_glu_inference", mutates_args=())
def _conv_glu_op(
    x: Tensor, w1: Tensor, b1: Tensor | None, wd: Tensor, bd: Tensor | None, w2: Tensor, b2: Tensor | None,
    height: int, width: int,
) -> Tensor:
    from .conv_glu import _inference

    with torch.no_grad():
        return _inference(x, w1, b1, wd, bd, w2, b2, (height, width)).contiguous()


@_conv_glu_op.register_fake
def _(x, w1, b1, wd, bd, w2, b2, height, width):
    return x.new_empty(x.shape[:-1] + (w2.shape[0],))


def conv_glu(x, w1, b1, wd, bd, w2, b2, size) -> Tensor:
    """The eager no-grad Conv-GLU as one opaque op."""
    return _conv_glu_op(x, w1, b1, wd, bd, w2, b2, int(size[0]), int(size[1]))


# ------------------------------------------------------------------------------ pooling branch
@torch.library.custom_op("transnext::sr_gelu_pool_inference", mutates_args=())
def _pool_op(x: Tensor, weight: Tensor, bias: Tensor | None, height: int, width: int, pool_h: int, pool_w: int) -> Tensor:
    from .pooling import _inference

    with torch.no_grad():
        return _inference(x, weight, bias, (height, width), (pool_h, pool_w)).contiguous()


@_pool_op.register_fake
def _(x, weight, bias, height, width, pool_h, pool_w):
    return x.new_empty((x.shape[0], pool_h * pool_w, weight.shape[0]))


def sr_gelu_pool(x, weight, bias, size, pool) -> Tensor:
    """The eager no-grad pooling branch (1x1 conv as a matmul, GELU, adaptive pooling) as one opaque op."""
    return _pool_op(x, weight, bias, int(size[0]), int(size[1]), int(pool[0]), int(pool[1]))


# ------------------------------------------------------------------------------ Conv-GLU, training
# The eager autograd Function's forward and backward as two custom ops: the compiler's own
# backward of the depthwise conv (its layouts) ran several times slower than the eager one.
class _Ctx:
    """Stand-in for an autograd context, to run ``_ConvGLU``'s forward / backward inside an op."""

    def save_for_backward(self, *tensors: Tensor) -> None:
        self.saved_tensors = tensors


@torch.library.custom_op("transnext::conv_glu_train", mutates_args=())
def _conv_glu_train_op(
    x: Tensor, w1: Tensor, b1: Tensor | None, wd: Tensor, bd: Tensor | None, w2: Tensor, b2: Tensor | None,
    height: int, width: int,
) -> tuple[Tensor, Tensor, Tensor]:
    from .conv_glu import _ConvGLU

    ctx = _Ctx()
    with torch.no_grad():
        out = _ConvGLU.forward(ctx, x, w1, b1, wd, bd, w2, b2, (height, width))
    _, gate, value = ctx.saved_tensors[:3]
    return out, gate, value


@_conv_glu_train_op.register_fake
def _(x, w1, b1, wd, bd, w2, b2, height, width):
    hid = w2.shape[1]
    return x.new_empty(x.shape[:-1] + (w2.shape[0],)), x.new_empty(x.shape[:-1] + (hid,)), x.new_empty(x.shape[:-1] + (hid,))


@torch.library.custom_op("transnext::conv_glu_train_backward", mutates_args=())
def _conv_glu_backward_op(
    grad: Tensor, x: Tensor, gate: Tensor, value: Tensor, w1: Tensor, wd: Tensor, bd: Tensor | None, w2: Tensor,
    height: int, width: int,
) -> list[Tensor]:
    from .conv_glu import _ConvGLU

    ctx = _Ctx()
    ctx.saved_tensors = (x, gate, value, w1, wd, bd, w2)
    ctx.size = (height, width)
    ctx.needs_input_grad = (True,) * 7 + (False,)
    ctx.has_bias = (True, bd is not None, True)
    with torch.no_grad():
        d = _ConvGLU.backward(ctx, grad.contiguous())
    d_bd = d[4] if d[4] is not None else x.new_zeros((0,))
    return [d[0], d[1], d[2], d[3], d_bd, d[5], d[6]]


@_conv_glu_backward_op.register_fake
def _(grad, x, gate, value, w1, wd, bd, w2, height, width):
    hid = w2.shape[1]
    return [x.new_empty(x.shape), w1.new_empty(w1.shape), w1.new_empty((2 * hid,)), wd.new_empty(wd.shape),
            wd.new_empty((hid,) if bd is not None else (0,)), w2.new_empty(w2.shape), w2.new_empty((w2.shape[0],))]


def _conv_glu_setup(ctx, inputs, output) -> None:
    x, w1, b1, wd, bd, w2, b2, height, width = inputs
    _, gate, value = output
    ctx.save_for_backward(x, gate, value, w1, wd, bd, w2)
    ctx.size = (height, width)
    ctx.has_bias = (b1 is not None, bd is not None, b2 is not None)


def _conv_glu_autograd(ctx, grad_out, _grad_gate, _grad_value):
    x, gate, value, w1, wd, bd, w2 = ctx.saved_tensors
    d = _conv_glu_backward_op(grad_out, x, gate, value, w1, wd, bd, w2, *ctx.size)
    has_b1, has_bd, has_b2 = ctx.has_bias
    return (d[0], d[1], d[2] if has_b1 else None, d[3], d[4] if has_bd else None, d[5], d[6] if has_b2 else None,
            None, None)


_conv_glu_train_op.register_autograd(_conv_glu_autograd, setup_context=_conv_glu_setup)


def conv_glu_train(x, w1, b1, wd, bd, w2, b2, size) -> Tensor:
    """The eager Conv-GLU autograd Function (recomputing backward) as custom ops.

    Needs the fc1 and fc2 biases (every TransNeXt has them; the backward op returns their
    gradients unconditionally); ``ops.conv_glu`` checks before calling."""
    return _conv_glu_train_op(x, w1, b1, wd, bd, w2, b2, int(size[0]), int(size[1]))[0]
