"""Pure-PyTorch backend without unfolded copies of keys and values.

The w*w window offsets are shifted views of one zero-padded tensor, so the local logits are
w*w fused multiply-reduce passes and the local aggregation w*w in-place ``addcmul`` passes over
(B, h, H, W, d) tensors: no (B, h, N, d, w*w) copies as in the unfold formulation. The logits of
the local and pooled keys share one (B, h, w*w + Np, N) buffer (keys-major, so each offset is a
contiguous slab and the pooled part is written by one batched matmul), followed by one softmax.

A custom autograd Function saves only the normalised queries and keys (with their norms), the
padded values and the attention probabilities; queries' scaling and the learnable-token weights
are recomputed in backward. For graph export :func:`functional_aggregated_attention` is the same
algorithm in standard ops. Which of these (or the blocked kernels) runs is decided by
:mod:`transnext.ops.dispatch`; this module only runs what it is given.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
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

__all__ = ["full_attention", "functional_aggregated_attention", "whole_aggregated_attention"]

# The tensors of the whole-tensor autograd Function, in order (the bias whole, the temperature's softplus).
_WHOLE_FIELDS = ("q", "k", "v", "k_pool", "v_pool", "query_embedding", "mult", "length_scale", "local_bias",
                 "pool_bias", "learnable_tokens", "learnable_bias", "padding_mask")


def _padded(x: Tensor, size: tuple[int, int], r: int, dtype: torch.dtype) -> Tensor:
    """(B, h, H + 2r, W + 2r, d) buffer with zero borders; the interior is left to the caller."""
    B, h, _, d = x.shape
    H, W = size
    buf = torch.empty((B, h, H + 2 * r, W + 2 * r, d), dtype=dtype, device=x.device)
    if r:
        buf[:, :, :r].zero_()
        buf[:, :, H + r :].zero_()
        buf[:, :, r : H + r, :r].zero_()
        buf[:, :, r : H + r, W + r :].zero_()
    return buf


_LAST_TABLE: list = [None, None, None]  # (weakref to the source, key, keys-major copy)


def _keys_major(pool_bias: Tensor, dtype: torch.dtype) -> Tensor:
    """(h, Np, N) contiguous copy of the (h, N, Np) position bias.

    At inference the model serves the same cached bias to every batch chunk of a layer; the
    transposed copy of the last one is kept, so the chunks share it.
    """
    if pool_bias.requires_grad:
        return pool_bias.to(dtype).transpose(-1, -2).contiguous()
    try:
        version = pool_bias._version
    except RuntimeError:  # an inference tensor: no version counter, and not modifiable outside inference mode
        version = None
    key = (version, tuple(pool_bias.shape), tuple(pool_bias.stride()), dtype, pool_bias.device)
    ref, last_key, table = _LAST_TABLE
    if ref is not None and ref() is pool_bias and last_key == key:
        return table
    table = pool_bias.to(dtype).transpose(-1, -2).contiguous()
    _LAST_TABLE[:] = [weakref.ref(pool_bias), key, table]
    return table


class _AggregatedAttention(torch.autograd.Function):
    """Normalisation, query scaling, local + pooled logits, one softmax, aggregation."""

    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        k_pool: Tensor,
        v_pool: Tensor,
        query_embedding: Tensor,
        mult: Tensor,
        length_scale: Tensor,
        local_bias: Tensor,
        pool_bias: Tensor,
        learnable_tokens: Tensor,
        learnable_bias: Tensor,
        padding_mask: Tensor,
        size: tuple[int, int],
        window: int,
        p_drop: float,
    ) -> Tensor:
        B, h, N, d = q.shape
        H, W = size
        r, L, Np = window // 2, window * window, k_pool.shape[2]
        dt = compute_dtype(q)
        with autocast_off(q.device.type):
            q_hat = torch.empty((B, h, N, d), dtype=dt, device=q.device)
            q_norm = normalize_into(q, q_hat)
            k_pad = _padded(k, size, r, dt)
            k_norm = normalize_into(k.unflatten(2, (H, W)), k_pad[:, :, r : r + H, r : r + W])
            v_pad = F.pad(v.unflatten(2, (H, W)).to(dt), (0, 0, r, r, r, r)).contiguous()
            kp_hat = torch.empty(k_pool.shape, dtype=dt, device=q.device)
            kp_norm = normalize_into(k_pool, kp_hat)
            vp = v_pool.to(dt)
            factor = mult.to(dt) * length_scale.to(dt)  # (h, N, 1)
            qs = torch.add(q_hat, query_embedding.to(dt)).mul_(factor)

            logits = torch.empty((B, h, L + Np, N), dtype=dt, device=q.device)
            qs5 = qs.view(B, h, H, W, d)
            tmp = torch.empty_like(qs5)
            for o, i, j in window_offsets(window):
                torch.mul(qs5, k_pad[:, :, i : i + H, j : j + W], out=tmp)
                torch.sum(tmp, dim=-1, out=logits[:, :, o].view(B, h, H, W))
            del tmp
            # (A matmul straight into the slab takes a slow per-batch path: add the bias on the copy.)
            pool_table = _keys_major(pool_bias, dt)
            torch.add(torch.matmul(kp_hat, qs.transpose(-1, -2)), pool_table, out=logits[:, :, L:])
            logits[:, :, :L] += local_table(local_bias, padding_mask, dt, keys_major=True)
            probs = torch.softmax(logits, dim=-2)
            del logits

            drop_mask = None
            probs_d = probs
            if p_drop > 0.0:
                drop_mask = torch.rand_like(probs) >= p_drop
                probs_d = probs * drop_mask * (1.0 / (1.0 - p_drop))

            weights = _local_weights(q_hat, probs_d, learnable_tokens, learnable_bias, L)
            out = torch.matmul(probs_d[:, :, L:].transpose(-1, -2), vp)
            out5 = out.view(B, h, H, W, d)
            for o, i, j in window_offsets(window):
                out5.addcmul_(weights[:, :, o].view(B, h, H, W, 1), v_pad[:, :, i : i + H, j : j + W])

        ctx.save_for_backward(
            q_hat, q_norm, k_pad, k_norm, v_pad, kp_hat, kp_norm, vp, probs, drop_mask,
            query_embedding, mult, length_scale, learnable_tokens, learnable_bias,
        )
        ctx.geometry = (size, window, p_drop)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype, k_pool.dtype, v_pool.dtype, local_bias.dtype, pool_bias.dtype)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (q_hat, q_norm, k_pad, k_norm, v_pad, kp_hat, kp_norm, vp, probs, drop_mask,
         query_embedding, mult, length_scale, learnable_tokens, learnable_bias) = ctx.saved_tensors
        (H, W), window, p_drop = ctx.geometry
        B, h, N, d = q_hat.shape
        L = window * window
        dt = q_hat.dtype
        needs = dict(zip(_WHOLE_FIELDS, ctx.needs_input_grad))
        with autocast_off(q_hat.device.type):
            g = grad_out.to(dt).contiguous()
            g5 = g.view(B, h, H, W, d)
            factor = mult.to(dt) * length_scale.to(dt)
            qe = query_embedding.to(dt)
            qs = torch.add(q_hat, qe).mul_(factor)
            qs5 = qs.view(B, h, H, W, d)
            probs_d = probs if drop_mask is None else probs * drop_mask * (1.0 / (1.0 - p_drop))
            weights = _local_weights(q_hat, probs_d, learnable_tokens, learnable_bias, L)

            # d(loss)/d(weights) for local slots and pooled probabilities, keys-major like probs.
            d_probs = torch.empty_like(probs)
            tmp = torch.empty_like(g5)
            for o, i, j in window_offsets(window):
                torch.mul(g5, v_pad[:, :, i : i + H, j : j + W], out=tmp)
                torch.sum(tmp, dim=-1, out=d_probs[:, :, o].view(B, h, H, W))
            del tmp
            d_probs[:, :, L:] = torch.matmul(vp, g.transpose(-1, -2))
            d_w = d_probs[:, :, :L]
            tokens = learnable_tokens.to(dt)
            d_tokens = torch.matmul(q_hat.transpose(-1, -2), d_w.transpose(-1, -2)).sum(0) if needs["learnable_tokens"] else None
            d_lbias = d_w.sum((0, 3)).unsqueeze(1) if needs["learnable_bias"] else None
            dq_hat = torch.matmul(d_w.transpose(-1, -2), tokens.transpose(-1, -2))
            if drop_mask is not None:
                d_probs.mul_(drop_mask).mul_(1.0 / (1.0 - p_drop))
            d_logits = torch._softmax_backward_data(d_probs, probs, -2, dt)
            del d_probs, d_w
            d_local_bias = d_logits[:, :, :L].sum((0, 3)) if needs["local_bias"] else None
            d_pool_bias = d_logits[:, :, L:].sum(0).transpose(-1, -2) if needs["pool_bias"] else None
            d_pool = d_logits[:, :, L:]
            dqs = torch.matmul(d_pool.transpose(-1, -2), kp_hat)
            dkp_hat = torch.matmul(d_pool, qs) if needs["k_pool"] else None
            dvp = torch.matmul(probs_d[:, :, L:], g) if needs["v_pool"] else None
            del probs_d

            dqs5 = dqs.view(B, h, H, W, d)
            dk_pad = torch.zeros_like(k_pad) if needs["k"] else None
            dv_pad = torch.zeros_like(v_pad) if needs["v"] else None
            for o, i, j in window_offsets(window):
                dz = d_logits[:, :, o].view(B, h, H, W, 1)
                dqs5.addcmul_(dz, k_pad[:, :, i : i + H, j : j + W])
                if dk_pad is not None:
                    dk_pad[:, :, i : i + H, j : j + W].addcmul_(dz, qs5)
                if dv_pad is not None:
                    dv_pad[:, :, i : i + H, j : j + W].addcmul_(weights[:, :, o].view(B, h, H, W, 1), g5)
            del d_logits, weights

            del qs
            # Query scaling (qs = (q_hat + qe) * softplus(temperature) * length_scale), normalisation, padding.
            d = attention_input_grads(dqs, dq_hat, q_hat, q_norm, qe, factor, length_scale, dk_pad, dv_pad, k_pad, k_norm,
                                      dkp_hat, kp_hat, kp_norm, (H, W), window, needs["q"], needs["mult"],
                                      needs["query_embedding"])

        q_dt, k_dt, v_dt, kp_dt, vp_dt, lb_dt, pb_dt = ctx.dtypes
        return (
            cast(d["q"], q_dt), cast(d["k"], k_dt), cast(d["v"], v_dt), cast(d["k_pool"], kp_dt), cast(dvp, vp_dt),
            cast(d["qe"], query_embedding.dtype), cast(d["mult"], mult.dtype), None,
            cast(d_local_bias, lb_dt), cast(d_pool_bias, pb_dt),
            cast(d_tokens, learnable_tokens.dtype), cast(d_lbias, learnable_bias.dtype),
            None, None, None, None,
        )


def _local_weights(q_hat: Tensor, probs: Tensor, tokens: Tensor, lbias: Tensor, L: int) -> Tensor:
    """(B, h, L, N): softmax weights of the window slots plus the learnable-token term."""
    dt = q_hat.dtype
    weights = torch.matmul(tokens.to(dt).transpose(-1, -2), q_hat.transpose(-1, -2))
    weights += probs[:, :, :L]
    weights += lbias.to(dt).transpose(-1, -2)
    return weights


def functional_aggregated_attention(inputs: AttentionInputs, scaling: QueryScaling, terms: WindowTerms, bias: Tensor,
                                    geometry: Geometry, attn_drop: float = 0.0, training: bool = False) -> Tensor:
    """The whole-tensor algorithm in out-of-place standard ops (for graph export); ``bias`` whole (h, N, Np)."""
    q, k, v, k_pool, v_pool = inputs
    (H, W), window = geometry
    B, h, N, d = q.shape
    r, L, Np = window // 2, window * window, k_pool.shape[2]
    q_hat = F.normalize(q, dim=-1)
    qs = ((q_hat + scaling.query_embedding) * F.softplus(scaling.temperature) * scaling.length_scale).reshape(B, h, H, W, d)
    k_pad = F.pad(F.normalize(k, dim=-1).reshape(B, h, H, W, d), (0, 0, r, r, r, r))
    v_pad = F.pad(v.reshape(B, h, H, W, d), (0, 0, r, r, r, r))
    offsets = window_offsets(window)
    local = torch.stack([(qs * k_pad[:, :, i : i + H, j : j + W]).sum(-1) for _, i, j in offsets], dim=-1)
    local = (local.reshape(B, h, N, L) + terms.local_bias.unsqueeze(1)).masked_fill(terms.padding_mask, float("-inf"))
    pooled = qs.reshape(B, h, N, d) @ F.normalize(k_pool, dim=-1).transpose(-1, -2) + bias
    attn = torch.cat([local, pooled], dim=-1).softmax(dim=-1)
    attn = F.dropout(attn, attn_drop, training)
    a_local, a_pool = torch.split(attn, [L, Np], dim=-1)
    weights = (a_local + q_hat @ terms.learnable_tokens + terms.learnable_bias).reshape(B, h, H, W, L)
    out = (a_pool @ v_pool).reshape(B, h, H, W, d)
    for o, i, j in offsets:
        out = out + weights[..., o : o + 1] * v_pad[:, :, i : i + H, j : j + W]
    return out.reshape(B, h, N, d)


def whole_aggregated_attention(inputs: AttentionInputs, scaling: QueryScaling, terms: WindowTerms, bias: Tensor,
                               geometry: Geometry, attn_drop: float = 0.0, training: bool = False) -> Tensor:
    """Whole (B, h, w*w + Np, N) logits in one pass, with dropout on the probabilities where asked;
    ``bias`` whole (h, N, Np)."""
    if not isinstance(bias, Tensor):
        raise TypeError(f"the whole-tensor kernel takes the pooled-key bias as one (h, N, Np) tensor, not {type(bias).__name__}")
    return _AggregatedAttention.apply(
        *inputs, scaling.query_embedding, F.softplus(scaling.temperature), scaling.length_scale, terms.local_bias, bias,
        terms.learnable_tokens, terms.learnable_bias, terms.padding_mask, tuple(geometry.size), geometry.window,
        attn_drop if training else 0.0,
    )


def full_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    query_embedding: Tensor,
    temperature: Tensor,
    length_scale: float | Tensor,
    bias,
    attn_drop: float = 0.0,
    training: bool = False,
    *,
    kernel: str = "sdpa",
    block_bytes: int,
) -> Tensor:
    """Scaled queries through ``scaled_dot_product_attention`` with the bias as additive mask.

    ``kernel`` (chosen by :mod:`transnext.ops.dispatch`): ``"sdpa"`` whole logits, ``"sdpa_blocked"``
    in blocks of query rows of about ``block_bytes`` logits, ``"inference"`` no autograd, blocks with
    the bias written into the logits buffer (CPU). ``bias`` is an (h, N, N) tensor or, for the blocked
    kernels, a :class:`~transnext.models.position_bias.BlockwiseBias` (large grids) whose rows are
    produced per block of queries.
    """
    q_scaled = (F.normalize(q, dim=-1) + query_embedding) * F.softplus(temperature) * length_scale
    k_hat = F.normalize(k, dim=-1)
    p = attn_drop if training else 0.0
    B, h, N, _ = q_scaled.shape
    lazy = not isinstance(bias, Tensor)
    rows = max(1, block_bytes // (q_scaled.element_size() * B * h * k_hat.shape[-2]))
    if lazy and rows > bias.size[1]:
        rows -= rows % bias.size[1]  # whole grid rows: the bias of a block is one row selection
    if kernel == "inference":
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, query_embedding, temperature)):
            raise RuntimeError("the in-place full-attention kernel runs without autograd only")
        return _full_attention_inference(q_scaled, k_hat, v, bias, rows, p)
    if kernel == "sdpa":
        if lazy:
            raise TypeError("the whole full-attention kernel takes the bias as one (h, N, N) tensor")
        return F.scaled_dot_product_attention(q_scaled, k_hat, v, attn_mask=bias.to(q_scaled.dtype), dropout_p=p, scale=1.0)
    if kernel != "sdpa_blocked":
        raise ValueError(f"unknown full-attention kernel {kernel!r}; expected sdpa, sdpa_blocked or inference")
    out = q_scaled.new_empty((B, h, N, v.shape[-1]))
    for i in range(0, N, rows):
        block = bias.rows(i, i + rows) if lazy else bias[..., i : i + rows, :]
        out[:, :, i : i + rows] = F.scaled_dot_product_attention(
            q_scaled[:, :, i : i + rows], k_hat, v, attn_mask=block.to(q_scaled.dtype), dropout_p=p, scale=1.0
        )
    return out


def _full_attention_inference(q_scaled: Tensor, k_hat: Tensor, v: Tensor, bias, rows: int, p: float) -> Tensor:
    """No autograd: logits start as the bias, the q.k products are added in place, softmax in place.

    About 1.7x faster than ``scaled_dot_product_attention`` with a float mask on CPU (one buffer
    per block instead of three).
    """
    B, h, N, d = q_scaled.shape
    lazy = not isinstance(bias, Tensor)
    dt = q_scaled.dtype
    k2 = k_hat.reshape(B * h, N, d).transpose(1, 2)
    v2 = v.to(dt).reshape(B * h, N, v.shape[-1])
    out = q_scaled.new_empty((B, h, N, v.shape[-1]))
    rows = min(rows, N)
    buf = q_scaled.new_empty((B, h, rows, N))
    for i in range(0, N, rows):
        j = min(i + rows, N)
        logits = buf[:, :, : j - i]
        if lazy:
            bias.rows(i, j, out=logits[0])
            logits[1:].copy_(logits[:1])
        else:
            logits.copy_(bias[..., i:j, :])  # broadcast over the batch
        flat = logits.view(B * h, j - i, N)
        flat.baddbmm_(q_scaled[:, :, i:j].reshape(B * h, j - i, d), k2)
        torch.softmax(flat, dim=-1, out=flat)
        if p > 0.0:
            flat = F.dropout(flat, p, True)
        out[:, :, i:j] = torch.bmm(flat, v2).view(B, h, j - i, -1)
    return out
