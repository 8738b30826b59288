"""Size-dependent tables of TransNeXt: position-bias coordinates, padding masks, length scales.

Everything here is a pure function of grid sizes, so it is computed once per size on the CPU and
cached by the caller (:class:`StageGeometry` objects are small). The rounding of the reference
implementation is reproduced on purpose: coordinates are built with float32 ops, and the
length scales of Aggregated Attention are float32 logarithms (docs/model.md section 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AxisTable", "CpbTable", "StageGeometry", "build_cpb_table", "local_window_tables"]

Size = tuple[int, int]


@dataclass(frozen=True)
class AxisTable:
    """Relative coordinates along one axis: unique log-spaced values and the index of each pair."""

    values: Tensor  # (U,) float32, unique transformed relative coordinates
    index: Tensor  # (Q, K) int64 into ``values``


@dataclass(frozen=True)
class CpbTable:
    """Continuous-position-bias inputs for a (query grid, key grid) pair.

    The bias of query (qy, qx) and key (ky, kx) is ``MLP(rows[y.index[qy,ky], x.index[qx,kx]])``;
    the MLP is evaluated once per unique (dy, dx) combination (``coords``).
    """

    query: Size
    key: Size
    y: AxisTable
    x: AxisTable

    @property
    def coords(self) -> Tensor:
        """(Uy * Ux, 2) float32 (dy, dx) inputs of the bias MLP, row-major over (uy, ux)."""
        gy, gx = torch.meshgrid(self.y.values, self.x.values, indexing="ij")
        return torch.stack([gy, gx], dim=-1).reshape(-1, 2)


def _axis_table(query_len: int, key_len: int, pretrain_len: int) -> AxisTable:
    # float32 throughout, exactly as the reference builds its table, then cast by the caller.
    q = torch.arange(query_len, dtype=torch.float32)
    k = F.adaptive_avg_pool1d(q.unsqueeze(0), key_len).squeeze(0)
    rel = (q[:, None] - k[None, :]) / (pretrain_len - 1) * 8
    rel = torch.sign(rel) * torch.log2(torch.abs(rel) + 1.0) / torch.log2(torch.tensor(8, dtype=torch.float32))
    values, index = torch.unique(rel.reshape(-1), return_inverse=True)
    return AxisTable(values=values, index=index.reshape(query_len, key_len))


def build_cpb_table(query: Size, key: Size, pretrain: Size) -> CpbTable:
    """Coordinates of every (query, key) pair, normalised by the pretraining grid ``pretrain``."""
    if min(pretrain) < 2:
        raise ValueError(
            f"pretrain grid {pretrain} is too small: the position bias normalises by (grid - 1), "
            "so every stage needs a pretraining grid of at least 2 (pretrain_size >= 64)"
        )
    return CpbTable(
        query=tuple(query),
        key=tuple(key),
        y=_axis_table(query[0], key[0], pretrain[0]),
        x=_axis_table(query[1], key[1], pretrain[1]),
    )


def local_window_tables(size: Size, window: int) -> tuple[Tensor, Tensor]:
    """Valid-key count per pixel (N,) float32 and padding mask (N, window*window) bool.

    The window is centred on each pixel and zero-padded at the border; slots are ordered
    row-major over (dy, dx).
    """
    H, W = size
    r = window // 2
    offsets = torch.arange(window) - r
    pos_y = torch.arange(H)[:, None] + offsets[None, :]
    pos_x = torch.arange(W)[:, None] + offsets[None, :]
    valid_y = (pos_y >= 0) & (pos_y < H)
    valid_x = (pos_x >= 0) & (pos_x < W)
    valid = valid_y[:, None, :, None] & valid_x[None, :, None, :]  # (H, W, w, w)
    valid = valid.reshape(H * W, window * window)
    return valid.sum(-1).to(torch.float32), ~valid


@dataclass
class StageGeometry:
    """All size-dependent tables one stage needs for one input grid.

    ``pool`` is the pooled key grid of Aggregated Attention (``None`` for full attention).
    ``cpb`` is the table to evaluate the bias MLP on; when ``interpolate_from`` is set, the MLP
    is evaluated on that (trained) grid and resized bilinearly to ``size`` / ``pool``.
    """

    size: Size
    pool: Size | None
    window: int | None
    cpb: CpbTable
    interpolate: bool = False
    float32_full_scale: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.size[0] * self.size[1]

    @property
    def key_size(self) -> Size:
        return self.pool if self.pool is not None else self.size

    @property
    def num_keys(self) -> int:
        return self.key_size[0] * self.key_size[1]

    def _local(self) -> tuple[Tensor, Tensor]:
        if "local" not in self._cache:
            self._cache["local"] = local_window_tables(self.size, self.window)
        return self._cache["local"]

    def padding_mask(self, device: torch.device) -> Tensor:
        """(N, window*window) bool, True where a window slot falls outside the image."""
        key = ("mask", device)
        if key not in self._cache:
            self._cache[key] = self._local()[1].to(device)
        return self._cache[key]

    def length_scale(self, dtype: torch.dtype, device: torch.device) -> Tensor | float:
        """ln(number of keys each query sees): (N, 1) tensor, or a float for full attention."""
        if self.pool is None:
            if self.float32_full_scale:
                return float(torch.log(torch.tensor(float(self.num_tokens), dtype=torch.float32)))
            return math.log(self.num_tokens)
        key = ("scale", dtype, device)
        if key not in self._cache:
            count = self._local()[0] + float(self.num_keys)
            self._cache[key] = torch.log(count).unsqueeze(-1).to(device=device, dtype=dtype)
        return self._cache[key]

    def bias_taps(self, dtype: torch.dtype, device: torch.device) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Per-axis taps ((index, weight) for y, then x) from the bias-MLP table to the actual grids.

        Extrapolation: one tap per (query, key) pair; interpolation: the bilinear resizing of
        the trained-grid bias to (size, key_size), up to four taps per axis (see
        :func:`transnext.models.position_bias.axis_taps`).
        """
        from .position_bias import axis_taps

        key = ("taps", dtype, device)
        if key not in self._cache:
            (H, W), (kh, kw) = self.size, self.key_size
            y = axis_taps(self.cpb.y.index, H, kh, self.interpolate, dtype)
            x = axis_taps(self.cpb.x.index, W, kw, self.interpolate, dtype)
            self._cache[key] = tuple((i.to(device), w.to(device)) for i, w in (y, x))
        return self._cache[key]

    def cpb_inputs(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(coords (U, 2), index_y (Qh, Kh), index_x (Qw, Kw)) on ``device``."""
        key = ("cpb", dtype, device)
        if key not in self._cache:
            t = self.cpb
            self._cache[key] = (
                t.coords.to(device=device, dtype=dtype),
                t.y.index.to(device),
                t.x.index.to(device),
            )
        return self._cache[key]
