"""Position bias of full attention, produced a block of query rows at a time.

The full-attention stage sees every token, so its bias is an (h, N, N) tensor: h * N^2 floats,
1.6 GB for ``transnext_tiny`` at 2048 px (N = 64 * 64). It is fully determined by small tables
(the bias MLP evaluated once per unique (dy, dx) pair, or the bias resized over the key axes),
so large grids keep only those tables and the attention op asks for the rows of one block of
queries at a time: memory stays linear in pixels while the result is unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.bias import SeparableBias

__all__ = ["BlockwiseBias", "SeparableBias", "axis_taps", "gather_bias", "resize_indices"]

Size = tuple[int, int]


def gather_bias(table: Tensor, index_y: Tensor, index_x: Tensor) -> Tensor:
    """(h, Qh*Qw, Kh*Kw) bias from a separable table.

    ``table`` (h, Uy, Ux) holds the bias of every unique (dy, dx) pair, ``index_y`` (Qh, Kh) and
    ``index_x`` (Qw, Kw) the unique index of every (query, key) pair along each axis.
    """
    h = table.shape[0]
    (qh, kh), (qw, kw) = index_y.shape, index_x.shape
    bias = table[:, index_y.reshape(-1)]  # (h, Qh*Kh, Ux)
    bias = bias[..., index_x.reshape(-1)].reshape(h, qh, kh, qw, kw)
    return bias.permute(0, 1, 3, 2, 4).reshape(h, qh * qw, kh * kw)


def resize_indices(in_len: int, out_len: int, start: int, stop: int, dtype: torch.dtype, device: torch.device):
    """Source rows and weights of bilinear resizing (align_corners=False) for outputs [start, stop).

    Same formula as ``F.interpolate(mode="bilinear", align_corners=False)``: source coordinate
    ``(i + 0.5) * in / out - 0.5`` clamped at 0, blended between its two neighbours.
    """
    scale = torch.tensor(in_len, dtype=dtype) / out_len
    src = ((torch.arange(start, stop, dtype=dtype) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(in_len - 1)
    i1 = (i0 + 1).clamp_max(in_len - 1)
    w1 = src - i0.to(dtype)
    return i0.to(device), i1.to(device), (1 - w1).to(device), w1.to(device)


class BlockwiseBias:
    """Full-attention position bias (h, N, N) over an (H, W) grid, without materialising it.

    Two kinds, matching the position-bias modes:

    * ``extrapolate``: ``table`` (h, Uy, Ux) of the bias MLP on unique pairs, with ``index_y``
      (H, H) and ``index_x`` (W, W); rows are gathered from it;
    * ``interpolate``: ``table`` (h, Qh0, Qw0, N), the bias of the trained grid already resized
      over the key axes; the query axes are resized bilinearly (x once, y per block).

    :meth:`rows` gives the bias of a range of query tokens, :meth:`materialize` all of it.
    """

    def __init__(
        self, size: Size, table: Tensor, index_y: Tensor | None = None, index_x: Tensor | None = None
    ) -> None:
        self.size = tuple(size)
        self.num_heads = table.shape[0]
        self.interpolate = index_y is None
        self.index_y = index_y
        H, W = self.size
        # Resolve the x axis once, so each query row is one row selection (contiguous copies):
        # extrapolate (h, W, Uy, W) = the bias of every (qx, uy, kx); interpolate (h, Qh0, W, N).
        # Both are O(N^1.5) floats, against h * N^2 for the whole bias.
        if self.interpolate:
            qw0 = table.shape[2]
            j0, j1, b0, b1 = resize_indices(qw0, W, 0, W, table.dtype, table.device)
            self.table = (table[:, :, j0] * b0.view(1, 1, -1, 1) + table[:, :, j1] * b1.view(1, 1, -1, 1)).contiguous()
        else:
            self.table = table[:, :, index_x].permute(0, 2, 1, 3).contiguous()

    @property
    def num_tokens(self) -> int:
        return self.size[0] * self.size[1]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_heads, self.num_tokens, self.num_tokens))

    @property
    def dtype(self) -> torch.dtype:
        return self.table.dtype

    @property
    def device(self) -> torch.device:
        return self.table.device

    def _fill_grid_rows(self, y0: int, y1: int, out: Tensor) -> Tensor:
        """Write the bias of every query of grid rows [y0, y1) into ``out`` (h, (y1 - y0) * W, N)."""
        H, W = self.size
        h, t = self.num_heads, self.table
        per_row = out.view(h, y1 - y0, W, self.num_tokens)  # rows of a block are whole grid rows
        if not self.interpolate:
            for j, y in enumerate(range(y0, y1)):
                torch.index_select(t, 2, self.index_y[y], out=per_row[:, j].view(h, W, H, W))
            return out
        i0, i1, a0, a1 = resize_indices(t.shape[1], H, y0, y1, t.dtype, torch.device("cpu"))
        for j in range(y1 - y0):
            dst = per_row[:, j]
            torch.mul(t[:, int(i0[j])], float(a0[j]), out=dst)
            dst.add_(t[:, int(i1[j])], alpha=float(a1[j]))
        return out

    def _grid_rows_differentiable(self, y0: int, y1: int) -> Tensor:
        """Same as :meth:`_fill_grid_rows` in out-of-place ops, for training the bias MLP."""
        H, W = self.size
        t = self.table
        if not self.interpolate:
            rows = [t.index_select(2, self.index_y[y]) for y in range(y0, y1)]  # (h, W, H, W) each
        else:
            i0, i1, a0, a1 = resize_indices(t.shape[1], H, y0, y1, t.dtype, torch.device("cpu"))
            rows = [t[:, int(i0[j])] * float(a0[j]) + t[:, int(i1[j])] * float(a1[j]) for j in range(y1 - y0)]
        return torch.stack(rows, dim=1).reshape(self.num_heads, (y1 - y0) * W, self.num_tokens)

    def rows(self, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """(h, stop - start, N): the bias of query tokens [start, stop) (row-major over the grid).

        ``out``, if given, receives the result (its rows must be contiguous); a range of whole
        grid rows is then written in place without temporaries.
        """
        W = self.size[1]
        stop = min(stop, self.num_tokens)
        y0, y1 = start // W, -(-stop // W)
        differentiable = torch.is_grad_enabled() and self.table.requires_grad
        if differentiable:
            block = self._grid_rows_differentiable(y0, y1)
        elif out is not None and start == y0 * W and stop == y1 * W:
            return self._fill_grid_rows(y0, y1, out)
        else:
            block = self._fill_grid_rows(y0, y1, self.table.new_empty((self.num_heads, (y1 - y0) * W, self.num_tokens)))
        block = block[:, start - y0 * W : stop - y0 * W]
        return block if out is None else out.copy_(block)

    def materialize(self) -> Tensor:
        return self.rows(0, self.num_tokens)

    def __repr__(self) -> str:
        kind = "interpolate" if self.interpolate else "extrapolate"
        return f"BlockwiseBias(size={self.size}, heads={self.num_heads}, {kind})"


# ---------------------------------------------------------------------------------------------
# Aggregated attention: the (h, N, Np) pooled-key bias as a separable tap table.


def axis_taps(
    index: Tensor, out_query: int, out_key: int, interpolate: bool, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Per-axis taps of the position bias: (out_query, out_key, T) unique-pair indices and weights.

    ``index`` (Q0, K0) holds the unique-coordinate index of every (query, key) pair along one axis
    of the grid the bias MLP is evaluated on. Without interpolation that is the actual grid: one
    tap of weight 1. With interpolation the bias is resized bilinearly from (Q0, K0) to
    (out_query, out_key): up to four taps, merged where they hit the same unique pair and with
    zero weights dropped (an axis whose size does not change keeps a single tap).
    """
    if not interpolate:
        return index.unsqueeze(-1), torch.ones(index.shape + (1,), dtype=dtype)
    q0, k0 = index.shape
    j0, j1, v0, v1 = resize_indices(q0, out_query, 0, out_query, dtype, torch.device("cpu"))
    i0, i1, w0, w1 = resize_indices(k0, out_key, 0, out_key, dtype, torch.device("cpu"))
    idx = torch.stack([index[j][:, i] for j in (j0, j1) for i in (i0, i1)], dim=-1)
    w = torch.stack([a[:, None] * b[None, :] for a in (v0, v1) for b in (w0, w1)], dim=-1)
    # Merge taps that read the same unique pair, then move zero weights last and drop them.
    for t in range(1, idx.shape[-1]):
        for s in range(t):
            same = (idx[..., t] == idx[..., s]) & (w[..., s] != 0)
            w[..., s] += torch.where(same, w[..., t], torch.zeros_like(w[..., t]))
            w[..., t] = torch.where(same, torch.zeros_like(w[..., t]), w[..., t])
    order = torch.argsort((w == 0).to(torch.int8), dim=-1, stable=True)
    idx, w = idx.gather(-1, order), w.gather(-1, order)
    taps = max(1, int((w != 0).sum(-1).max()))
    return idx[..., :taps].contiguous(), w[..., :taps].contiguous()
