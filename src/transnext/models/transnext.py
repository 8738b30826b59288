"""TransNeXt: Robust Foveal Visual Perception for Vision Transformers (Dai Shi, CVPR 2024).

One model definition for classification and dense prediction. Module and parameter names follow
the published checkpoints (``patch_embed{n}``, ``block{n}.{j}``, ``norm{n}``, ``head``), so those
load without renaming. Every size-dependent table is computed from the actual input size at run
time (see :mod:`transnext.models.geometry`), in one of three position-bias modes:

* ``"extrapolate"``: the bias MLP is evaluated on the actual grid, coordinates normalised by the
  pretraining grid;
* ``"interpolate"``: the bias is evaluated on the ``img_size`` grid and resized bilinearly;
* ``fixed_pool_size=P`` (either mode): linear inference mode, a fixed PxP pooled key grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .. import ops
from .geometry import GeometryTables, ResolutionPlan, StageGeometry
from .position_bias import BlockwiseBias, SeparableBias, gather_bias

__all__ = ["TransNeXt", "AggregatedAttention", "FullAttention", "ConvGLU", "Block", "PatchEmbed"]

PosBias = Literal["extrapolate", "interpolate"]
Size = tuple[int, int]


def _pair(v: int | Sequence[int]) -> Size:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(i) for i in v)
    if len(v) != 2:
        raise ValueError(f"expected an int or an (H, W) pair, got {v}")
    return v


def _fx_tracing() -> bool:
    """True while torch.fx symbolically traces the model (proxies stand in for tensors and sizes)."""
    return ops.capture_mode() == "fx"


def _is_tracing() -> bool:
    """True while a graph is captured for torch.compile or export (tables are constants of the graph)."""
    return ops.capture_mode() in ("compile", "export")


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: strided Conv2d, then LayerNorm (eps 1e-5) over channels."""

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size, stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        # A channels-last input makes the conv output channels-last, so the tokens below are a
        # dense view and the LayerNorm needs no transposing copy (later stages already are).
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.proj(x)
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class DWConv(nn.Module):
    """3x3 depthwise convolution on a token sequence laid out over an HxW grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        B, N, C = x.shape
        # (B, N, C) tokens are a channels-last (B, C, H, W) map: a view, no copy.
        x = self.dwconv(x.transpose(1, 2).reshape(B, C, H, W))
        return x.flatten(2).transpose(1, 2)


class ConvGLU(nn.Module):
    """Convolutional GLU: fc1 -> [gate | value]; fc2(GELU(dwconv(gate)) * value)."""

    def __init__(self, dim: int, mlp_ratio: float, drop: float = 0.0, attn_backend: str | None = None) -> None:
        super().__init__()
        self.attn_backend = attn_backend  # the model's ops backend (the name is shared with the attention layers)
        hidden = int(2 * int(dim * mlp_ratio) / 3)
        self.fc1 = nn.Linear(dim, hidden * 2)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        if self._fusable():
            # One op that recomputes the cheap middle in backward (see transnext.ops.conv_glu).
            return ops.conv_glu(
                x, self.fc1.weight, self.fc1.bias, self.dwconv.dwconv.weight, self.dwconv.dwconv.bias,
                self.fc2.weight, self.fc2.bias, (H, W), self.drop.p, self.training, self.attn_backend,
            )
        gate, value = self.fc1(x).chunk(2, dim=-1)
        x = self.drop(self.act(self.dwconv(gate, H, W)) * value)
        return self.drop(self.fc2(x))

    def _fusable(self) -> bool:
        """The fused op applies to the stock layers only (not to wrapped or hooked ones)."""
        mods = (self.fc1, self.fc2, self.dwconv.dwconv, self.act)
        return (
            type(self.fc1) is nn.Linear and type(self.fc2) is nn.Linear and type(self.dwconv) is DWConv
            and type(self.dwconv.dwconv) is nn.Conv2d and type(self.act) is nn.GELU and self.act.approximate == "none"
            and not any(m._forward_hooks or m._forward_pre_hooks for m in mods)
        )


class _CosineAttentionBase(nn.Module):
    """Shared parts: temperature, query embedding and the continuous position bias MLP."""

    cpb_fc1: nn.Linear
    cpb_fc2: nn.Linear

    def _init_shared(self, dim: int, num_heads: int) -> None:
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # softplus(temperature) = 1 / 0.24 at initialisation
        self.temperature = nn.Parameter(torch.log((torch.ones(num_heads, 1, 1) / 0.24).exp() - 1))
        self.query_embedding = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_heads, 1, self.head_dim), std=0.02))
        self._bias_cache: dict = {}

    def _bias_params(self) -> tuple[Tensor, ...]:
        return (self.cpb_fc1.weight, self.cpb_fc1.bias, self.cpb_fc2.weight, self.cpb_fc2.bias)

    def _bias_problem(self, geom: StageGeometry, dtype: torch.dtype, device: torch.device, keys: int,
                      window: int) -> ops.AttentionProblem:
        """This layer's attention problem for one image, as far as the bias alone tells (for a bias
        asked for outside a forward pass)."""
        return ops.AttentionProblem(
            op="aggregated_attention" if window else "full_attention",
            backend=ops.resolve_backend(getattr(self, "attn_backend", None), device.type), device=device.type,
            dtype=dtype, grad=torch.is_grad_enabled() and any(p.requires_grad for p in self._bias_params()),
            capture=ops.capture_mode(), autocast=False, dropout=False, batch=1, heads=self.num_heads,
            tokens=geom.num_tokens, keys=keys, head_dim=self.head_dim, window=window, bias_dtype=dtype,
        )

    def _bias_table(self, geom: StageGeometry, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """The bias MLP on every unique (dy, dx) pair: (h, Uy, Ux), with the per-axis pair indices."""
        coords, index_y, index_x = geom.cpb_inputs(dtype, device)
        rows = ops.current_policy().bias_mlp_rows
        fc1, fc2 = self.cpb_fc1, self.cpb_fc2
        plain_layers = type(fc1) is nn.Linear and type(fc2) is nn.Linear and fc1.bias is not None and fc2.bias is not None
        if coords.shape[0] <= rows or _is_tracing():
            table = self.cpb_fc2(F.relu(self.cpb_fc1(coords)))  # (Uy*Ux, h)
        elif plain_layers and ops.autocast_dtype(coords) is None:
            # Many pairs (dense sizes; linear mode at 2048 px: ~10^6): in chunks of pairs, so no 512-wide
            # hidden activation is held for all of them; in training backward recomputes each chunk's.
            table = ops.bias_mlp(coords, fc1.weight, fc1.bias, fc2.weight, fc2.bias, rows)
        elif torch.is_grad_enabled():
            table = self.cpb_fc2(F.relu(self.cpb_fc1(coords)))
        else:
            table = torch.cat([self.cpb_fc2(F.relu(self.cpb_fc1(c))) for c in coords.split(rows)])
        uy, ux = geom.cpb.y.values.numel(), geom.cpb.x.values.numel()
        return table.t().reshape(self.num_heads, uy, ux), index_y, index_x

    def _key_resized_bias(self, geom: StageGeometry, table: Tensor, index_y: Tensor, index_x: Tensor) -> Tensor:
        """Interpolate mode, first half: trained-grid bias resized over the key axes, (h, Qh0*Qw0, Nk)."""
        (qh, kh), (qw, kw) = index_y.shape, index_x.shape
        bias = gather_bias(table, index_y, index_x).reshape(self.num_heads, qh * qw, kh, kw)
        bias = F.interpolate(bias, size=geom.key_size, mode="bilinear", align_corners=False)
        return bias.reshape(self.num_heads, qh * qw, geom.num_keys)

    def _compute_position_bias(self, geom: StageGeometry, dtype: torch.dtype, device: torch.device) -> Tensor:
        table, index_y, index_x = self._bias_table(geom, dtype, device)
        if not geom.interpolate:
            return gather_bias(table, index_y, index_x)
        # Trained-grid bias resized to the actual grid: key axes first, then query axes.
        H, W = geom.size
        qh, qw = index_y.shape[0], index_x.shape[0]
        bias = self._key_resized_bias(geom, table, index_y, index_x)
        bias = bias.reshape(self.num_heads, qh, qw, geom.num_keys).permute(0, 3, 1, 2)
        bias = F.interpolate(bias, size=(H, W), mode="bilinear", align_corners=False)
        return bias.reshape(self.num_heads, geom.num_keys, H * W).transpose(1, 2)

    def position_bias(self, geom: StageGeometry, dtype: torch.dtype, device: torch.device) -> Tensor | BlockwiseBias:
        """(h, N, Nk) bias; cached per size while the MLP cannot change (no grad, same weights).

        Full attention on large grids returns a :class:`BlockwiseBias` instead (same values,
        produced per block of queries by the attention op).
        """
        return self._cached(geom, dtype, device, "bias", self._compute_position_bias)

    def _cached(self, geom: StageGeometry, dtype: torch.dtype, device: torch.device, kind: str, compute):
        """``compute(geom, dtype, device)``, cached per size while the bias MLP cannot change."""
        params = self._bias_params()
        if _is_tracing() or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return compute(geom, dtype, device)
        # The version counters change on every in-place update (optimizer step, load_state_dict).
        key = (kind, geom.size, geom.key_size, geom.interpolate, geom.cpb.query, geom.cpb.key, dtype, device,
               tuple((p.data_ptr(), p._version) for p in params))
        value = self._bias_cache.get(key)
        if value is None:
            self._bias_cache.clear()  # one size at a time: keeps memory bounded
            value = self._bias_cache[key] = compute(geom, dtype, device)
        return value


class AggregatedAttention(_CosineAttentionBase):
    """Pixel-focused local window attention and pooled global keys under one softmax."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 3,
        sr_ratio: int = 2,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_backend: str | None = None,
    ) -> None:
        super().__init__()
        if window_size % 2 != 1:
            raise ValueError(f"window_size must be odd, got {window_size}")
        self._init_shared(dim, num_heads)
        self.window_size = window_size
        self.sr_ratio = sr_ratio
        self.local_len = window_size**2
        self.attn_backend = attn_backend
        self.relative_pos_bias_local = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(num_heads, self.local_len), std=0.0004)
        )
        self.learnable_tokens = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(num_heads, self.head_dim, self.local_len), std=0.02)
        )
        self.learnable_bias = nn.Parameter(torch.zeros(num_heads, 1, self.local_len))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU()
        self.cpb_fc1 = nn.Linear(2, 512, bias=True)
        self.cpb_fc2 = nn.Linear(512, num_heads, bias=True)

    def position_bias(self, geom: StageGeometry, dtype: torch.dtype, device: torch.device,
                      factored: bool | None = None) -> Tensor | SeparableBias:
        """The (h, N, Np) pooled-key bias, or with ``factored`` its factors (:class:`SeparableBias`):
        the bias MLP on unique pairs (cached, small) and per-axis taps, from which the attention op
        produces the bias a block of query rows at a time. ``None``: factors where the kernel choice
        for this layer wants them (past ``KernelPolicy.aggregated_bias_bytes*``)."""
        if factored is None:
            factored = ops.wants_factored_bias(self._bias_problem(geom, dtype, device, geom.num_keys, self.window_size))
        if not factored:
            return super().position_bias(geom, dtype, device)
        table = self._cached(geom, dtype, device, "mlp", lambda g, dt, dev: self._bias_table(g, dt, dev)[0])
        y_taps, x_taps = geom.bias_taps(dtype, device)
        return SeparableBias.from_mlp_table(table, y_taps, x_taps)

    def forward(self, x: Tensor, H: int, W: int, geom: StageGeometry) -> Tensor:
        chunks = ops.attention_chunks(x, (H, W), self.attn_backend)
        if chunks is None:
            return self._forward(x, H, W, geom)
        # Inference: groups of images, so transient buffers stay small (same result).
        out = None
        for b0, b1, _, _ in chunks:
            res = self._forward(x[b0:b1], H, W, geom)
            if out is None:
                out = res.new_empty((x.shape[0],) + res.shape[1:])
            out[b0:b1] = res
        return out

    def _forward(self, x: Tensor, H: int, W: int, geom: StageGeometry) -> Tensor:
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        # (B, h, N, d) views of the projections: the ops normalise and lay them out as they need.
        q = self.q(x).reshape(B, N, h, d).transpose(1, 2)
        kv = self.kv(x).reshape(B, N, 2, h, d)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

        if type(self.sr) is nn.Conv2d and type(self.act) is nn.GELU and self.act.approximate == "none":
            pooled = ops.sr_gelu_pool(x, self.sr.weight, self.sr.bias, (H, W), geom.pool, self.attn_backend)
        else:  # wrapped or replaced layers: plain module calls
            pooled = F.adaptive_avg_pool2d(self.act(self.sr(x.transpose(1, 2).reshape(B, C, H, W))), geom.pool)
            pooled = pooled.flatten(2).transpose(1, 2)
        pooled = self.norm(pooled)
        Np = pooled.shape[1]
        kv_pool = self.kv(pooled).reshape(B, Np, 2, h, d)
        k_pool, v_pool = kv_pool[:, :, 0].transpose(1, 2), kv_pool[:, :, 1].transpose(1, 2)

        inputs = ops.AttentionInputs(q, k, v, k_pool, v_pool)
        scaling = ops.QueryScaling(self.query_embedding, self.temperature, geom.length_scale(x.dtype, x.device))
        terms = ops.WindowTerms(self.relative_pos_bias_local, self.learnable_tokens, self.learnable_bias,
                                geom.padding_mask(x.device))
        geometry = ops.Geometry((H, W), self.window_size)
        # The kernel choice says whether the bias is wanted as factors (large grids, a kernel that takes them).
        problem = ops.aggregated_problem(inputs, scaling, terms, None, geometry, self.attn_drop, self.training,
                                         self.attn_backend, extra_grad=self._bias_params(), bias_dtype=x.dtype)
        bias = self.position_bias(geom, x.dtype, x.device, factored=ops.wants_factored_bias(problem))
        out = ops.aggregated_attention(
            q, k, v, k_pool, v_pool, self.query_embedding, self.temperature, scaling.length_scale,
            self.relative_pos_bias_local, bias, self.learnable_tokens, self.learnable_bias, terms.padding_mask,
            (H, W), self.window_size, self.attn_drop, self.training, self.attn_backend,
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class FullAttention(_CosineAttentionBase):
    """Multi-head cosine attention over all tokens (stages with sr_ratio 1)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_backend: str | None = None,
    ) -> None:
        super().__init__()
        self._init_shared(dim, num_heads)
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.cpb_fc1 = nn.Linear(2, 512, bias=True)
        self.cpb_fc2 = nn.Linear(512, num_heads, bias=True)

    def _compute_position_bias(
        self, geom: StageGeometry, dtype: torch.dtype, device: torch.device, factored: bool = False
    ) -> Tensor | BlockwiseBias:
        if not factored:
            return super()._compute_position_bias(geom, dtype, device)
        # h * N^2 values at once would be gigabytes at dense sizes: keep only the small tables (memory
        # linear in pixels); the attention op produces the bias per block of queries.
        table, index_y, index_x = self._bias_table(geom, dtype, device)
        if not geom.interpolate:
            return BlockwiseBias(geom.size, table, index_y, index_x)
        bias = self._key_resized_bias(geom, table, index_y, index_x)
        return BlockwiseBias(geom.size, bias.reshape(self.num_heads, index_y.shape[0], index_x.shape[0], -1))

    def position_bias(self, geom: StageGeometry, dtype: torch.dtype, device: torch.device,
                      factored: bool | None = None) -> Tensor | BlockwiseBias:
        """(h, N, N) bias, or with ``factored`` a :class:`BlockwiseBias` (same values, produced per
        block of queries by the attention op); cached while the MLP cannot change. ``None``: blockwise
        where the kernel choice for this layer wants it (past ``KernelPolicy.full_bias_bytes``)."""
        if factored is None:
            factored = ops.wants_factored_bias(self._bias_problem(geom, dtype, device, geom.num_tokens, 0))
        kind = "blockwise" if factored else "bias"
        return self._cached(geom, dtype, device, kind, lambda g, dt, dev: self._compute_position_bias(g, dt, dev, factored))

    def forward(self, x: Tensor, H: int, W: int, geom: StageGeometry) -> Tensor:
        B, N, C = x.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        # The kernel choice says whether the bias is wanted per block of queries (large grids).
        problem = ops.full_problem(q, (k, v, self.query_embedding, self.temperature), None, self.attn_drop, self.training,
                                   self.attn_backend, extra_grad=self._bias_params(), bias_dtype=x.dtype)
        bias = self.position_bias(geom, x.dtype, x.device, factored=ops.wants_factored_bias(problem))
        out = ops.full_attention(
            q, k, v, self.query_embedding, self.temperature, geom.length_scale(x.dtype, x.device),
            bias, self.attn_drop, self.training, self.attn_backend,
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """Pre-norm transformer block: token mixer, then Convolutional GLU."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        window_size: int | None,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        attn_backend: str | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if sr_ratio > 1:
            self.attn = AggregatedAttention(
                dim, num_heads, window_size or 3, sr_ratio, qkv_bias, attn_drop, drop, attn_backend
            )
        else:
            self.attn = FullAttention(dim, num_heads, qkv_bias, attn_drop, drop, attn_backend)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvGLU(dim, mlp_ratio, drop, attn_backend)

    def forward(self, x: Tensor, H: int, W: int, geom: StageGeometry) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W, geom))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class StageOutput(nn.Module):
    """A stage's normed tokens (B, H*W, C) as its NCHW feature map (a view).

    Parameter-free; a module so that feature extraction by module name (timm's ``feature_info``,
    FX) returns the maps.
    """

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        # A channels-last view (also for a batch of one), so the next conv does not copy it.
        return x.unflatten(1, (H, W)).permute(0, 3, 1, 2)


class TransNeXt(nn.Module):
    """TransNeXt backbone and classifier; accepts any input size at run time.

    Args:
        img_size: reference size: the grid of the position bias in ``"interpolate"`` mode and the
            default input size of the pretrained config. Inputs of any size are accepted.
        pretrain_size: size the position-bias coordinates are normalised by (defaults to
            ``img_size``; 224 for the 384 fine-tunes).
        pos_bias: ``"extrapolate"`` or ``"interpolate"`` (see module docstring).
        fixed_pool_size: linear inference mode with a fixed PxP pooled grid (``None``: off).
        attn_backend: ops backend name (``"auto"``, ``"reference"``, ``"torch"``, ``"triton"``).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        pretrain_size: int | Sequence[int] | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        depths: Sequence[int] = (3, 4, 6, 3),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        window_size: Sequence[int | None] = (3, 3, 3, None),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        pos_bias: PosBias = "extrapolate",
        fixed_pool_size: int | None = None,
        attn_backend: str | None = None,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if attn_backend is not None:
            ops.resolve_backend(attn_backend, "cpu")  # validate the name early
        self.num_stages = len(depths)
        img = _pair(img_size)
        self.geometry = GeometryTables(ResolutionPlan(
            img_size=img, pretrain_size=_pair(pretrain_size) if pretrain_size is not None else img, pos_bias=pos_bias,
            fixed_pool_size=fixed_pool_size, sr_ratios=tuple(sr_ratios), windows=tuple(window_size),
        ))
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dims = tuple(embed_dims)
        self.sr_ratios = tuple(sr_ratios)
        self.window_size = tuple(window_size)
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dims[-1]
        self.grad_checkpointing = False

        total = sum(depths)
        # Plain arithmetic (not torch.linspace) so the constructor also runs on the meta device.
        dpr = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        cur = 0
        self.feature_info = []
        for i in range(self.num_stages):
            embed = PatchEmbed(
                in_chans if i == 0 else self.embed_dims[i - 1],
                self.embed_dims[i],
                kernel_size=7 if i == 0 else 3,
                stride=4 if i == 0 else 2,
            )
            blocks = nn.ModuleList(
                Block(
                    self.embed_dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i], window_size[i], qkv_bias,
                    drop_rate, attn_drop_rate, dpr[cur + j], attn_backend,
                )
                for j in range(depths[i])
            )
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", nn.LayerNorm(self.embed_dims[i], eps=1e-6))
            setattr(self, f"out{i + 1}", StageOutput())
            cur += depths[i]
            self.feature_info.append(
                dict(num_chs=self.embed_dims[i], reduction=2 ** (i + 2), module=f"out{i + 1}")
            )
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    # ------------------------------------------------------------------ initialisation
    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ sizes and tables
    # Every size rule lives in the ResolutionPlan (models/geometry.py); these delegate to it.
    @property
    def plan(self) -> ResolutionPlan:
        return self.geometry.plan

    @property
    def img_size(self) -> Size:
        return self.geometry.plan.img_size

    @property
    def pretrain_size(self) -> Size:
        return self.geometry.plan.pretrain_size

    @property
    def pos_bias(self) -> str:
        return self.geometry.plan.pos_bias

    @property
    def fixed_pool_size(self) -> int | None:
        return self.geometry.plan.fixed_pool_size

    def stage_grids(self, size: Size) -> list[Size]:
        """Feature-map size of each stage for an input of ``size`` = (H, W)."""
        return self.geometry.plan.stage_grids(size)

    def min_input_size(self) -> int:
        """Smallest square input every stage accepts."""
        return self.geometry.plan.min_input_size

    def check_input_size(self, size: Size) -> None:
        """Raise ValueError with the reason if an input of ``size`` cannot run."""
        self.geometry.plan.check(tuple(size))

    def stage_geometry(self, stage: int, grid: Size) -> StageGeometry:
        return self.geometry(stage, grid[0], grid[1])

    def set_pos_bias(self, pos_bias: PosBias | None = None, fixed_pool_size: int | None | str = "keep") -> None:
        """Switch position-bias mode and/or linear mode in place (weights are unaffected); validated."""
        changes: dict = {}
        if pos_bias is not None:
            changes["pos_bias"] = pos_bias
        if fixed_pool_size != "keep":
            changes["fixed_pool_size"] = fixed_pool_size
        self.geometry.plan = self.geometry.plan.replace(**changes)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: Tensor) -> None:
        if _fx_tracing():
            return  # FX traces with proxies: sizes are checked when the traced graph runs
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor image batch, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"expected a 4-D (B, C, H, W) image batch, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} input channels (B, {self.in_chans}, H, W), got {x.shape[1]} "
                f"(shape {tuple(x.shape)}); channels-last images need x.permute(0, 3, 1, 2)"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"expected a floating-point image tensor, got {x.dtype}; convert with x.float() "
                "(and normalise, e.g. with transnext.data transforms)"
            )
        size = (int(x.shape[2]), int(x.shape[3]))
        if not _is_tracing():
            self.check_input_size(size)
        if not torch.jit.is_tracing():
            self.geometry.prepare(size)  # under torch.compile too: keeps table building out of the graph

    def _run_stage(self, i: int, x: Tensor) -> tuple[Tensor, int, int]:
        x, H, W = getattr(self, f"patch_embed{i + 1}")(x)
        geom = self.geometry(i, H, W)
        for blk in getattr(self, f"block{i + 1}"):
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(blk, x, H, W, geom, use_reentrant=False)
            else:
                x = blk(x, H, W, geom)
        x = getattr(self, f"norm{i + 1}")(x)
        return getattr(self, f"out{i + 1}")(x, H, W), H, W

    def forward_features(self, x: Tensor) -> Tensor:
        """Normed last-stage feature map (B, C, H/32, W/32), unpooled (timm's convention)."""
        self._check_input(x)
        for i in range(self.num_stages):
            x, _, _ = self._run_stage(i, x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool (``global_pool='avg'``) and classify a feature map (B, C, H, W) or tokens (B, N, C)."""
        if self.global_pool == "avg":
            tokens = not _fx_tracing() and x.ndim == 3
            x = x.mean(dim=1) if tokens else x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs (after each stage's LayerNorm, which is part of the architecture).

        ``indices``: None = all stages; an int n = the last n stages; a sequence = those stages
        (negative indices count from the end). ``norm`` is accepted for timm compatibility: the
        stage norms are always applied. ``output_fmt``: "NCHW" or "NHWC".
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take = self._stage_indices(indices)
        self._check_input(x)
        intermediates = []
        last = max(take) if (stop_early or intermediates_only) else self.num_stages - 1
        for i in range(last + 1):
            x, _, _ = self._run_stage(i, x)
            if i in take:
                intermediates.append(x if output_fmt == "NCHW" else x.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        return x, intermediates

    def _stage_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        n = self.num_stages
        if indices is None:
            return list(range(n))
        if isinstance(indices, int):
            if not 0 < indices <= n:
                raise ValueError(f"indices={indices}: expected 1..{n} (the last n stages)")
            return list(range(n - indices, n))
        out = []
        for i in indices:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise ValueError(f"stage index {i} out of range for {n} stages")
            out.append(j)
        return sorted(set(out))

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last needed one (and the head); returns the kept indices."""
        take = self._stage_indices(indices)
        for i in range(max(take) + 1, self.num_stages):
            for name in (f"patch_embed{i + 1}", f"block{i + 1}", f"norm{i + 1}", f"out{i + 1}"):
                delattr(self, name)
        self.num_stages = max(take) + 1
        self.feature_info = self.feature_info[: self.num_stages]
        self.num_features = self.head_hidden_size = self.embed_dims[self.num_stages - 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take

    # ------------------------------------------------------------------ timm conventions
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        device = self.patch_embed1.proj.weight.device
        dtype = self.patch_embed1.proj.weight.dtype
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes, device=device, dtype=dtype)
            self._init_weights(self.head)
        else:
            self.head = nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names excluded from weight decay besides 1-D tensors and biases (docs/model.md section 6)."""
        return {n for n, _ in self.named_parameters() if any(k in n for k in self.no_weight_decay_keywords())}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"query_embedding", "relative_pos_bias_local", "cpb", "temperature"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        # timm layer grouping: the stem first; coarse = one group per stage; fine = the
        # downsampling patch embedding of a stage before its first block, each block, the stage
        # norm joining the last block (99999 = "previous group"); the head last (unmatched).
        return dict(
            stem=r"^patch_embed1\.",
            blocks=r"^(?:patch_embed|block|norm)(\d+)\." if coarse else [
                (r"^block(\d+)\.(\d+)\.", None),
                (r"^patch_embed(\d+)\.", (-1,)),
                (r"^norm(\d+)\.", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_attn_backend(self, backend: str | None) -> None:
        """Select the ops backend of every attention layer and Conv-GLU (``None``/``"auto"`` = automatic)."""
        if backend is not None:
            ops.resolve_backend(backend, "cpu")
        ops.set_backend(self, backend)


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups with the published no-weight-decay rules (docs/model.md section 6)."""
    keywords = model.no_weight_decay_keywords() if hasattr(model, "no_weight_decay_keywords") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in keywords):
            no_decay.append(p)
        else:
            decay.append(p)
    return [dict(params=no_decay, weight_decay=0.0), dict(params=decay, weight_decay=weight_decay)]

