"""Convolutional GLU (docs/model.md section 2) as one op that keeps little for backward.

``fc2(GELU(dwconv(gate)) * value)`` with ``[gate | value] = fc1(x)``. Plain autograd keeps five
hidden-sized tensors per block (the gate in conv layout, the conv output, the GELU output, the
product and the fc1 output). Here backward needs only ``x``, the gate and the value: the 3x3
depthwise conv, GELU and product are cheap and are recomputed. The gate and the value come from
two matmuls on row slices of ``fc1.weight``, so both are dense and the gate is already a
channels-last (B, hidden, H, W) map for the depthwise conv: no layout copies. Which formulation
runs is decided by :mod:`transnext.ops.dispatch`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import autocast_dtype, autocast_off, batch_chunks, current_policy, inference_chunks, map_to_tokens, tokens_to_map

__all__ = ["plain", "recompute", "traceable", "inference"]


def _dwconv(gate: Tensor, weight: Tensor, bias: Tensor | None, size: tuple[int, int]) -> Tensor:
    pad = weight.shape[-1] // 2
    return F.conv2d(tokens_to_map(gate, size), weight, bias, padding=pad, groups=weight.shape[0])


def _cast(dtype: torch.dtype | None, *ts: Tensor | None) -> list[Tensor | None]:
    if dtype is None:
        return list(ts)
    return [None if t is None else t.to(dtype) for t in ts]


def _batch_chunks(B: int, N: int) -> list[tuple[int, int]]:
    """Groups of images with at least ``KernelPolicy.min_chunk_tokens`` tokens (and two images, see _common)."""
    return batch_chunks(B, N, current_policy().min_chunk_tokens)


class _ConvGLU(torch.autograd.Function):
    """Saves x, gate and value; the conv, GELU, product (and their gradients) run per batch chunk."""

    @staticmethod
    def forward(ctx, x, w1, b1, wd, bd, w2, b2, size):
        hid = w2.shape[1]
        low = autocast_dtype(x)
        with autocast_off(x.device.type):
            x, w1, b1, wd, bd, w2, b2 = _cast(low, x, w1, b1, wd, bd, w2, b2)
            gate = F.linear(x, w1[:hid], None if b1 is None else b1[:hid])
            value = F.linear(x, w1[hid:], None if b1 is None else b1[hid:])
            out = torch.empty(x.shape[:-1] + (w2.shape[0],), dtype=x.dtype, device=x.device)
            for b0, b1_ in _batch_chunks(x.shape[0], x.shape[1]):
                hidden = map_to_tokens(_dwconv(gate[b0:b1_], wd, bd, size))
                hidden = torch.ops.aten.gelu_(hidden) if hidden.is_contiguous() else F.gelu(hidden)
                hidden.mul_(value[b0:b1_])
                out[b0:b1_] = F.linear(hidden, w2, b2)
        ctx.save_for_backward(x, gate, value, w1, wd, bd, w2)
        ctx.size = size
        ctx.has_bias = (b1 is not None, bd is not None, b2 is not None)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, gate, value, w1, wd, bd, w2 = ctx.saved_tensors
        size = ctx.size
        hid, C, c_out = w2.shape[1], x.shape[-1], w2.shape[0]
        needs = ctx.needs_input_grad
        need_gate = needs[0] or needs[1] or needs[2]
        with autocast_off(x.device.type):
            grad = grad.to(x.dtype)
            d_x = torch.empty_like(x) if needs[0] else None
            d_w1 = torch.zeros_like(w1) if needs[1] else None
            d_b1 = x.new_zeros(2 * hid) if needs[2] and ctx.has_bias[0] else None
            d_wd = torch.zeros_like(wd) if needs[3] else None
            d_bd = x.new_zeros(hid) if needs[4] and bd is not None else None
            d_w2 = torch.zeros_like(w2) if needs[5] else None
            d_b2 = x.new_zeros(c_out) if needs[6] and ctx.has_bias[2] else None
            for b0, b1_ in _batch_chunks(x.shape[0], x.shape[1]):
                gs, vs, gr = gate[b0:b1_], value[b0:b1_], grad[b0:b1_]
                conv_t = map_to_tokens(_dwconv(gs, wd, bd, size))  # recomputed
                act = F.gelu(conv_t)
                g2 = gr.reshape(-1, c_out)
                if d_w2 is not None:
                    d_w2.addmm_(g2.t(), (act * vs).reshape(-1, hid))
                if d_b2 is not None:
                    d_b2 += g2.sum(0)
                d_hidden = gr @ w2  # (b, N, hid)
                d_value = d_hidden * act
                del act
                d_conv_t = torch.ops.aten.gelu_backward(d_hidden.mul_(vs), conv_t)
                del d_hidden, conv_t
                d_gate_map, dwd, dbd = torch.ops.aten.convolution_backward(
                    tokens_to_map(d_conv_t.contiguous(), size), tokens_to_map(gs, size), wd, [hid] if bd is not None else None,
                    [1, 1], [wd.shape[-1] // 2] * 2, [1, 1], False, [0, 0], hid,
                    [need_gate, d_wd is not None, d_bd is not None],
                )
                del d_conv_t
                if d_wd is not None:
                    d_wd += dwd
                if d_bd is not None:
                    d_bd += dbd
                if not need_gate:
                    continue
                d_gate = map_to_tokens(d_gate_map).reshape(-1, hid)
                d_val = d_value.reshape(-1, hid)
                if d_x is not None:
                    torch.mm(d_gate, w1[:hid], out=d_x[b0:b1_].view(-1, C)).addmm_(d_val, w1[hid:])
                if d_w1 is not None:
                    x2 = x[b0:b1_].reshape(-1, C)
                    d_w1[:hid].addmm_(d_gate.t(), x2)
                    d_w1[hid:].addmm_(d_val.t(), x2)
                if d_b1 is not None:
                    d_b1[:hid] += d_gate.sum(0)
                    d_b1[hid:] += d_val.sum(0)
        return d_x, d_w1, d_b1, d_wd, d_bd, d_w2, d_b2, None


def _plain(x, w1, b1, wd, bd, w2, b2, size, drop, training):
    gate, value = F.linear(x, w1, b1).chunk(2, dim=-1)
    hidden = F.gelu(map_to_tokens(_dwconv(gate, wd, bd, size))) * value
    hidden = F.dropout(hidden, drop, training)
    return F.dropout(F.linear(hidden, w2, b2), drop, training)


def _traceable(x, w1, b1, wd, bd, w2, b2, size):
    """Standard ops for graph capture, laid out as the eager kernels: gate and value from two
    products on row slices of ``fc1.weight``, so the gate is a dense channels-last map (the
    compiler's depthwise-conv backward on a strided slice of one product ran several times slower)."""
    hid = w2.shape[1]
    gate = F.linear(x, w1[:hid], None if b1 is None else b1[:hid])
    value = F.linear(x, w1[hid:], None if b1 is None else b1[hid:])
    return F.linear(F.gelu(map_to_tokens(_dwconv(gate, wd, bd, size))) * value, w2, b2)


def plain(x, w1, b1, wd, bd, w2, b2, size, drop: float = 0.0, training: bool = False) -> Tensor:
    """The plain module formulation (the reference backend, and dropout on the hidden activations)."""
    return _plain(x, w1, b1, wd, bd, w2, b2, size, drop, training)


def traceable(x, w1, b1, wd, bd, w2, b2, size) -> Tensor:
    """Standard ops for graph capture (see :func:`_traceable`)."""
    return _traceable(x, w1, b1, wd, bd, w2, b2, size)


def recompute(x, w1, b1, wd, bd, w2, b2, size) -> Tensor:
    """With autograd: keeps x, the gate and the value; recomputes the middle in backward."""
    return _ConvGLU.apply(x, w1, b1, wd, bd, w2, b2, size)


def inference(x, w1, b1, wd, bd, w2, b2, size) -> Tensor:
    """Without autograd: in chunks of images or row bands (see :func:`_inference`)."""
    return _inference(x, w1, b1, wd, bd, w2, b2, size)


def _inference(x, w1, b1, wd, bd, w2, b2, size):
    """No-grad path: in chunks of images or row bands, in place where possible.

    Row bands carry one halo row above and below for the 3x3 depthwise conv. The gate and value
    of every chunk are written into the same two buffers (fresh multi-MB buffers per chunk cost
    page faults under glibc's default malloc).
    """
    B, N, _ = x.shape
    H, W = size
    chunks = inference_chunks(x, size, bands=True) or [(0, B, 0, H)]
    ws = {} if autocast_dtype(x) is None else None  # out= matmuls do not take part in autocast
    out = None
    for b0, b1_, y0, y1 in chunks:
        ya, yb = max(0, y0 - 1), min(H, y1 + 1)
        res = _glu_chunk(x[b0:b1_, ya * W : yb * W], w1, b1, wd, bd, w2, b2, (yb - ya, W), y0 - ya, y1 - ya, ws)
        if len(chunks) == 1:
            return res
        if out is None:
            out = res.new_empty((B, N, res.shape[-1]))
        out[b0:b1_, y0 * W : y1 * W] = res
    return out


def _linear_into(ws: dict | None, name: str, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """F.linear(x, w, b), written into a reusable buffer of ``ws`` when given."""
    if ws is None or x.dim() != 3:
        return F.linear(x, w, b)
    rows = x.shape[0] * x.shape[1]
    numel = rows * w.shape[0]
    buf = ws.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != x.dtype:
        buf = ws[name] = torch.empty(numel, dtype=x.dtype, device=x.device)
    out = buf[:numel].view(rows, w.shape[0])
    x2 = x.reshape(rows, x.shape[-1])
    if b is None:
        torch.mm(x2, w.t(), out=out)
    else:
        torch.addmm(b, x2, w.t(), out=out)
    return out.view(x.shape[0], x.shape[1], w.shape[0])


def _glu_chunk(x, w1, b1, wd, bd, w2, b2, size, r0, r1, ws=None):
    """Conv-GLU on x over ``size``; only output rows r0..r1 (the rest is halo) are computed past the conv."""
    hid = w2.shape[1]
    W = size[1]
    gate = _linear_into(ws, "gate", x, w1[:hid], None if b1 is None else b1[:hid])
    x_rows = x if (r0, r1) == (0, size[0]) else x[:, r0 * W : r1 * W]
    value = _linear_into(ws, "value", x_rows, w1[hid:], None if b1 is None else b1[hid:])
    conv = _dwconv(gate, wd, bd, size)
    del gate
    if (r0, r1) != (0, size[0]):
        conv = conv[:, :, r0:r1]
    hidden = map_to_tokens(conv)
    hidden = torch.ops.aten.gelu_(hidden) if hidden.is_contiguous() else F.gelu(hidden)
    hidden.mul_(value)
    del value
    return F.linear(hidden, w2, b2)
