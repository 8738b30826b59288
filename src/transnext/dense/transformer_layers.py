"""Transformer building blocks shared by the DINO and Mask2Former heads.

The submodule names (``conv`` / ``gn``, ``layers.0.0`` / ``layers.1``, ``attn`` / ``proj_drop``,
``self_attn`` / ``ffn`` / ``norms``) are the reference's, so converted mmdet checkpoints load by name.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .deformable_attention import MultiScaleDeformableAttention

__all__ = ["Attention", "ConvGN", "DeformableEncoderLayer", "FFN"]


class ConvGN(nn.Module):
    """Conv + GroupNorm (+ ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = False,
                 relu: bool = False, groups: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=bias)
        self.gn = nn.GroupNorm(groups, out_channels)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.gn(self.conv(x))
        return F.relu(x) if self.relu else x


class FFN(nn.Module):
    """``x + Linear(Dropout(ReLU(Linear(x))))`` with dropouts."""

    def __init__(self, dims: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dims, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)),
                                    nn.Linear(hidden, dims), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layers(x)


class Attention(nn.Module):
    """Multi-head attention with position terms on query and key (not values) and the residual inside.

    Without ``key`` it is self-attention: keys and values are the queries, the keys with ``query_pos``.
    """

    def __init__(self, dims: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dims, num_heads, dropout=dropout, batch_first=True)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None, query_pos: Tensor | None = None,
                key_pos: Tensor | None = None, attn_mask: Tensor | None = None) -> Tensor:
        if key is None:
            key, value, key_pos = query, query, query_pos
        q = query if query_pos is None else query + query_pos
        k = key if key_pos is None else key + key_pos
        out = self.attn(q, k, key if value is None else value, attn_mask=attn_mask, need_weights=False)[0]
        return query + self.proj_drop(out)


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels (values: the un-positioned queries), then the FFN; post-norm."""

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int, ffn_dims: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(embed_dims, num_heads, num_levels, num_points, dropout)
        self.ffn = FFN(embed_dims, ffn_dims, dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(2))

    def forward(self, query: Tensor, query_pos: Tensor, reference_points: Tensor, spatial_shapes: list[tuple[int, int]],
                key_padding_mask: Tensor | None = None) -> Tensor:
        query = self.self_attn(query, query_pos=query_pos, key_padding_mask=key_padding_mask, reference_points=reference_points,
                               spatial_shapes=spatial_shapes)
        return self.norms[1](self.ffn(self.norms[0](query)))
