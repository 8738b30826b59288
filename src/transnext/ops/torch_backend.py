"""Pure-PyTorch backend without unfolded copies: the window offsets are shifted views."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def aggregated_attention(
    q: Tensor,
    q_scaled: Tensor,
    k: Tensor,
    v: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    local_bias: Tensor,
    pool_bias: Tensor,
    learnable_tokens: Tensor,
    learnable_bias: Tensor,
    padding_mask: Tensor,
    size: tuple[int, int],
    window: int,
    attn_drop: float = 0.0,
    training: bool = False,
) -> Tensor:
    B, h, N, d = q.shape
    H, W = size
    r = window // 2
    L = window * window
    Np = k_pool.shape[2]
    k_pad = F.pad(k.reshape(B, h, H, W, d), (0, 0, r, r, r, r))
    v_pad = F.pad(v.reshape(B, h, H, W, d), (0, 0, r, r, r, r))
    qs = q_scaled.reshape(B, h, H, W, d)
    offsets = [(i, j) for i in range(window) for j in range(window)]
    attn_local = torch.stack(
        [(qs * k_pad[:, :, i : i + H, j : j + W]).sum(-1) for i, j in offsets], dim=-1
    ).reshape(B, h, N, L)
    attn_local = (attn_local + local_bias.unsqueeze(1)).masked_fill(padding_mask, float("-inf"))
    attn_pool = torch.baddbmm(
        pool_bias.unsqueeze(0).expand(B, h, N, Np).reshape(B * h, N, Np),
        q_scaled.reshape(B * h, N, d),
        k_pool.reshape(B * h, Np, d).transpose(-2, -1),
    ).reshape(B, h, N, Np)
    attn = torch.cat([attn_local, attn_pool], dim=-1).softmax(dim=-1)
    attn = F.dropout(attn, attn_drop, training)
    attn_local, attn_pool = torch.split(attn, [L, Np], dim=-1)
    weights = (attn_local + q @ learnable_tokens + learnable_bias).reshape(B, h, H, W, L)
    out = (attn_pool @ v_pool).reshape(B, h, H, W, d)
    for idx, (i, j) in enumerate(offsets):
        out = out + weights[..., idx : idx + 1] * v_pad[:, :, i : i + H, j : j + W]
    return out.reshape(B, h, N, d)


def full_attention(
    q_scaled: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    attn_drop: float = 0.0,
    training: bool = False,
) -> Tensor:
    return F.scaled_dot_product_attention(
        q_scaled, k, v, attn_mask=bias.to(q_scaled.dtype), dropout_p=attn_drop if training else 0.0, scale=1.0
    )
