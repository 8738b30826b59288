"""The position-bias MLP ``fc2(ReLU(fc1(coords)))`` in training, without its hidden activation.

Every attention layer evaluates its bias MLP on all unique (dy, dx) pairs of its grids on every
training step. The pairs are many at dense sizes (61,504 in stage 1 of a 512 px UPerNet backbone)
and the hidden layer is 512 wide, so autograd would keep a 126 MB ReLU output per layer and run
its forward and backward as passes over that tensor through memory. Here the pairs go in chunks
small enough to stay in cache; backward recomputes each chunk's hidden activation (a K = 2
product and a ReLU) instead of keeping it. Same values; gradients summed chunk by chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import current_policy

__all__ = ["bias_mlp"]


def _hidden(coords: Tensor, w1: Tensor, b1: Tensor) -> Tensor:
    return torch.addmm(b1, coords, w1.t()).relu_()


class _BiasMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coords: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, rows: int) -> Tensor:
        out = coords.new_empty((coords.shape[0], w2.shape[0]))
        for r0 in range(0, coords.shape[0], rows):
            r1 = min(coords.shape[0], r0 + rows)
            torch.addmm(b2, _hidden(coords[r0:r1], w1, b1), w2.t(), out=out[r0:r1])
        ctx.save_for_backward(coords, w1, b1, w2)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        coords, w1, b1, w2 = ctx.saved_tensors
        grad = grad.contiguous()
        need_coords, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        rows = ctx.rows
        g_coords = torch.empty_like(coords) if need_coords else None
        g_w1 = torch.zeros_like(w1)
        g_b1 = torch.zeros_like(b1)
        g_w2 = torch.zeros_like(w2)
        for r0 in range(0, coords.shape[0], rows):
            r1 = min(coords.shape[0], r0 + rows)
            c, g = coords[r0:r1], grad[r0:r1]
            hidden = _hidden(c, w1, b1)
            g_w2.addmm_(g.t(), hidden)
            g_hidden = torch.mm(g, w2).mul_(hidden > 0)  # ReLU's gradient: zero where the output is
            g_w1.addmm_(g_hidden.t(), c)
            g_b1 += g_hidden.sum(0)
            if g_coords is not None:
                torch.mm(g_hidden, w1, out=g_coords[r0:r1])
        g_b2 = grad.sum(0) if need_b2 else None
        return (g_coords, g_w1 if need_w1 else None, g_b1 if need_b1 else None, g_w2 if need_w2 else None, g_b2, None)


def bias_mlp(coords: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, rows: int | None = None) -> Tensor:
    """``linear(relu(linear(coords, w1, b1)), w2, b2)`` for (M, 2) coords: (M, heads); memory O(M * heads).

    The pairs go in chunks of ``rows`` (default ``KernelPolicy.bias_mlp_rows``), in training and at inference.
    """
    return _BiasMLP.apply(coords, w1, b1, w2, b2, current_policy().bias_mlp_rows if rows is None else rows)
