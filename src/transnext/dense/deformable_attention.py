"""Multi-scale deformable attention (Deformable DETR), in plain PyTorch.

The sampling core is one stateless function, :func:`multi_scale_deformable_attention`, so that a
fused kernel can later replace it without touching the module. Sampling is bilinear with zero
padding and ``align_corners=False`` (``grid_sample``): a location ``(x, y)`` in ``[0, 1]`` addresses
the level's pixel centres at ``x * W - 0.5`` / ``y * H - 0.5``.

:class:`MultiScaleDeformableAttention` has the submodule names, parameter shapes and initialisation
of the attention module the published DINO / Mask2Former checkpoints were trained with, so their
weights load one to one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiScaleDeformableAttention", "multi_scale_deformable_attention", "spatial_shapes_list"]


def spatial_shapes_list(spatial_shapes: Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Return the level shapes as a list of ``(height, width)`` int pairs.

    Accepts a ``[L, 2]`` integer tensor or a sequence of pairs; raises ``ValueError`` on anything else.
    """
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.is_floating_point():
            raise ValueError(
                f"spatial_shapes must be an integer tensor of shape [levels, 2] (height, width), "
                f"got dtype {spatial_shapes.dtype} and shape {tuple(spatial_shapes.shape)}"
            )
        pairs = [tuple(int(v) for v in row) for row in spatial_shapes.tolist()]
    else:
        try:
            pairs = [tuple(int(v) for v in row) for row in spatial_shapes]
        except TypeError as error:
            raise ValueError(f"spatial_shapes must be a sequence of (height, width) pairs, got {spatial_shapes!r}") from error
    if not pairs or any(len(p) != 2 or p[0] < 1 or p[1] < 1 for p in pairs):
        raise ValueError(f"spatial_shapes must be one or more (height, width) pairs of positive ints, got {pairs}")
    return [(p[0], p[1]) for p in pairs]


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[Sequence[int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Weighted sum of bilinear samples of a multi-level value map.

    Args:
        value: ``[B, S, heads, head_dim]``, the levels flattened row-major and concatenated
            (``S = sum(H_l * W_l)``).
        spatial_shapes: ``[L, 2]`` integer tensor or list of ``(H_l, W_l)``.
        sampling_locations: ``[B, Q, heads, L, P, 2]`` normalised ``(x, y)`` in ``[0, 1]``
            (outside samples read zeros).
        attention_weights: ``[B, Q, heads, L, P]``.

    Returns:
        ``[B, Q, heads * head_dim]``.
    """
    shapes = spatial_shapes_list(spatial_shapes)
    if value.dim() != 4:
        raise ValueError(f"value must be [batch, keys, heads, head_dim], got shape {tuple(value.shape)}")
    batch, keys, heads, head_dim = value.shape
    if keys != sum(h * w for h, w in shapes):
        raise ValueError(f"value has {keys} keys but spatial_shapes {shapes} sum to {sum(h * w for h, w in shapes)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be [batch, queries, heads, levels, points, 2], got shape {tuple(sampling_locations.shape)}"
        )
    _, queries, _, levels, points, _ = sampling_locations.shape
    if sampling_locations.shape[0] != batch or sampling_locations.shape[2] != heads or levels != len(shapes):
        raise ValueError(
            f"sampling_locations shape {tuple(sampling_locations.shape)} does not match value (batch {batch}, heads {heads}) "
            f"and {len(shapes)} levels"
        )
    if tuple(attention_weights.shape) != (batch, queries, heads, levels, points):
        raise ValueError(
            f"attention_weights must have shape {(batch, queries, heads, levels, points)}, got {tuple(attention_weights.shape)}"
        )
    # grid_sample wants one dtype; autocast may have left the locations in float32.
    sampling_locations = sampling_locations.to(value.dtype)
    attention_weights = attention_weights.to(value.dtype)
    grids = 2.0 * sampling_locations - 1.0
    per_level = value.split([h * w for h, w in shapes], dim=1)
    samples = []
    for level, (height, width) in enumerate(shapes):
        # [B, HW, heads, D] -> [B*heads, D, H, W]
        value_l = per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width)
        # [B, Q, heads, P, 2] -> [B*heads, Q, P, 2]
        grid_l = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        samples.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [B*heads, D, Q, L*P] weighted over the last axis
    stacked = torch.stack(samples, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (stacked * weights).sum(-1).view(batch, heads * head_dim, queries)
    return out.transpose(1, 2).contiguous()


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention over several feature levels (Deformable DETR / DINO / Mask2Former).

    ``forward`` returns ``identity + dropout(output_proj(attention))``: the residual is inside, as in
    the reference detectors. Reference points are either ``[B, Q, L, 2]`` normalised centres
    (offsets are in pixels of each level) or ``[B, Q, L, 4]`` boxes ``(cx, cy, w, h)`` (offsets are
    fractions of half the box, divided by the number of points).
    """

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        dropout: float = 0.1,
        batch_first: bool = True,
    ) -> None:
        super().__init__()
        if embed_dims % num_heads != 0:
            raise ValueError(f"embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads})")
        for name, val in (("num_heads", num_heads), ("num_levels", num_levels), ("num_points", num_points)):
            if val < 1:
                raise ValueError(f"{name} must be >= 1, got {val}")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.batch_first = batch_first
        self.dropout = nn.Dropout(dropout)
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initial offsets point each head in its own direction, at 1..P steps; weights start uniform."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: Tensor,
        value: Tensor | None = None,
        identity: Tensor | None = None,
        query_pos: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        reference_points: Tensor | None = None,
        spatial_shapes: Tensor | Sequence[Sequence[int]] | None = None,
        level_start_index: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``query`` ``[B, Q, C]`` to ``value`` ``[B, S, C]`` (``[Q, B, C]`` if not batch_first).

        ``key_padding_mask`` ``[B, S]`` is True at padded keys (their values are zeroed).
        ``level_start_index`` is accepted for interface compatibility; the shapes define the split.
        """
        del level_start_index
        if reference_points is None or spatial_shapes is None:
            raise ValueError("MultiScaleDeformableAttention needs reference_points and spatial_shapes")
        shapes = spatial_shapes_list(spatial_shapes)
        if len(shapes) != self.num_levels:
            raise ValueError(f"spatial_shapes has {len(shapes)} levels, the module was built for {self.num_levels}")
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query = query.transpose(0, 1)
            value = value.transpose(0, 1)
        if query.dim() != 3 or query.shape[-1] != self.embed_dims:
            raise ValueError(f"query must be [batch, queries, {self.embed_dims}], got shape {tuple(query.shape)}")
        batch, num_query, _ = query.shape
        num_value = value.shape[1]
        value = self.value_proj(value)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (batch, num_value):
                raise ValueError(f"key_padding_mask must be [batch, keys] = {(batch, num_value)}, got {tuple(key_padding_mask.shape)}")
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(batch, num_value, self.num_heads, -1)
        offsets = self.sampling_offsets(query).view(batch, num_query, self.num_heads, self.num_levels, self.num_points, 2)
        weights = self.attention_weights(query).view(batch, num_query, self.num_heads, self.num_levels * self.num_points)
        weights = weights.softmax(-1).view(batch, num_query, self.num_heads, self.num_levels, self.num_points)
        if reference_points.dim() != 4 or reference_points.shape[:3] != (batch, num_query, self.num_levels):
            raise ValueError(
                f"reference_points must be [batch, queries, levels, 2 or 4] = [{batch}, {num_query}, {self.num_levels}, 2|4], "
                f"got shape {tuple(reference_points.shape)}"
            )
        if reference_points.shape[-1] == 2:
            normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.num_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(f"reference_points' last dimension must be 2 (points) or 4 (boxes), got {reference_points.shape[-1]}")
        output = self.output_proj(multi_scale_deformable_attention(value, shapes, locations, weights))
        if not self.batch_first:
            output = output.transpose(0, 1)
        return self.dropout(output) + identity
