"""Aggregated Attention in blocks of query rows: memory linear in pixels at any resolution.

At dense resolutions the pooled key grid grows with the image (about 1,000 pooled keys per query
at 800 x 1344), so whole (B, h, N, Np) logits, probabilities and position bias are gigabytes per
layer. Here the queries are processed a block of grid rows at a time, sized so the block's
logits stay cache-resident (``KernelPolicy.block_elements``):

1. q.k of the pooled keys by one batched matmul into a contiguous buffer,
2. the block's bias, gathered from the layer's :class:`SeparableBias` factors, added on the way
   into the [pooled | local] logits; the local-window logits beside them,
3. one softmax with the reduction over the innermost axis,
4. aggregation of pooled values (one matmul) and of the window values (w*w shifted views).

Training saves only the normalised inputs (O(N * d)); backward recomputes each block's logits and
softmax with the same ops (so the probabilities are bitwise those of the forward) and
accumulates every gradient, including the bias factors' (the bias MLP learns exactly as before).
Dropout on the attention probabilities is not supported here (the dispatcher routes it to the
whole-tensor path). Whether the native CPU kernel runs the blocks is the caller's choice
(``native=``, decided by :mod:`transnext.ops.dispatch`); the op checks that it can.
"""

from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from ._common import (
    AA_DIFFERENTIABLE,
    AA_FLAT_FIELDS,
    AttentionInputs,
    Geometry,
    QueryScaling,
    WindowTerms,
    attention_input_grads,
    autocast_off,
    cast,
    compute_dtype,
    local_table,
    normalize_into,
    window_offsets,
)
from .bias import SeparableBias, rows_from_table, table_grad_from_rows

__all__ = ["FlatArgs", "backward_flat", "blocked_aggregated_attention", "block_rows", "flat_args", "forward_flat"]

# The op's tensors by name (the order of AA_FLAT_FIELDS): what the autograd Function and the custom ops pass.
FlatArgs = namedtuple("FlatArgs", AA_FLAT_FIELDS)


def flat_args(inputs: AttentionInputs, scaling: QueryScaling, terms: WindowTerms, bias: SeparableBias) -> FlatArgs:
    """The bundles as the op's flat tensors (softplus applied to the temperature)."""
    return FlatArgs(*inputs, scaling.query_embedding, F.softplus(scaling.temperature), scaling.length_scale,
                    terms.local_bias, bias.table, bias.y_index, bias.y_weight, terms.learnable_tokens,
                    terms.learnable_bias, terms.padding_mask)


def block_rows(B: int, h: int, W: int, keys: int, H: int, block_elements: int) -> int:
    """Grid rows per block so that one block's logits hold about ``block_elements`` values
    (``KernelPolicy.block_elements``)."""
    return max(1, min(H, block_elements // max(1, B * h * W * keys)))


class _Prepared:
    """Normalised, padded inputs shared by forward and backward."""

    def __init__(self, q_hat, q_norm, k_pad, k_norm, v_pad, kp_hat, kp_norm, vp) -> None:
        self.q_hat, self.q_norm, self.k_pad, self.k_norm = q_hat, q_norm, k_pad, k_norm
        self.v_pad, self.kp_hat, self.kp_norm, self.vp = v_pad, kp_hat, kp_norm, vp


def _prepare(q: Tensor, k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor, size, r: int, dt) -> _Prepared:
    B, h, N, d = q.shape
    H, W = size
    q_hat = torch.empty((B, h, N, d), dtype=dt, device=q.device)
    q_norm = normalize_into(q, q_hat)
    k_pad = torch.zeros((B, h, H + 2 * r, W + 2 * r, d), dtype=dt, device=q.device)
    k_norm = normalize_into(k.unflatten(2, (H, W)), k_pad[:, :, r : r + H, r : r + W])
    v_pad = F.pad(v.unflatten(2, (H, W)).to(dt), (0, 0, r, r, r, r)).contiguous()
    kp_hat = torch.empty(k_pool.shape, dtype=dt, device=q.device)
    kp_norm = normalize_into(k_pool, kp_hat)
    return _Prepared(q_hat, q_norm, k_pad, k_norm, v_pad, kp_hat, kp_norm, v_pool.to(dt).contiguous())


class _Block:
    """Logits and softmax of the queries in grid rows [y0, y1), in reusable buffers.

    The q.k products go to a contiguous buffer (a plain matmul: CPU BLAS runs a strided or
    accumulating batched matmul several times slower), and one pass adds the bias while moving
    them into the [pooled | local] logits, whose softmax reduces over the innermost axis.
    """

    def __init__(self, B: int, h: int, W: int, Np: int, L: int, rows: int, dt, device) -> None:
        self.buf = torch.empty((B * h, rows * W, Np + L), dtype=dt, device=device)
        self.qk = torch.empty((B * h, rows * W, Np), dtype=dt, device=device)
        self.shape = (B, h, W, Np, L)

    def probs(self, p: _Prepared, qs: Tensor, bias, ltable: Tensor, y0: int, y1: int, window: int) -> Tensor:
        """(B*h, rows*W, Np + L) softmax over [pooled | local] keys of the block's queries."""
        B, h, W, Np, L = self.shape
        table, y_index, y_weight, unit = bias
        rows, nb = y1 - y0, (y1 - y0) * W
        d = qs.shape[-1]
        buf = self.buf[:, :nb]
        qk = self.qk[:, :nb]
        qs_blk = qs[:, :, y0 * W : y1 * W]
        torch.bmm(qs_blk.reshape(B * h, nb, d), p.kp_hat.view(B * h, Np, d).transpose(1, 2), out=qk)
        kh, kw = y_index.shape[1], table.shape[3]
        shape6 = (B, h, rows, W, kh, kw)
        # The bias of the block's rows (the same for every image) added on the way into the logits.
        if unit:
            bias_rows = table.index_select(0, y_index[y0:y1, :, 0].reshape(-1)).view(rows, kh, h, W, kw).permute(2, 0, 3, 1, 4)
        else:
            bias_rows = rows_from_table(table, y_index, y_weight, y0, y1).view(h, rows, W, kh, kw)
        torch.add(qk.view(shape6), bias_rows, out=buf[:, :, :Np].view(shape6))
        # Local window logits: one multiply-reduce per window slot over shifted key views.
        local = torch.empty((B, h, rows, W, L), dtype=buf.dtype, device=buf.device)
        qs5 = qs_blk.view(B, h, rows, W, d)
        tmp = torch.empty_like(qs5)
        for o, i, j in window_offsets(window):
            torch.mul(qs5, p.k_pad[:, :, y0 + i : y1 + i, j : j + W], out=tmp)
            torch.sum(tmp, dim=-1, out=local[..., o])
        torch.add(local.view(B, h, nb, L), ltable[:, y0 * W : y1 * W], out=buf.view(B, h, nb, Np + L)[..., Np:])
        torch.softmax(buf, dim=-1, out=buf)
        return buf


def _bias_factors(table: Tensor, y_index: Tensor, y_weight: Tensor, dt) -> tuple:
    """(table, y_index, y_weight, unit): ``unit`` when every row is one slab of weight 1 (a plain gather)."""
    unit = y_index.shape[-1] == 1 and bool((y_weight == 1).all())
    return table.to(dt), y_index, y_weight.to(dt), unit


def _check_native(q_hat: Tensor, window: int, use_native: bool) -> None:
    if use_native and not native.supports(q_hat, window):
        raise RuntimeError(f"the native blocked kernel was chosen for a problem it does not take ({q_hat.dtype} on "
                           f"{q_hat.device.type}, head size {q_hat.shape[-1]}, window {window}, {native.describe(q_hat.dtype)})")


def forward_flat(a: FlatArgs, geometry: Geometry, use_native: bool, block_elements: int) -> tuple[Tensor, _Prepared]:
    """Output (B, h, N, d) in q's dtype, and the prepared inputs backward needs."""
    B, h, N, d = a.q.shape
    (H, W), window = geometry
    r, L, Np = window // 2, window * window, a.k_pool.shape[2]
    dt = compute_dtype(a.q)
    with autocast_off(a.q.device.type):
        p = _prepare(a.q, a.k, a.v, a.k_pool, a.v_pool, (H, W), r, dt)
        _check_native(p.q_hat, window, use_native)
        factor = a.mult.to(dt) * a.length_scale.to(dt)  # (h, N, 1)
        qs = torch.add(p.q_hat, a.query_embedding.to(dt)).mul_(factor)
        bias = _bias_factors(a.bias_table, a.bias_y_index, a.bias_y_weight, dt)
        ltable = local_table(a.local_bias, a.padding_mask, dt)
        tokens, lbias = a.learnable_tokens.to(dt), a.learnable_bias.to(dt)
        if use_native:
            extra = torch.matmul(p.q_hat, tokens).add_(lbias)
            out = native.aggregated_attention_forward(
                qs, p.kp_hat, p.vp, p.k_pad, p.v_pad, bias[0], bias[1], bias[2], ltable, extra, (H, W), window
            )
            return out.to(a.q.dtype), p
        rows = block_rows(B, h, W, Np + L, H, block_elements)
        block = _Block(B, h, W, Np, L, rows, dt, a.q.device)
        out = torch.empty((B, h, N, d), dtype=dt, device=a.q.device)
        for y0 in range(0, H, rows):
            y1 = min(H, y0 + rows)
            n0, n1 = y0 * W, y1 * W
            probs = block.probs(p, qs, bias, ltable, y0, y1, window)
            out_blk = out[:, :, n0:n1]
            torch.matmul(probs[:, :, :Np].view(B, h, n1 - n0, Np), p.vp, out=out_blk)
            weights = torch.matmul(p.q_hat[:, :, n0:n1], tokens)  # (B, h, nb, L)
            weights += probs[:, :, Np:].view(B, h, n1 - n0, L)
            weights += lbias
            out5 = out_blk.view(B, h, y1 - y0, W, d)
            w5 = weights.view(B, h, y1 - y0, W, L)
            for o, i, j in window_offsets(window):
                out5.addcmul_(w5[..., o : o + 1], p.v_pad[:, :, y0 + i : y1 + i, j : j + W])
    return out.to(a.q.dtype), p


class _BlockedAggregatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *args):
        *tensors, geometry, use_native, block_elements = args
        a = FlatArgs(*tensors)
        out, p = forward_flat(a, geometry, use_native, block_elements)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(p.q_hat, p.q_norm, p.k_pad, p.k_norm, p.v_pad, p.kp_hat, p.kp_norm, p.vp, *a[5:])
        ctx.config = (geometry, use_native, block_elements)
        ctx.dtypes = tuple(t.dtype for t in a[:5])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_hat, q_norm, k_pad, k_norm, v_pad, kp_hat, kp_norm, vp, *rest = ctx.saved_tensors
        p = _Prepared(q_hat, q_norm, k_pad, k_norm, v_pad, kp_hat, kp_norm, vp)
        a = FlatArgs(None, None, None, None, None, *rest)
        needs = FlatArgs(*ctx.needs_input_grad[: len(AA_FLAT_FIELDS)])
        geometry, use_native, block_elements = ctx.config
        grads = _backward(p, grad_out, a, geometry, needs, ctx.dtypes, use_native, block_elements)
        return (*grads, None, None, None)


def backward_flat(grad_out: Tensor, a: FlatArgs, geometry: Geometry, needs: FlatArgs, use_native: bool,
                  block_elements: int) -> FlatArgs:
    """Gradients of every input of the op from its inputs (the prepared tensors recomputed)."""
    dt = compute_dtype(a.q)
    with autocast_off(a.q.device.type):
        p = _prepare(a.q, a.k, a.v, a.k_pool, a.v_pool, geometry.size, geometry.window // 2, dt)
    return _backward(p, grad_out, a, geometry, needs, tuple(t.dtype for t in a[:5]), use_native, block_elements)


def _backward(p: _Prepared, grad_out: Tensor, a: FlatArgs, geometry: Geometry, needs: FlatArgs, dtypes: tuple,
              use_native: bool, block_elements: int) -> FlatArgs:
    """Gradients of every input of the blocked op (None where ``needs`` says none is wanted)."""
    q_hat, q_norm, k_pad, k_norm, v_pad = p.q_hat, p.q_norm, p.k_pad, p.k_norm, p.v_pad
    kp_hat, kp_norm, vp = p.kp_hat, p.kp_norm, p.vp
    (H, W), window = geometry
    dt = q_hat.dtype
    with autocast_off(q_hat.device.type):
        g = grad_out.to(dt).contiguous()
        factor = a.mult.to(dt) * a.length_scale.to(dt)
        qe = a.query_embedding.to(dt)
        qs = torch.add(q_hat, qe).mul_(factor)
        bias = _bias_factors(a.bias_table, a.bias_y_index, a.bias_y_weight, dt)
        ltable = local_table(a.local_bias, a.padding_mask, dt)
        tokens, lbias = a.learnable_tokens.to(dt), a.learnable_bias.to(dt)
        _check_native(q_hat, window, use_native)
        if use_native:
            extra = torch.matmul(q_hat, tokens).add_(lbias)
            grads = native.aggregated_attention_backward(
                g, qs, kp_hat, vp, k_pad, v_pad, bias[0], bias[1], bias[2], ltable, extra, (H, W), window,
                want_k=needs.k, want_v=needs.v, want_table=needs.bias_table,
            )
            del extra
            dqs, dw, dkp_hat, dvp = grads["dqs"], grads["dw"], grads["dkp"], grads["dvp"]
            dk_pad, dv_pad, d_table = grads["dk_pad"], grads["dv_pad"], grads["dtable"]
            d_tokens = torch.matmul(q_hat.transpose(-1, -2), dw).sum(0)
            d_lbias = dw.sum((0, 2)).unsqueeze(1)
            dq_hat = torch.matmul(dw, tokens.transpose(-1, -2))
            d_local_bias = grads["dloc"].sum((0, 2))
            del grads, dw
        else:
            dqs, dq_hat, dkp_hat, dvp, dk_pad, dv_pad, d_table, d_local_bias, d_tokens, d_lbias = _blocks_backward(
                p, g, qs, bias, ltable, tokens, lbias, a.bias_table, a.bias_y_index, (H, W), window, needs,
                block_elements)
        del qs
        # Query scaling (qs = (q_hat + qe) * softplus(temperature) * length_scale), normalisation, padding.
        d = attention_input_grads(dqs, dq_hat, q_hat, q_norm, qe, factor, a.length_scale, dk_pad, dv_pad, k_pad, k_norm,
                                  dkp_hat if needs.k_pool else None, kp_hat, kp_norm, (H, W), window, needs.q,
                                  needs.mult, needs.query_embedding)
    q_dt, k_dt, v_dt, kp_dt, vp_dt = dtypes
    return FlatArgs(
        q=cast(d["q"], q_dt), k=cast(d["k"], k_dt), v=cast(d["v"], v_dt), k_pool=cast(d["k_pool"], kp_dt),
        v_pool=cast(dvp if needs.v_pool else None, vp_dt), query_embedding=cast(d["qe"], a.query_embedding.dtype),
        mult=cast(d["mult"], a.mult.dtype), length_scale=None,
        local_bias=cast(d_local_bias if needs.local_bias else None, a.local_bias.dtype),
        bias_table=cast(d_table, a.bias_table.dtype), bias_y_index=None, bias_y_weight=None,
        learnable_tokens=cast(d_tokens if needs.learnable_tokens else None, a.learnable_tokens.dtype),
        learnable_bias=cast(d_lbias if needs.learnable_bias else None, a.learnable_bias.dtype), padding_mask=None,
    )


def _blocks_backward(p: _Prepared, g: Tensor, qs: Tensor, bias, ltable: Tensor, tokens: Tensor, lbias: Tensor,
                     bias_table: Tensor, bias_y_index: Tensor, size, window: int, needs: FlatArgs,
                     block_elements: int) -> tuple:
    """The backward's per-block loop in torch ops (where the native kernel does not run)."""
    q_hat, k_pad, v_pad, kp_hat, vp = p.q_hat, p.k_pad, p.v_pad, p.kp_hat, p.vp
    H, W = size
    B, h, N, d = q_hat.shape
    L, Np = window * window, kp_hat.shape[2]
    dt = q_hat.dtype
    rows = block_rows(B, h, W, Np + L, H, block_elements)
    block = _Block(B, h, W, Np, L, rows, dt, q_hat.device)
    d_buf = torch.empty_like(block.buf)  # d(loss)/d(probabilities), then the logits' gradient
    d_out = torch.empty_like(block.buf)
    part = torch.empty((B * h, Np, d), dtype=dt, device=q_hat.device)  # per-block key/value gradients

    dqs = torch.empty_like(qs)
    dq_hat = torch.empty_like(q_hat)
    dkp_hat = torch.zeros_like(kp_hat)
    dvp = torch.zeros_like(vp)
    dk_pad = torch.zeros_like(k_pad) if needs.k else None
    dv_pad = torch.zeros_like(v_pad) if needs.v else None
    d_table = torch.zeros(bias_table.shape, dtype=dt, device=bias_table.device) if needs.bias_table else None
    d_local_bias = torch.zeros((h, L), dtype=dt, device=q_hat.device)
    d_tokens = torch.zeros((h, d, L), dtype=dt, device=q_hat.device)
    d_lbias = torch.zeros((h, 1, L), dtype=dt, device=q_hat.device)
    vp2 = vp.view(B * h, Np, d)
    for y0 in range(0, H, rows):
        y1 = min(H, y0 + rows)
        n0, n1, nr = y0 * W, y1 * W, y1 - y0
        nb = n1 - n0
        probs = block.probs(p, qs, bias, ltable, y0, y1, window)
        g_blk = g[:, :, n0:n1]
        g5 = g_blk.view(B, h, nr, W, d)
        # d(loss)/d(probabilities): pooled by one matmul, window slots by shifted views.
        dp = d_buf[:, :nb]
        torch.bmm(g_blk.reshape(B * h, nb, d), vp2.transpose(1, 2), out=block.qk[:, :nb])
        dp[:, :, :Np].copy_(block.qk[:, :nb])
        d_w = torch.empty((B, h, nr, W, L), dtype=dt, device=g.device)
        tmp = torch.empty_like(g5)
        for o, i, j in window_offsets(window):
            torch.mul(g5, v_pad[:, :, y0 + i : y1 + i, j : j + W], out=tmp)
            torch.sum(tmp, dim=-1, out=d_w[..., o])
        d_w = d_w.view(B, h, nb, L)
        dp.view(B, h, nb, Np + L)[..., Np:].copy_(d_w)
        q_blk = q_hat[:, :, n0:n1]
        d_tokens += torch.matmul(q_blk.transpose(-1, -2), d_w).sum(0)
        d_lbias += d_w.sum((0, 2)).unsqueeze(1)
        torch.matmul(d_w, tokens.transpose(-1, -2), out=dq_hat[:, :, n0:n1])
        # Local aggregation weights (for the value gradient) before the softmax backward reuses memory.
        if dv_pad is not None:
            weights = torch.matmul(q_blk, tokens)
            weights += probs[:, :, Np:].view(B, h, nb, L)
            weights += lbias
            w5 = weights.view(B, h, nr, W, L)
            for o, i, j in window_offsets(window):
                dv_pad[:, :, y0 + i : y1 + i, j : j + W].addcmul_(w5[..., o : o + 1], g5)
        dvp.view(B * h, Np, d).add_(torch.bmm(probs[:, :, :Np].transpose(1, 2), g_blk.reshape(B * h, nb, d), out=part))
        d_logits = torch.ops.aten._softmax_backward_data.out(dp, probs, -1, dt, grad_input=d_out[:, :nb])
        d_pool = d_logits[:, :, :Np]
        d_loc = d_logits[:, :, Np:].reshape(B, h, nr, W, L)
        d_local_bias += d_loc.sum((0, 2, 3))
        if d_table is not None:
            kh, kw = bias_y_index.shape[1], bias_table.shape[3]
            grad_rows = d_pool.reshape(B, h, nr, W, kh, kw).sum(0)
            table_grad_from_rows(grad_rows, bias_y_index, bias[2], y0, y1, d_table)
        qs_blk = qs[:, :, n0:n1]
        dqs_blk = dqs[:, :, n0:n1]
        torch.matmul(d_pool.view(B, h, nb, Np), kp_hat, out=dqs_blk)
        dkp_hat.view(B * h, Np, d).add_(torch.bmm(d_pool.transpose(1, 2), qs_blk.reshape(B * h, nb, d), out=part))
        dqs5 = dqs_blk.view(B, h, nr, W, d)
        qs5 = qs_blk.view(B, h, nr, W, d)
        for o, i, j in window_offsets(window):
            dz = d_loc[..., o : o + 1]
            dqs5.addcmul_(dz, k_pad[:, :, y0 + i : y1 + i, j : j + W])
            if dk_pad is not None:
                dk_pad[:, :, y0 + i : y1 + i, j : j + W].addcmul_(dz, qs5)
        del probs, d_logits
    return dqs, dq_hat, dkp_hat, dvp, dk_pad, dv_pad, d_table, d_local_bias, d_tokens, d_lbias


def blocked_aggregated_attention(inputs: AttentionInputs, scaling: QueryScaling, terms: WindowTerms,
                                 bias: SeparableBias | Tensor, geometry: Geometry, *, native: bool,
                                 block_elements: int) -> Tensor:
    """Aggregated Attention a block of query rows at a time (no dropout); ``bias`` is a
    :class:`~transnext.ops.bias.SeparableBias` or a whole (h, N, Np) tensor. ``native``: the blocks
    run in the native CPU kernel (which must take the problem); ``block_elements``: logits per block."""
    if isinstance(bias, Tensor):
        bias = SeparableBias.from_dense(bias, geometry.size)
    flat = flat_args(inputs, scaling, terms, bias)
    return _BlockedAggregatedAttention.apply(*flat, Geometry(tuple(geometry.size), geometry.window), native,
                                             block_elements)


# Names of the differentiable inputs, for the custom-op wrappers.
DIFFERENTIABLE = AA_DIFFERENTIABLE
