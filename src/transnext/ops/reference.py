"""Reference backend: the plain unfold formulation of Aggregated Attention (docs/model.md section 4).

Kept deliberately straightforward: it is the baseline every other backend is tested and
benchmarked against, so it must stay a faithful, unoptimised transcription of the paper's
formulation (normalise, scale, unfold keys and values into windows, one softmax).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import AttentionInputs, Geometry, QueryScaling, WindowTerms


def _scaled_query(q_norm: Tensor, query_embedding: Tensor, temperature: Tensor, length_scale: float | Tensor) -> Tensor:
    return (q_norm + query_embedding) * F.softplus(temperature) * length_scale


def aggregated_attention(inputs: AttentionInputs, scaling: QueryScaling, terms: WindowTerms, bias: Tensor,
                         geometry: Geometry, attn_drop: float = 0.0, training: bool = False) -> Tensor:
    """The paper's formulation on whole tensors; ``bias`` is the whole (h, N, Np) pooled-key bias."""
    q, k, v, k_pool, v_pool = inputs
    query_embedding, temperature, length_scale = scaling
    local_bias, learnable_tokens, learnable_bias, padding_mask = terms
    pool_bias = bias
    size, window = geometry
    B, h, N, d = q.shape
    H, W = size
    L = window * window
    Np = k_pool.shape[2]
    q_norm = F.normalize(q, dim=-1)
    q_scaled = _scaled_query(q_norm, query_embedding, temperature, length_scale)
    k = F.normalize(k, dim=-1)
    k_pool = F.normalize(k_pool, dim=-1)

    # Unfold normalised keys and values into (B, h, N, d, L) windows: 9x copies of k and v.
    kv_map = torch.cat([k, v], dim=1).transpose(-1, -2).reshape(B, 2 * h * d, H, W)
    unfolded = F.unfold(kv_map, window, padding=window // 2, stride=1)
    k_local, v_local = unfolded.reshape(B, 2 * h, d, L, N).permute(0, 1, 4, 2, 3).chunk(2, dim=1)

    attn_local = (q_scaled.unsqueeze(-2) @ k_local).squeeze(-2) + local_bias.unsqueeze(1)
    attn_local = attn_local.masked_fill(padding_mask, float("-inf"))
    attn_pool = q_scaled @ k_pool.transpose(-2, -1) + pool_bias

    attn = torch.cat([attn_local, attn_pool], dim=-1).softmax(dim=-1)
    attn = F.dropout(attn, attn_drop, training)
    attn_local, attn_pool = torch.split(attn, [L, Np], dim=-1)

    weights = q_norm @ learnable_tokens + learnable_bias + attn_local
    x_local = (weights.unsqueeze(-2) @ v_local.transpose(-2, -1)).squeeze(-2)
    return x_local + attn_pool @ v_pool


def full_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    query_embedding: Tensor,
    temperature: Tensor,
    length_scale: float | Tensor,
    bias: Tensor,
    attn_drop: float = 0.0,
    training: bool = False,
) -> Tensor:
    q_scaled = _scaled_query(F.normalize(q, dim=-1), query_embedding, temperature, length_scale)
    attn = (q_scaled @ F.normalize(k, dim=-1).transpose(-2, -1) + bias).softmax(dim=-1)
    attn = F.dropout(attn, attn_drop, training)
    return attn @ v
