"""The eager kernels as registered custom ops, for ``torch.compile``.

Traced into a graph, the model's ops would run their plain functional formulation (the one
export needs): whole logits even where the eager kernels go in blocks, unchunked Conv-GLU
buffers, a 1x1 convolution for the pooling branch. The compiler does not fuse its way back to
the eager kernels, so a compiled model ran slower than the eager one. Under ``torch.compile`` at
inference (no gradient wanted, no autocast) the ops are therefore these opaque custom ops, each
running exactly the eager no-grad code; the compiler keeps everything around them (projections,
norms, residuals) to itself. In training (no autocast) Conv-GLU runs its eager recomputing
autograd Function as ``conv_glu_train`` and its backward op, the attention
``transnext::blocked_aggregated_attention`` (the kernels of ``ops/blocked.py``). torch.export / ONNX never see
these ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import blocked, conv_glu, pooling, torch_backend
from ._common import (
    AA_DIFFERENTIABLE,
    AA_FLAT_FIELDS,
    AttentionInputs,
    Geometry,
    QueryScaling,
    WindowTerms,
    batch_chunks,
)
from .bias import SeparableBias

__all__ = ["aggregated_attention_inference", "aggregated_attention_training", "conv_glu_inference", "conv_glu_train",
           "sr_gelu_pool_inference"]

# ------------------------------------------------------------------------------ aggregated attention
# The flat schema of the attention ops, the one place it is spelled out: the tensors of AA_FLAT_FIELDS, the
# grid and window, and what the eager code inside needs (the kernel dispatch chose, its budgets).
_AA_ARGS = ", ".join(f"Tensor {name}" for name in AA_FLAT_FIELDS) + (
    ", SymInt height, SymInt width, SymInt window, str kernel, SymInt block_elements, SymInt chunk_tokens")
_AA_FORWARD_SCHEMA = f"({_AA_ARGS}) -> Tensor"
_AA_BACKWARD_SCHEMA = f"(Tensor grad_out, {_AA_ARGS}) -> Tensor[]"
_EAGER_KERNELS = ("whole", "blocked_torch", "blocked_native")


def _split(args: tuple) -> tuple[blocked.FlatArgs, Geometry, str, int, int]:
    n = len(AA_FLAT_FIELDS)
    height, width, window, kernel, block_elements, chunk_tokens = args[n:]
    if kernel not in _EAGER_KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {', '.join(_EAGER_KERNELS)}")
    return blocked.FlatArgs(*args[:n]), Geometry((height, width), window), kernel, block_elements, chunk_tokens


def _run_eager(a: blocked.FlatArgs, geometry: Geometry, kernel: str, block_elements: int) -> Tensor:
    """One eager no-grad kernel call on the flat tensors (``mult`` is the temperature's softplus)."""
    if kernel == "whole":  # the bias is the from_dense form of a whole tensor: its view back
        h, (H, W) = a.bias_table.shape[1], geometry.size
        bias = a.bias_table.transpose(0, 1).reshape(h, H * W, -1)
        return torch_backend._AggregatedAttention.apply(
            a.q, a.k, a.v, a.k_pool, a.v_pool, a.query_embedding, a.mult, a.length_scale, a.local_bias, bias,
            a.learnable_tokens, a.learnable_bias, a.padding_mask, tuple(geometry.size), geometry.window, 0.0)
    return blocked.forward_flat(a, geometry, kernel == "blocked_native", block_elements)[0]


def _attention_inference(*args) -> Tensor:
    a, geometry, kernel, block_elements, chunk_tokens = _split(args)
    B, N = a.q.shape[0], a.q.shape[2]
    with torch.no_grad():
        out = a.q.new_empty(a.q.shape)
        for b0, b1 in batch_chunks(B, N, chunk_tokens):  # groups of images, as the eager layer runs them
            part = blocked.FlatArgs(*(t[b0:b1] for t in a[:5]), *a[5:])
            out[b0:b1] = _run_eager(part, geometry, kernel, block_elements)
    return out


def _attention_training(*args) -> Tensor:
    a, geometry, kernel, block_elements, _ = _split(args)
    if kernel == "whole":
        raise ValueError("the training custom op runs the blocked kernels only")
    return blocked.forward_flat(a, geometry, kernel == "blocked_native", block_elements)[0]


def _attention_backward(grad_out: Tensor, *args) -> list[Tensor]:
    a, geometry, kernel, block_elements, _ = _split(args)
    needs = blocked.FlatArgs(*(name in AA_DIFFERENTIABLE for name in AA_FLAT_FIELDS))
    grads = blocked.backward_flat(grad_out, a, geometry, needs, kernel == "blocked_native", block_elements)
    return [getattr(grads, name).contiguous() for name in AA_DIFFERENTIABLE]


def _attention_fake(*args) -> Tensor:
    return args[0].new_empty(args[0].shape)  # contiguous, as the real ops return


def _attention_backward_fake(grad_out: Tensor, *args) -> list[Tensor]:
    a = blocked.FlatArgs(*args[: len(AA_FLAT_FIELDS)])
    return [getattr(a, name).new_empty(getattr(a, name).shape) for name in AA_DIFFERENTIABLE]


_attention_op = torch.library.custom_op("transnext::aggregated_attention_inference", _attention_inference,
                                        mutates_args=(), schema=_AA_FORWARD_SCHEMA)
_attention_op.register_fake(_attention_fake)
_blocked_op = torch.library.custom_op("transnext::blocked_aggregated_attention", _attention_training,
                                      mutates_args=(), schema=_AA_FORWARD_SCHEMA)
_blocked_op.register_fake(_attention_fake)
_blocked_backward_op = torch.library.custom_op("transnext::blocked_aggregated_attention_backward", _attention_backward,
                                               mutates_args=(), schema=_AA_BACKWARD_SCHEMA)
_blocked_backward_op.register_fake(_attention_backward_fake)


def _blocked_setup(ctx, inputs, output) -> None:
    n = len(AA_FLAT_FIELDS)
    ctx.save_for_backward(*inputs[:n])
    ctx.config = inputs[n:]


def _blocked_autograd(ctx, grad_out):
    grads = dict(zip(AA_DIFFERENTIABLE, _blocked_backward_op(grad_out, *ctx.saved_tensors, *ctx.config)))
    wanted = dict(zip(AA_FLAT_FIELDS, ctx.needs_input_grad))
    return tuple(grads[name] if name in grads and wanted[name] else None for name in AA_FLAT_FIELDS) + (None,) * 6


_blocked_op.register_autograd(_blocked_autograd, setup_context=_blocked_setup)


def _flat_call(op, inputs: AttentionInputs, scaling: QueryScaling, terms: WindowTerms, bias: SeparableBias | Tensor,
               geometry: Geometry, kernel: str, block_elements: int, chunk_tokens: int) -> Tensor:
    if isinstance(bias, Tensor):
        bias = SeparableBias.from_dense(bias, geometry.size)
    flat = blocked.flat_args(inputs, scaling, terms, bias)
    return op(*flat, int(geometry.size[0]), int(geometry.size[1]), int(geometry.window), kernel, block_elements,
              chunk_tokens)


def aggregated_attention_inference(inputs: AttentionInputs, scaling: QueryScaling, terms: WindowTerms,
                                   bias: SeparableBias | Tensor, geometry: Geometry, *, kernel: str,
                                   block_elements: int, chunk_tokens: int) -> Tensor:
    """The eager no-grad ``kernel`` (whole / blocked_torch / blocked_native), run in groups of images of
    at least ``chunk_tokens`` tokens, as one opaque op (torch.compile at inference)."""
    return _flat_call(_attention_op, inputs, scaling, terms, bias, geometry, kernel, block_elements, chunk_tokens)


def aggregated_attention_training(inputs: AttentionInputs, scaling: QueryScaling, terms: WindowTerms,
                                  bias: SeparableBias | Tensor, geometry: Geometry, *, kernel: str,
                                  block_elements: int) -> Tensor:
    """The blocked ``kernel`` (blocked_torch / blocked_native) and its backward as registered custom ops
    (torch.compile with autograd or autocast)."""
    return _flat_call(_blocked_op, inputs, scaling, terms, bias, geometry, kernel, block_elements, 0)


# ------------------------------------------------------------------------------ Conv-GLU
@torch.library.custom_op("transnext::conv_glu_inference", mutates_args=())
def _conv_glu_op(
    x: Tensor, w1: Tensor, b1: Tensor | None, wd: Tensor, bd: Tensor | None, w2: Tensor, b2: Tensor | None,
    height: int, width: int,
) -> Tensor:
    with torch.no_grad():
        return conv_glu._inference(x, w1, b1, wd, bd, w2, b2, (height, width)).contiguous()


@_conv_glu_op.register_fake
def _(x, w1, b1, wd, bd, w2, b2, height, width):
    return x.new_empty(x.shape[:-1] + (w2.shape[0],))


def conv_glu_inference(x, w1, b1, wd, bd, w2, b2, size) -> Tensor:
    """The eager no-grad Conv-GLU as one opaque op."""
    return _conv_glu_op(x, w1, b1, wd, bd, w2, b2, int(size[0]), int(size[1]))


# ------------------------------------------------------------------------------ pooling branch
@torch.library.custom_op("transnext::sr_gelu_pool_inference", mutates_args=())
def _pool_op(x: Tensor, weight: Tensor, bias: Tensor | None, height: int, width: int, pool_h: int, pool_w: int) -> Tensor:
    with torch.no_grad():
        return pooling._inference(x, weight, bias, (height, width), (pool_h, pool_w)).contiguous()


@_pool_op.register_fake
def _(x, weight, bias, height, width, pool_h, pool_w):
    return x.new_empty((x.shape[0], pool_h * pool_w, weight.shape[0]))


def sr_gelu_pool_inference(x, weight, bias, size, pool) -> Tensor:
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
    ctx = _Ctx()
    with torch.no_grad():
        out = conv_glu._ConvGLU.forward(ctx, x, w1, b1, wd, bd, w2, b2, (height, width))
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
    ctx = _Ctx()
    ctx.saved_tensors = (x, gate, value, w1, wd, bd, w2)
    ctx.size = (height, width)
    ctx.needs_input_grad = (True,) * 7 + (False,)
    ctx.has_bias = (True, bd is not None, True)
    with torch.no_grad():
        d = conv_glu._ConvGLU.backward(ctx, grad.contiguous())
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
