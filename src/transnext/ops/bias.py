"""Pooled-key position bias of Aggregated Attention as small factors, produced a block at a time.

The bias of a layer is an (h, N, Np) tensor: at 800 x 1344 about 1,000 pooled keys for each of
67,200 stage-1 queries. It is built from the bias MLP evaluated once per unique (dy, dx) pair and
per-axis taps (a gather, or the bilinear resizing of interpolate mode), so it factorises: the x
axis resolved into a small table, the y axis combined per row of queries. The blocked attention
op asks for the rows of one block at a time and sends the gradient back through the same factors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native

__all__ = ["SeparableBias", "rows_from_table", "table_grad_from_rows"]

Size = tuple[int, int]


class SeparableBias:
    """The pooled-key position bias (h, H*W, Kh*Kw) of one layer, stored as small factors.

    ``table`` (Uy, h, W, Kw) is the bias with the x axis resolved: for every unique y-coordinate
    pair ``uy``, head, query column ``x`` and key column ``kx``. ``y_index`` / ``y_weight``
    (H, Kh, T) combine its slabs into the bias of query row ``y`` and key row ``ky``:
    ``bias[:, (y, x), (ky, kx)] = sum_t y_weight[y, ky, t] * table[y_index[y, ky, t], :, x, kx]``.
    Memory is Uy * h * W * Kw (Uy ~ H + Kh unique pairs), against h * H * W * Kh * Kw for the
    whole bias, so the attention op produces the bias of one block of query rows at a time
    (the unique-pair axis is outermost so that producing a block gathers whole slabs).

    A whole (h, N, Np) tensor fits the same form (``from_dense``: Uy = H, Kh = 1, Kw = Np), so
    the blocked op has one input format.
    """

    def __init__(self, table: Tensor, y_index: Tensor, y_weight: Tensor) -> None:
        self.table = table
        self.y_index = y_index
        self.y_weight = y_weight

    @classmethod
    def from_mlp_table(
        cls, mlp_table: Tensor, y_taps: tuple[Tensor, Tensor], x_taps: tuple[Tensor, Tensor]
    ) -> SeparableBias:
        """From the bias MLP on unique pairs (h, Uy, Ux) and both axes' taps (index, weight),
        each (queries, keys, taps) along its axis."""
        x_index, x_weight = x_taps
        y_index, y_weight = y_taps
        if native.usable(mlp_table):
            # Inference on CPU: one pass writing the table in its final layout.
            return cls(native.bias_table(mlp_table, x_index, x_weight), y_index, y_weight.to(mlp_table.dtype))
        h, uy, _ = mlp_table.shape
        W, kw, _ = x_index.shape
        # Gather whole (Uy, h) slabs along the unique-x axis (fast copies, not element gathers).
        by_x = mlp_table.permute(2, 1, 0).contiguous()  # (Ux, Uy, h)
        weights = x_weight.to(mlp_table.dtype)
        table = None
        for t in range(x_index.shape[-1]):
            part = by_x.index_select(0, x_index[..., t].reshape(-1)).view(W, kw, uy, h)
            wt = weights[..., t].view(W, kw, 1, 1)
            table = part * wt if table is None else table.addcmul_(part, wt) if not table.requires_grad else table + part * wt
        return cls(table.permute(2, 3, 0, 1).contiguous(), y_index, y_weight.to(mlp_table.dtype))

    @classmethod
    def from_dense(cls, bias: Tensor, size: Size) -> SeparableBias:
        """Wrap a whole (h, H*W, Np) bias tensor (a view, no copy)."""
        h, _, np_ = bias.shape
        H, W = size
        y_index = torch.arange(H, device=bias.device).view(H, 1, 1)
        y_weight = torch.ones((H, 1, 1), dtype=bias.dtype, device=bias.device)
        return cls(bias.reshape(h, H, W, np_).transpose(0, 1), y_index, y_weight)

    @property
    def num_heads(self) -> int:
        return self.table.shape[1]

    @property
    def size(self) -> Size:
        return (self.y_index.shape[0], self.table.shape[2])

    @property
    def num_keys(self) -> int:
        return self.y_index.shape[1] * self.table.shape[3]

    @property
    def shape(self) -> torch.Size:
        H, W = self.size
        return torch.Size((self.num_heads, H * W, self.num_keys))

    @property
    def dtype(self) -> torch.dtype:
        return self.table.dtype

    def materialize(self) -> Tensor:
        """The whole (h, N, Np) bias, differentiable with respect to ``table``."""
        return rows_from_table(self.table, self.y_index, self.y_weight, 0, self.size[0])

    def __repr__(self) -> str:
        H, W = self.size
        return f"SeparableBias(size={(H, W)}, keys={self.num_keys}, heads={self.num_heads}, taps={self.y_index.shape[-1]})"


def rows_from_table(table: Tensor, y_index: Tensor, y_weight: Tensor, y0: int, y1: int, out: Tensor | None = None) -> Tensor:
    """Bias of query rows [y0, y1) from a :class:`SeparableBias` factorisation: (h, rows * W, Kh * Kw).

    ``out`` (h, rows, W, Kh, Kw), any strides, receives the result when given.
    """
    _, h, W, kw = table.shape
    rows, kh, taps = y1 - y0, y_index.shape[1], y_index.shape[2]
    res = out
    for t in range(taps):
        part = table.index_select(0, y_index[y0:y1, :, t].reshape(-1))  # whole (h, W, Kw) slabs
        part = part.view(rows, kh, h, W, kw).permute(2, 0, 3, 1, 4)  # (h, rows, W, Kh, Kw)
        wt = y_weight[y0:y1, :, t].view(1, rows, 1, kh, 1)
        if t == 0:
            res = part * wt if out is None else torch.mul(part, wt, out=out)
        else:
            res.addcmul_(part, wt)
    return res if out is not None else res.reshape(h, rows * W, kh * kw)


def table_grad_from_rows(grad_rows: Tensor, y_index: Tensor, y_weight: Tensor, y0: int, y1: int, grad_table: Tensor) -> None:
    """Accumulate into ``grad_table`` (Uy, h, W, Kw) the gradient of :func:`rows_from_table`.

    ``grad_rows`` (h, rows, W, Kh, Kw): gradient of the bias of query rows [y0, y1).
    """
    _, h, W, kw = grad_table.shape
    rows, kh = y1 - y0, y_index.shape[1]
    g = grad_rows.permute(1, 3, 0, 2, 4)  # (rows, Kh, h, W, Kw)
    for t in range(y_index.shape[-1]):
        wt = y_weight[y0:y1, :, t].view(rows, kh, 1, 1, 1)
        grad_table.index_add_(0, y_index[y0:y1, :, t].reshape(-1), (g * wt).reshape(rows * kh, h, W, kw))
