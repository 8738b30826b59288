"""Attention weights of Aggregated Attention for chosen query pixels: fovea and periphery.

Each query token attends, under one softmax, to the 3x3 window around it (the fovea: fine,
local keys) and to the pooled keys (the periphery: one key per cell of a coarse grid over the
whole image). The weights are recomputed here from the layer's own parameters and its captured
input, in float64, following the layer's definition step by step, so they are the weights the
layer applies (a test rebuilds the layer's output from them).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AttentionMaps", "attention_maps", "attention_layer", "query_grid"]

Pixel = tuple[int, int]


@dataclass
class AttentionMaps:
    """Weights of one layer for Q query pixels of one image (batch of 1).

    * ``local`` (Q, h, w, w): softmax weights of the window slots, row-major (dy, dx); 0 on slots
      outside the feature map;
    * ``local_learnable`` (Q, h, w, w): the query-dependent learnable-token term
      ``q_hat . learnable_tokens + learnable_bias`` that the layer adds to ``local`` (0 outside);
    * ``pooled`` (Q, h, Hp, Wp): softmax weights of the pooled keys.

    ``local + pooled`` sum to 1 per query and head. Positions: ``tokens`` (Q, 2) are the query
    tokens on the ``grid`` = (H, W) feature map, whose token (r, c) covers input pixels
    ``[r*stride, (r+1)*stride) x [c*stride, (c+1)*stride)``; pooled cell (i, j) covers the
    adaptive-pooling bin ``[floor(i*H/Hp), ceil((i+1)*H/Hp))`` of rows (and likewise columns).
    """

    queries: list[Pixel]
    tokens: Tensor
    local: Tensor
    local_learnable: Tensor
    pooled: Tensor
    grid: tuple[int, int]
    pool: tuple[int, int]
    stride: int
    image_size: tuple[int, int]
    stage: int
    block: int

    @property
    def num_heads(self) -> int:
        return self.local.shape[1]

    @property
    def window(self) -> int:
        return self.local.shape[-1]

    def fovea_mass(self) -> Tensor:
        """(Q, h) share of the softmax weight on the local window."""
        return self.local.sum(dim=(-2, -1))

    def _heads(self, t: Tensor, head: int | None) -> Tensor:
        if head is None:
            return t.mean(dim=1)
        if not -self.num_heads <= head < self.num_heads:
            raise ValueError(f"head {head} is out of range: the layer has {self.num_heads} heads, valid: 0..{self.num_heads - 1}")
        return t[:, head]

    def fovea_grid(self, query: int = 0, head: int | None = None) -> Tensor:
        """(H, W) weights on the feature-map grid: the window weights at their tokens (head mean by default)."""
        w = self.window
        r = w // 2
        out = torch.zeros(self.grid, dtype=self.local.dtype)
        weights = self._heads(self.local[query : query + 1], head)[0]
        ty, tx = (int(v) for v in self.tokens[query])
        for dy in range(w):
            for dx in range(w):
                y, x = ty + dy - r, tx + dx - r
                if 0 <= y < self.grid[0] and 0 <= x < self.grid[1]:
                    out[y, x] = weights[dy, dx]
        return out

    def periphery_grid(self, query: int = 0, head: int | None = None) -> Tensor:
        """(H, W) pooled weights spread evenly over the tokens of their cells (so the sum is kept)."""
        weights = self._heads(self.pooled[query : query + 1], head)[0]
        out = torch.zeros(self.grid, dtype=weights.dtype)
        (H, W), (Hp, Wp) = self.grid, self.pool
        for i in range(Hp):
            y0, y1 = (i * H) // Hp, -((-(i + 1) * H) // Hp)
            for j in range(Wp):
                x0, x1 = (j * W) // Wp, -((-(j + 1) * W) // Wp)
                out[y0:y1, x0:x1] += weights[i, j] / ((y1 - y0) * (x1 - x0))
        return out

    def to_image(self, grid_map: Tensor) -> Tensor:
        """A feature-map grid (H, W) as weight per input pixel (image size), each token over its stride x stride patch."""
        s = self.stride
        up = grid_map.repeat_interleave(s, 0).repeat_interleave(s, 1) / (s * s)
        Hi, Wi = self.image_size
        out = torch.zeros(Hi, Wi, dtype=up.dtype)
        h, w = min(Hi, up.shape[0]), min(Wi, up.shape[1])
        out[:h, :w] = up[:h, :w]
        return out


def query_grid(image_size: tuple[int, int], n: int) -> list[Pixel]:
    """``n`` x ``n`` query pixels evenly spaced over the image (cell centres)."""
    if n < 1:
        raise ValueError(f"the query grid needs n >= 1, got {n}")
    H, W = image_size
    return [(int((i + 0.5) * H / n), int((j + 0.5) * W / n)) for i in range(n) for j in range(n)]


def attention_layer(model: nn.Module, stage: int, block: int) -> tuple[nn.Module, int, int]:
    """The Aggregated Attention module of ``block`` in ``stage`` (0-based, negatives count from the end)."""
    from ..models.transnext import AggregatedAttention, TransNeXt

    if not isinstance(model, TransNeXt):
        raise TypeError(f"attention maps need a transnext model, got {type(model).__name__}")
    n = model.num_stages
    aggregated = [i for i in range(n) if model.sr_ratios[i] > 1]
    if not -n <= stage < n:
        raise ValueError(f"stage {stage} is out of range: the model has {n} stages, valid: 0..{n - 1}; "
                         f"aggregated attention is in stages {_ranges(aggregated)}")
    stage %= n
    if stage not in aggregated:
        raise ValueError(f"stage {stage} uses full attention (sr_ratio 1), not aggregated attention; "
                         f"aggregated attention is in stages {_ranges(aggregated)}")
    blocks = getattr(model, f"block{stage + 1}")
    depth = len(blocks)
    if not -depth <= block < depth:
        raise ValueError(f"block {block} is out of range for stage {stage}: it has {depth} blocks, valid: 0..{depth - 1}")
    block %= depth
    attn = blocks[block].attn
    assert isinstance(attn, AggregatedAttention)
    return attn, stage, block


def _ranges(stages: list[int]) -> str:
    if not stages:
        return "none"
    return f"{stages[0]}..{stages[-1]}" if stages == list(range(stages[0], stages[-1] + 1)) else ", ".join(map(str, stages))


@torch.no_grad()
def attention_maps(
    model: nn.Module,
    image: Tensor,
    queries: Sequence[Pixel],
    stage: int = 0,
    block: int = -1,
) -> AttentionMaps:
    """Fovea and periphery weights of one Aggregated Attention layer for query pixels of ``image``.

    ``image``: a normalised (3, H, W) or (1, 3, H, W) tensor, any size the model accepts (also in
    linear mode, ``fixed_pool_size``). ``queries``: (y, x) input pixels.
    """
    attn, stage, block = attention_layer(model, stage, block)
    x = image.unsqueeze(0) if image.ndim == 3 else image
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image, (3, H, W) or (1, 3, H, W), got shape {tuple(image.shape)}")
    Hi, Wi = int(x.shape[-2]), int(x.shape[-1])
    if not queries:
        raise ValueError("no query pixels given")
    for y, xq in queries:
        if not (0 <= y < Hi and 0 <= xq < Wi):
            raise ValueError(f"query pixel (y={y}, x={xq}) is outside the {Hi}x{Wi} image: y must be in 0..{Hi - 1}, x in 0..{Wi - 1}")

    captured: dict = {}

    def hook(module, args, output):
        captured["args"] = args

    model.eval()
    param = next(model.parameters())
    handle = attn.register_forward_hook(hook)
    try:
        model.forward_intermediates(x.to(device=param.device, dtype=param.dtype), indices=[stage], intermediates_only=True)
    finally:
        handle.remove()
    tokens_in, H, W, geom = captured["args"]
    stride = 2 ** (stage + 2)
    tokens = torch.tensor([[min(y // stride, H - 1), min(xq // stride, W - 1)] for y, xq in queries])
    local, learnable, pooled, pool = _weights(attn, tokens_in, (H, W), geom, tokens[:, 0] * W + tokens[:, 1])
    w = attn.window_size
    Q, h = local.shape[:2]
    return AttentionMaps(
        queries=[(int(y), int(xq)) for y, xq in queries], tokens=tokens,
        local=local.reshape(Q, h, w, w).cpu(), local_learnable=learnable.reshape(Q, h, w, w).cpu(),
        pooled=pooled.reshape(Q, h, *pool).cpu(), grid=(H, W), pool=pool, stride=stride,
        image_size=(Hi, Wi), stage=stage, block=block,
    )


def _weights(attn: nn.Module, x: Tensor, size: tuple[int, int], geom, index: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
    """(local softmax (Q, h, L), learnable-token term (Q, h, L), pooled softmax (Q, h, Np), pooled grid) in float64.

    ``x``: the layer input (1, N, C); ``index``: the query tokens (Q,). The only place that reads
    the stage geometry (pooled grid, length scale, padding mask, position bias).
    """
    layer = copy.deepcopy(attn).double()  # float64 without touching the model
    layer._bias_cache = {}
    x = x[0].double()
    N, C = x.shape
    H, W = size
    h, d = layer.num_heads, layer.head_dim
    w = layer.window_size
    L = w * w
    dev = x.device
    index = index.to(dev)

    q = layer.q(x[index]).reshape(-1, h, d)  # (Q, h, d)
    k = layer.kv(x).reshape(N, 2, h, d)[:, 0]  # (N, h, d)
    pooled = F.adaptive_avg_pool2d(layer.act(layer.sr(x.t().reshape(1, C, H, W))), geom.pool).flatten(2)[0].t()
    k_pool = layer.kv(layer.norm(pooled)).reshape(-1, 2, h, d)[:, 0]  # (Np, h, d)

    q_hat = F.normalize(q, dim=-1)
    scale = geom.length_scale(torch.float64, dev)[index]  # (Q, 1): ln(valid local keys + Np)
    q_scaled = (q_hat + layer.query_embedding[:, 0]) * F.softplus(layer.temperature)[:, 0] * scale[:, :, None]
    k_hat, k_pool_hat = F.normalize(k, dim=-1), F.normalize(k_pool, dim=-1)

    # Window neighbours of each query token, row-major (dy, dx); slots outside the map are masked.
    r = w // 2
    ty, tx = index // W, index % W
    offsets = torch.arange(-r, r + 1, device=dev)
    ny = (ty[:, None, None] + offsets[None, :, None]).expand(-1, w, w).reshape(-1, L)
    nx = (tx[:, None, None] + offsets[None, None, :]).expand(-1, w, w).reshape(-1, L)
    outside = geom.padding_mask(dev)[index]  # (Q, L) True where the slot is padding
    neighbours = (ny.clamp(0, H - 1) * W + nx.clamp(0, W - 1))  # clamped only to index; masked below

    logits_local = torch.einsum("qhd,qlhd->qhl", q_scaled, k_hat[neighbours]) + layer.relative_pos_bias_local
    logits_local = logits_local.masked_fill(outside[:, None, :], float("-inf"))
    bias = layer.position_bias(geom, torch.float64, dev)  # (h, N, Np), or its factors on large grids
    if not isinstance(bias, torch.Tensor):
        bias = bias.materialize()
    logits_pool = torch.einsum("qhd,phd->qhp", q_scaled, k_pool_hat) + bias[:, index].transpose(0, 1)
    probs = torch.cat([logits_local, logits_pool], dim=-1).softmax(dim=-1)
    local, pooled_w = probs[..., :L], probs[..., L:]

    learnable = torch.einsum("qhd,hdl->qhl", q_hat, layer.learnable_tokens) + layer.learnable_bias[:, 0]
    learnable = learnable.masked_fill(outside[:, None, :], 0.0)  # padded slots carry zero values
    return local, learnable, pooled_w, (int(geom.pool[0]), int(geom.pool[1]))
