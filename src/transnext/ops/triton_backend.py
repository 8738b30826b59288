"""Triton backend: fused forward and backward kernels for Aggregated Attention (CUDA).

Forward, one program per (block of queries, batch x head): normalise the queries and the
window keys on the fly, the w*w local logits with their bias and border mask, then the pooled
keys in blocks with an online softmax (the local logits open the running max and sum), so local
and pooled keys share one softmax without materialising it; the output adds the learnable-token
term and is written in token-major layout (a free view for the output projection). Only the
log-sum-exp per query is kept for backward.

Backward, three kernels, no atomics except for the position-bias gradient (summed over the
batch): (A) per query block: probabilities recomputed from the log-sum-exp, gradients of the
queries (through scaling and normalisation), of the local weights and logits; (B) per key
block: gradients of the local keys and values, gathered from the w*w queries that see each key;
(C) per pooled-key block: gradients of the pooled keys and values. Small reductions (query
embedding, temperature, learnable tokens and biases) finish in PyTorch.

Inputs may have any strides (the model passes views of its projections). The kernels compute
in float32 (float64 for float64 inputs, used by the tests); bf16/fp16 inputs use tensor-core
products with float32 accumulation. The module imports ``triton`` at import time: it is loaded
only when the backend is selected. On CPU it runs only under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import EPS, AttentionInputs, Geometry, QueryScaling, WindowTerms, autocast_off

__all__ = ["aggregated_attention", "is_available"]

# The tensors of the autograd Function, in order (pooled keys normalised, the temperature's softplus).
_FIELDS = ("q", "k", "v", "kp_hat", "v_pool", "query_embedding", "mult", "length_scale", "local_bias", "pool_bias",
           "learnable_tokens", "learnable_bias")


def is_available() -> bool:
    """Triton kernels can run: a CUDA device, or the interpreter (``TRITON_INTERPRET=1``)."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, LOWP: tl.constexpr, LDT: tl.constexpr, ACC: tl.constexpr):
    if LOWP:
        return tl.dot(a.to(LDT), b.to(LDT), out_dtype=tl.float32).to(ACC)
    else:
        return tl.dot(a, b, input_precision="ieee", out_dtype=ACC)


@triton.jit
def _scaled_queries(Q, QE, MULT, SCALE, b, hh, offs_n, offs_d, mn, md, sqb, sqh, sqn, sqd, D, EPS,
                    ACC: tl.constexpr):
    """Raw query tile -> (norm, normalised queries, scaled queries)."""
    q = tl.load(Q + b * sqb + hh * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd,
                mask=mn[:, None] & md[None, :], other=0.0).to(ACC)
    qn = tl.sqrt(tl.sum(q * q, 1))
    q_hat = q / tl.maximum(qn, EPS)[:, None]
    qe = tl.load(QE + hh * D + offs_d, mask=md, other=0.0).to(ACC)
    mult = tl.load(MULT + hh).to(ACC)
    sc = tl.load(SCALE + offs_n, mask=mn, other=0.0).to(ACC)
    qs = (q_hat + qe[None, :]) * mult * sc[:, None]
    return qn, q_hat, qs


@triton.jit
def _window_keys(K, b, hh, y, x, mn, offs_d, md, dy, dx, skb, skh, skn, skd, H, W, EPS, ACC: tl.constexpr):
    """Normalised keys of window slot (dy, dx) for each query, zero outside the image."""
    ny = y + dy
    nx = x + dx
    valid = mn & (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
    nidx = ny * W + nx
    kt = tl.load(K + b * skb + hh * skh + nidx[:, None] * skn + offs_d[None, :] * skd,
                 mask=valid[:, None] & md[None, :], other=0.0).to(ACC)
    kn = tl.sqrt(tl.sum(kt * kt, 1))
    return kt / tl.maximum(kn, EPS)[:, None], valid, nidx


@triton.jit
def _aa_fwd(
    Q, K, V, KP, VP, QE, MULT, SCALE, LB, PB, TOK, LBIAS, OUT, LSE,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    skpb, skph, skpn, skpd, svpb, svph, svpn, svpd, spbh, spbn, spbp, sob, soh, son, sod,
    NH, H, W, N, NP, D, EPS,
    WS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_L: tl.constexpr, ACC: tl.constexpr, LOWP: tl.constexpr, LDT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NH
    hh = pid_bh % NH
    L: tl.constexpr = WS * WS
    R: tl.constexpr = WS // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_l = tl.arange(0, BLOCK_L)
    mn = offs_n < N
    md = offs_d < D
    y = offs_n // W
    x = offs_n % W
    qn, q_hat, qs = _scaled_queries(Q, QE, MULT, SCALE, b, hh, offs_n, offs_d, mn, md, sqb, sqh, sqn, sqd, D, EPS, ACC)

    # Local window: logits kept per slot for the final weights.
    s_loc = tl.full((BLOCK_N, BLOCK_L), float("-inf"), ACC)
    for o in tl.static_range(L):
        kh, valid, _ = _window_keys(K, b, hh, y, x, mn, offs_d, md, o // WS - R, o % WS - R,
                                    skb, skh, skn, skd, H, W, EPS, ACC)
        logit = tl.sum(qs * kh, 1) + tl.load(LB + hh * L + o).to(ACC)
        s_loc = tl.where(offs_l[None, :] == o, tl.where(valid, logit, float("-inf"))[:, None], s_loc)
    m_i = tl.where(mn, tl.max(s_loc, 1), 0.0)
    l_i = tl.sum(tl.exp(s_loc - m_i[:, None]), 1)

    # Pooled keys: online softmax continuing from the local logits.
    acc = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for p0 in range(0, NP, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mp = offs_p < NP
        kp = tl.load(KP + b * skpb + hh * skph + offs_p[:, None] * skpn + offs_d[None, :] * skpd,
                     mask=mp[:, None] & md[None, :], other=0.0).to(ACC)
        s = _dot(qs, tl.trans(kp), LOWP, LDT, ACC)
        pb = tl.load(PB + hh * spbh + offs_n[:, None] * spbn + offs_p[None, :] * spbp,
                     mask=mn[:, None] & mp[None, :], other=0.0).to(ACC)
        s = tl.where(mp[None, :], s + pb, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        pr = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, 1)
        vp = tl.load(VP + b * svpb + hh * svph + offs_p[:, None] * svpn + offs_d[None, :] * svpd,
                     mask=mp[:, None] & md[None, :], other=0.0).to(ACC)
        acc = acc * alpha[:, None] + _dot(pr, vp, LOWP, LDT, ACC)
        m_i = m_new
    acc = acc / l_i[:, None]
    a_loc = tl.exp(s_loc - m_i[:, None]) / l_i[:, None]

    # Local values weighted by softmax + learnable-token term (zero values outside the image).
    for o in tl.static_range(L):
        ny = y + (o // WS - R)
        nx = x + (o % WS - R)
        valid = mn & (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
        vt = tl.load(V + b * svb + hh * svh + (ny * W + nx)[:, None] * svn + offs_d[None, :] * svd,
                     mask=valid[:, None] & md[None, :], other=0.0).to(ACC)
        tok = tl.load(TOK + hh * D * L + offs_d * L + o, mask=md, other=0.0).to(ACC)
        w_o = tl.sum(tl.where(offs_l[None, :] == o, a_loc, 0.0), 1) + tl.sum(q_hat * tok[None, :], 1)
        w_o = w_o + tl.load(LBIAS + hh * L + o).to(ACC)
        acc += w_o[:, None] * vt
    tl.store(OUT + b * sob + hh * soh + offs_n[:, None] * son + offs_d[None, :] * sod,
             acc.to(OUT.dtype.element_ty), mask=mn[:, None] & md[None, :])
    tl.store(LSE + pid_bh * N + offs_n, m_i + tl.log(l_i), mask=mn)


@triton.jit
def _aa_bwd_query(
    Q, K, V, KP, VP, QE, MULT, SCALE, LB, PB, TOK, LBIAS, DOUT, LSE,
    DQ, DW, DZ, WT, DSUM, DQE_PART, DMULT_PART, DPB,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    skpb, skph, skpn, skpd, svpb, svph, svpn, svpd, spbh, spbn, spbp, sgb, sgh, sgn, sgd,
    NH, H, W, N, NP, D, EPS,
    WS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_L: tl.constexpr, ACC: tl.constexpr, LOWP: tl.constexpr, LDT: tl.constexpr, NEED_PB: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NH
    hh = pid_bh % NH
    L: tl.constexpr = WS * WS
    R: tl.constexpr = WS // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_l = tl.arange(0, BLOCK_L)
    mn = offs_n < N
    md = offs_d < D
    ml = offs_l < L
    y = offs_n // W
    x = offs_n % W
    qn, q_hat, qs = _scaled_queries(Q, QE, MULT, SCALE, b, hh, offs_n, offs_d, mn, md, sqb, sqh, sqn, sqd, D, EPS, ACC)
    lse = tl.load(LSE + pid_bh * N + offs_n, mask=mn, other=0.0).to(ACC)
    g = tl.load(DOUT + b * sgb + hh * sgh + offs_n[:, None] * sgn + offs_d[None, :] * sgd,
                mask=mn[:, None] & md[None, :], other=0.0).to(ACC)

    # Local slots: probabilities, d(weights), the weights themselves, learnable-token gradient.
    s_loc = tl.full((BLOCK_N, BLOCK_L), float("-inf"), ACC)
    d_w = tl.zeros((BLOCK_N, BLOCK_L), ACC)
    lt = tl.zeros((BLOCK_N, BLOCK_L), ACC)
    dq_hat = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for o in tl.static_range(L):
        kh, valid, nidx = _window_keys(K, b, hh, y, x, mn, offs_d, md, o // WS - R, o % WS - R,
                                       skb, skh, skn, skd, H, W, EPS, ACC)
        logit = tl.sum(qs * kh, 1) + tl.load(LB + hh * L + o).to(ACC)
        s_loc = tl.where(offs_l[None, :] == o, tl.where(valid, logit, float("-inf"))[:, None], s_loc)
        vt = tl.load(V + b * svb + hh * svh + nidx[:, None] * svn + offs_d[None, :] * svd,
                     mask=valid[:, None] & md[None, :], other=0.0).to(ACC)
        dw_o = tl.sum(g * vt, 1)
        d_w = tl.where(offs_l[None, :] == o, dw_o[:, None], d_w)
        tok = tl.load(TOK + hh * D * L + offs_d * L + o, mask=md, other=0.0).to(ACC)
        lt_o = tl.sum(q_hat * tok[None, :], 1) + tl.load(LBIAS + hh * L + o).to(ACC)
        lt = tl.where(offs_l[None, :] == o, lt_o[:, None], lt)
        dq_hat += dw_o[:, None] * tok[None, :]
    a_loc = tl.where(mn[:, None], tl.exp(s_loc - lse[:, None]), 0.0)
    d_sum = tl.sum(a_loc * d_w, 1)

    # Pooled keys, pass 1: the rest of sum_j a_j dA_j.
    for p0 in range(0, NP, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mp = offs_p < NP
        kp = tl.load(KP + b * skpb + hh * skph + offs_p[:, None] * skpn + offs_d[None, :] * skpd,
                     mask=mp[:, None] & md[None, :], other=0.0).to(ACC)
        vp = tl.load(VP + b * svpb + hh * svph + offs_p[:, None] * svpn + offs_d[None, :] * svpd,
                     mask=mp[:, None] & md[None, :], other=0.0).to(ACC)
        pb = tl.load(PB + hh * spbh + offs_n[:, None] * spbn + offs_p[None, :] * spbp,
                     mask=mn[:, None] & mp[None, :], other=0.0).to(ACC)
        a = tl.exp(_dot(qs, tl.trans(kp), LOWP, LDT, ACC) + pb - lse[:, None])
        a = tl.where(mn[:, None] & mp[None, :], a, 0.0)
        d_sum += tl.sum(a * _dot(g, tl.trans(vp), LOWP, LDT, ACC), 1)

    d_z = a_loc * (d_w - d_sum[:, None])
    dqs = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for o in tl.static_range(L):
        kh, valid, _ = _window_keys(K, b, hh, y, x, mn, offs_d, md, o // WS - R, o % WS - R,
                                    skb, skh, skn, skd, H, W, EPS, ACC)
        dz_o = tl.sum(tl.where(offs_l[None, :] == o, d_z, 0.0), 1)
        dqs += dz_o[:, None] * kh

    # Pooled keys, pass 2: gradient of the scaled queries (and of the pooled position bias).
    for p0 in range(0, NP, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mp = offs_p < NP
        kp = tl.load(KP + b * skpb + hh * skph + offs_p[:, None] * skpn + offs_d[None, :] * skpd,
                     mask=mp[:, None] & md[None, :], other=0.0).to(ACC)
        vp = tl.load(VP + b * svpb + hh * svph + offs_p[:, None] * svpn + offs_d[None, :] * svpd,
                     mask=mp[:, None] & md[None, :], other=0.0).to(ACC)
        pb = tl.load(PB + hh * spbh + offs_n[:, None] * spbn + offs_p[None, :] * spbp,
                     mask=mn[:, None] & mp[None, :], other=0.0).to(ACC)
        a = tl.exp(_dot(qs, tl.trans(kp), LOWP, LDT, ACC) + pb - lse[:, None])
        a = tl.where(mn[:, None] & mp[None, :], a, 0.0)
        dz_p = a * (_dot(g, tl.trans(vp), LOWP, LDT, ACC) - d_sum[:, None])
        dqs += _dot(dz_p, kp, LOWP, LDT, ACC)
        if NEED_PB:
            tl.atomic_add(DPB + hh * N * NP + offs_n[:, None] * NP + offs_p[None, :], dz_p.to(DPB.dtype.element_ty),
                          mask=mn[:, None] & mp[None, :])

    # Query scaling and normalisation.
    mult = tl.load(MULT + hh).to(ACC)
    sc = tl.load(SCALE + offs_n, mask=mn, other=0.0).to(ACC)
    qe = tl.load(QE + hh * D + offs_d, mask=md, other=0.0).to(ACC)
    dqs_f = dqs * mult * sc[:, None]
    tl.store(DQE_PART + (pid_bh * tl.num_programs(0) + pid_n) * BLOCK_D + offs_d, tl.sum(dqs_f, 0))
    tl.store(DMULT_PART + pid_bh * tl.num_programs(0) + pid_n,
             tl.sum(tl.sum(dqs * (q_hat + qe[None, :]) * sc[:, None], 1), 0))
    dq_hat += dqs_f
    dot = tl.where(qn >= EPS, tl.sum(dq_hat * q_hat, 1), 0.0)
    dq = (dq_hat - dot[:, None] * q_hat) / tl.maximum(qn, EPS)[:, None]
    tl.store(DQ + pid_bh * N * D + offs_n[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=mn[:, None] & md[None, :])
    lmask = mn[:, None] & ml[None, :]
    base_l = pid_bh * N * L + offs_n[:, None] * L + offs_l[None, :]
    tl.store(DW + base_l, d_w, mask=lmask)
    tl.store(DZ + base_l, d_z, mask=lmask)
    tl.store(WT + base_l, a_loc + lt, mask=lmask)
    tl.store(DSUM + pid_bh * N + offs_n, d_sum, mask=mn)


@triton.jit
def _aa_bwd_key(
    Q, K, QE, MULT, SCALE, DOUT, DZ, WT, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, sgb, sgh, sgn, sgd,
    NH, H, W, N, D, EPS,
    WS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Local keys and values: gather from the queries whose window holds each key."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NH
    hh = pid_bh % NH
    L: tl.constexpr = WS * WS
    R: tl.constexpr = WS // 2
    offs_m = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mm = offs_m < N
    md = offs_d < D
    my = offs_m // W
    mx = offs_m % W
    kt = tl.load(K + b * skb + hh * skh + offs_m[:, None] * skn + offs_d[None, :] * skd,
                 mask=mm[:, None] & md[None, :], other=0.0).to(ACC)
    kn = tl.sqrt(tl.sum(kt * kt, 1))
    kh = kt / tl.maximum(kn, EPS)[:, None]
    dk_hat = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    dv = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for o in tl.static_range(L):
        qy = my - (o // WS - R)
        qx = mx - (o % WS - R)
        valid = mm & (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
        nidx = tl.where(valid, qy * W + qx, 0)
        _, _, qs = _scaled_queries(Q, QE, MULT, SCALE, b, hh, nidx, offs_d, valid, md, sqb, sqh, sqn, sqd, D, EPS, ACC)
        dz_o = tl.load(DZ + pid_bh * N * L + nidx * L + o, mask=valid, other=0.0).to(ACC)
        w_o = tl.load(WT + pid_bh * N * L + nidx * L + o, mask=valid, other=0.0).to(ACC)
        g = tl.load(DOUT + b * sgb + hh * sgh + nidx[:, None] * sgn + offs_d[None, :] * sgd,
                    mask=valid[:, None] & md[None, :], other=0.0).to(ACC)
        dk_hat += dz_o[:, None] * qs
        dv += w_o[:, None] * g
    dot = tl.where(kn >= EPS, tl.sum(dk_hat * kh, 1), 0.0)
    dk = (dk_hat - dot[:, None] * kh) / tl.maximum(kn, EPS)[:, None]
    out = pid_bh * N * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=mm[:, None] & md[None, :])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mm[:, None] & md[None, :])


@triton.jit
def _aa_bwd_pool(
    Q, KP, VP, QE, MULT, SCALE, PB, DOUT, LSE, DSUM, DKP, DVP,
    sqb, sqh, sqn, sqd, skpb, skph, skpn, skpd, svpb, svph, svpn, svpd, spbh, spbn, spbp, sgb, sgh, sgn, sgd,
    NH, N, NP, D, EPS,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
    LOWP: tl.constexpr, LDT: tl.constexpr,
):
    """Pooled keys and values: reduce over all queries of one (batch, head)."""
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NH
    hh = pid_bh % NH
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    mp = offs_p < NP
    md = offs_d < D
    kp = tl.load(KP + b * skpb + hh * skph + offs_p[:, None] * skpn + offs_d[None, :] * skpd,
                 mask=mp[:, None] & md[None, :], other=0.0).to(ACC)
    vp = tl.load(VP + b * svpb + hh * svph + offs_p[:, None] * svpn + offs_d[None, :] * svpd,
                 mask=mp[:, None] & md[None, :], other=0.0).to(ACC)
    dkp = tl.zeros((BLOCK_P, BLOCK_D), ACC)
    dvp = tl.zeros((BLOCK_P, BLOCK_D), ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        _, _, qs = _scaled_queries(Q, QE, MULT, SCALE, b, hh, offs_n, offs_d, mn, md, sqb, sqh, sqn, sqd, D, EPS, ACC)
        lse = tl.load(LSE + pid_bh * N + offs_n, mask=mn, other=0.0).to(ACC)
        d_sum = tl.load(DSUM + pid_bh * N + offs_n, mask=mn, other=0.0).to(ACC)
        pb = tl.load(PB + hh * spbh + offs_n[:, None] * spbn + offs_p[None, :] * spbp,
                     mask=mn[:, None] & mp[None, :], other=0.0).to(ACC)
        g = tl.load(DOUT + b * sgb + hh * sgh + offs_n[:, None] * sgn + offs_d[None, :] * sgd,
                    mask=mn[:, None] & md[None, :], other=0.0).to(ACC)
        a = tl.exp(_dot(qs, tl.trans(kp), LOWP, LDT, ACC) + pb - lse[:, None])
        a = tl.where(mn[:, None] & mp[None, :], a, 0.0)
        dz = a * (_dot(g, tl.trans(vp), LOWP, LDT, ACC) - d_sum[:, None])
        dvp += _dot(tl.trans(a), g, LOWP, LDT, ACC)
        dkp += _dot(tl.trans(dz), qs, LOWP, LDT, ACC)
    out = pid_bh * NP * D + offs_p[:, None] * D + offs_d[None, :]
    tl.store(DKP + out, dkp.to(DKP.dtype.element_ty), mask=mp[:, None] & md[None, :])
    tl.store(DVP + out, dvp.to(DVP.dtype.element_ty), mask=mp[:, None] & md[None, :])


def _strides(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _config(q: Tensor, d: int, window: int) -> dict:
    acc = tl.float64 if q.dtype == torch.float64 else tl.float32
    lowp = q.dtype in (torch.float16, torch.bfloat16)
    ldt = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(q.dtype, tl.float32)
    return dict(
        WS=window, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_L=max(2, triton.next_power_of_2(window * window)),
        ACC=acc, LOWP=lowp, LDT=ldt,
    )


CUDA_BLOCK_N = 64  # queries per program on CUDA
INTERPRETER_BLOCK_N = 16  # smaller under the CPU interpreter (tests), where every program runs in Python


def _block_n(q: Tensor) -> int:
    return CUDA_BLOCK_N if q.is_cuda else INTERPRETER_BLOCK_N


class _TritonAggregatedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kp_hat, vp, qe, mult, scale, local_bias, pool_bias, tokens, lbias, size, window):
        B, h, N, d = q.shape
        H, W = size
        Np = kp_hat.shape[2]
        qe_c = qe.reshape(h, d).contiguous()
        mult_c = mult.reshape(h).contiguous()
        scale_c = scale.reshape(N).contiguous()
        lb_c = local_bias.contiguous()
        tok_c = tokens.contiguous()
        lbias_c = lbias.reshape(h, -1).contiguous()
        out = torch.empty((B, N, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.empty((B, h, N), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
        cfg = _config(q, d, window)
        bn = _block_n(q)
        grid = (triton.cdiv(N, bn), B * h)
        _aa_fwd[grid](
            q, k, v, kp_hat, vp, qe_c, mult_c, scale_c, lb_c, pool_bias, tok_c, lbias_c, out, lse,
            *_strides(q), *_strides(k), *_strides(v), *_strides(kp_hat), *_strides(vp), *_strides(pool_bias),
            *_strides(out), h, H, W, N, Np, d, EPS, BLOCK_N=bn, BLOCK_P=16 if not q.is_cuda else 32, **cfg,
        )
        ctx.save_for_backward(q, k, v, kp_hat, vp, qe_c, mult_c, scale_c, lb_c, pool_bias, tok_c, lbias_c, lse)
        ctx.size, ctx.window = size, window
        ctx.shapes = (qe.shape, mult.shape, local_bias.shape, lbias.shape)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, kp_hat, vp, qe, mult, scale, lb, pool_bias, tokens, lbias, lse = ctx.saved_tensors
        B, h, N, d = q.shape
        H, W = ctx.size
        window = ctx.window
        L = window * window
        Np = kp_hat.shape[2]
        needs = dict(zip(_FIELDS, ctx.needs_input_grad))
        cfg = _config(q, d, window)
        bn = _block_n(q)
        bp = 16 if not q.is_cuda else 32
        n_blocks = triton.cdiv(N, bn)
        acc_dt = lse.dtype
        dev = q.device
        dq = torch.empty((B, h, N, d), dtype=q.dtype, device=dev)
        d_w = torch.empty((B, h, N, L), dtype=acc_dt, device=dev)
        d_z = torch.empty_like(d_w)
        w_t = torch.empty_like(d_w)
        d_sum = torch.empty((B, h, N), dtype=acc_dt, device=dev)
        dqe_part = torch.zeros((B * h, n_blocks, cfg["BLOCK_D"]), dtype=acc_dt, device=dev)
        dmult_part = torch.zeros((B * h, n_blocks), dtype=acc_dt, device=dev)
        need_pb = bool(needs["pool_bias"])
        dpb = torch.zeros((h, N, Np), dtype=acc_dt, device=dev) if need_pb else d_sum
        _aa_bwd_query[(n_blocks, B * h)](
            q, k, v, kp_hat, vp, qe, mult, scale, lb, pool_bias, tokens, lbias, dout, lse,
            dq, d_w, d_z, w_t, d_sum, dqe_part, dmult_part, dpb,
            *_strides(q), *_strides(k), *_strides(v), *_strides(kp_hat), *_strides(vp), *_strides(pool_bias),
            *_strides(dout), h, H, W, N, Np, d, EPS, BLOCK_N=bn, BLOCK_P=bp, NEED_PB=need_pb, **cfg,
        )
        dk = dv = None
        if needs["k"] or needs["v"]:
            dk = torch.empty((B, h, N, d), dtype=k.dtype, device=dev)
            dv = torch.empty((B, h, N, d), dtype=v.dtype, device=dev)
            _aa_bwd_key[(n_blocks, B * h)](
                q, k, qe, mult, scale, dout, d_z, w_t, dk, dv,
                *_strides(q), *_strides(k), *_strides(dout), h, H, W, N, d, EPS,
                WS=window, BLOCK_N=bn, BLOCK_D=cfg["BLOCK_D"], ACC=cfg["ACC"],
            )
        dkp = dvp = None
        if needs["kp_hat"] or needs["v_pool"]:
            dkp = torch.empty((B, h, Np, d), dtype=kp_hat.dtype, device=dev)
            dvp = torch.empty((B, h, Np, d), dtype=vp.dtype, device=dev)
            _aa_bwd_pool[(triton.cdiv(Np, bp), B * h)](
                q, kp_hat, vp, qe, mult, scale, pool_bias, dout, lse, d_sum, dkp, dvp,
                *_strides(q), *_strides(kp_hat), *_strides(vp), *_strides(pool_bias), *_strides(dout),
                h, N, Np, d, EPS, BLOCK_N=bn, BLOCK_P=bp, BLOCK_D=cfg["BLOCK_D"], ACC=cfg["ACC"],
                LOWP=cfg["LOWP"], LDT=cfg["LDT"],
            )
        qe_shape, mult_shape, lb_shape, lbias_shape = ctx.shapes
        with autocast_off(dev.type):
            return _finish(ctx, q, qe, mult, lb, pool_bias, tokens, lbias, dq, dk, dv, dkp, dvp, d_w, d_z, dpb,
                           dqe_part, dmult_part, need_pb, acc_dt)


def _finish(ctx, q, qe, mult, lb, pool_bias, tokens, lbias, dq, dk, dv, dkp, dvp, d_w, d_z, dpb, dqe_part, dmult_part,
            need_pb, acc_dt):
    """Small reductions in PyTorch: query embedding, temperature, biases, learnable tokens."""
    needs = dict(zip(_FIELDS, ctx.needs_input_grad))
    B, h, N, d = q.shape
    n_blocks = dmult_part.shape[1]
    qe_shape, mult_shape, lb_shape, lbias_shape = ctx.shapes
    d_qe = dqe_part.view(B, h, n_blocks, -1).sum((0, 2))[:, :d].reshape(qe_shape).to(qe.dtype)
    d_mult = dmult_part.view(B, h, n_blocks).sum((0, 2)).reshape(mult_shape).to(mult.dtype)
    d_lb = d_z.sum((0, 2)).reshape(lb_shape).to(lb.dtype) if needs["local_bias"] else None
    d_pb = dpb.to(pool_bias.dtype) if need_pb else None
    d_tok = d_lbias = None
    if needs["learnable_tokens"]:
        q_hat = F.normalize(q.to(acc_dt), dim=-1)
        d_tok = torch.einsum("bhnd,bhnl->hdl", q_hat, d_w).to(tokens.dtype)
    if needs["learnable_bias"]:
        d_lbias = d_w.sum((0, 2)).reshape(lbias_shape).to(lbias.dtype)
    return (dq, dk, dv, dkp, dvp, d_qe, d_mult, None, d_lb, d_pb, d_tok, d_lbias, None, None)


def aggregated_attention(inputs: AttentionInputs, scaling: QueryScaling, terms: WindowTerms, bias: Tensor,
                         geometry: Geometry) -> Tensor:
    """The fused kernels (no dropout, no graph capture: :mod:`transnext.ops.dispatch` routes those
    elsewhere); ``bias`` whole (h, N, Np)."""
    if not isinstance(bias, Tensor):
        raise TypeError(f"the Triton kernels take the pooled-key bias as one (h, N, Np) tensor, not {type(bias).__name__}")
    q, k, v, k_pool, v_pool = inputs
    low = q.dtype in (torch.float16, torch.bfloat16)
    dt = q.dtype
    kp_hat = F.normalize(k_pool.to(torch.float32) if low else k_pool, dim=-1).to(dt)
    mult = F.softplus(scaling.temperature)
    return _TritonAggregatedAttention.apply(
        q, k, v, kp_hat, v_pool.to(dt), scaling.query_embedding, mult, scaling.length_scale.to(mult.dtype),
        terms.local_bias, bias, terms.learnable_tokens, terms.learnable_bias, tuple(geometry.size), geometry.window,
    )
