"""Helpers shared by the backends: compute dtype under autocast, tracing detection, normalisation."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

EPS = 1e-12  # F.normalize's default


def compute_dtype(x: Tensor) -> torch.dtype:
    """Dtype the fused ops compute in: float32 for half inputs or float32 under autocast, else x's."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would run x's matmuls in (inputs and weights alike), else None."""
    dev = x.device.type
    # Devices without autocast (e.g. meta, used for FLOP counting) raise in is_autocast_enabled.
    if (
        x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and torch.amp.is_autocast_available(dev)
        and torch.is_autocast_enabled(dev)
    ):
        return torch.get_autocast_dtype(dev)
    return None


def autocast_off(device_type: str):
    """Context that disables autocast on ``device_type``; a no-op where the device has none (meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def needs_grad(*tensors: Tensor | None) -> bool:
    """True when autograd is on and any of ``tensors`` (None entries skipped) requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def is_exporting() -> bool:
    """torch.export / ONNX export: the graph must hold standard ops only (no transnext custom op)."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    onnx = getattr(torch, "onnx", None)
    in_onnx = bool(onnx is not None and getattr(onnx, "is_in_onnx_export", lambda: False)())
    return bool(exporting is not None and exporting()) or in_onnx


def is_tracing() -> bool:
    """True while tracing, exporting or compiling: graph capture needs plain functional ops."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    if torch.compiler.is_compiling():
        return True
    onnx = getattr(torch, "onnx", None)
    return bool(onnx is not None and getattr(onnx, "is_in_onnx_export", lambda: False)())


def normalize_into(x: Tensor, out: Tensor) -> Tensor:
    """Write F.normalize(x, dim=-1) into ``out`` (any layout); return the raw norms (.., 1)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=out.dtype)
    torch.div(x, norm.clamp_min(EPS), out=out)
    return norm


def normalize_backward(grad: Tensor, x_hat: Tensor, norm: Tensor, out: Tensor | None = None) -> Tensor:
    """Gradient of F.normalize(x, dim=-1) from the normalised x_hat and the raw norms.

    Equals autograd through ``x / norm(x).clamp_min(eps)``: (g - x_hat (x_hat . g)) / norm where
    the norm is at least eps, g / eps where it is clamped.
    """
    dot = (grad * x_hat).sum(-1, keepdim=True)
    dot.mul_(norm >= EPS)
    res = torch.mul(x_hat, dot) if out is None else torch.mul(x_hat, dot, out=out)
    torch.sub(grad, res, out=res)
    return res.div_(norm.clamp_min(EPS))


def scaled_query_backward(
    dqs: Tensor, dq_hat: Tensor, q_hat: Tensor, qe: Tensor, factor: Tensor, length_scale: Tensor, need_mult: bool,
    need_qe: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Backward of ``qs = (q_hat + qe) * mult * length_scale`` (``factor = mult * length_scale``).

    Adds ``dqs * factor`` into ``dq_hat`` (``dqs`` is scaled in place) and returns the gradients
    of ``mult`` (h, 1, 1) and of the query embedding (h, 1, d), each None when not needed.
    """
    h, N = q_hat.shape[1], q_hat.shape[2]
    d_mult = None
    if need_mult:
        per_query = (dqs * torch.add(q_hat, qe)).sum(-1)  # (B, h, N)
        d_mult = (per_query * length_scale.to(dqs.dtype).view(1, 1, N)).sum((0, 2)).view(h, 1, 1)
    dqs.mul_(factor)
    d_qe = dqs.sum((0, 2)).unsqueeze(1) if need_qe else None
    dq_hat.add_(dqs)
    return d_mult, d_qe


def tokens_to_map(t: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, N, C) tokens -> (B, C, H, W) view (channels-last strides when t is dense).

    Splitting N keeps the batch stride; a transpose + reshape gives a batch of one an arbitrary
    batch stride, which convolutions then read as a plain (B, C, H, W) layout and copy (at
    800x1344 each depthwise conv then took 4-5x longer, mostly in that copy)."""
    return t.unflatten(1, size).permute(0, 3, 1, 2)


def map_to_tokens(m: Tensor) -> Tensor:
    """(B, C, H, W) map -> (B, N, C) view (contiguous when the map is channels-last)."""
    return m.flatten(2).transpose(1, 2)


def window_input_grads(
    dk_pad: Tensor | None, dv_pad: Tensor | None, k_pad: Tensor, k_norm: Tensor, size: tuple[int, int], r: int
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of the raw keys and values (B, h, N, d) from those of their zero-padded maps."""
    H, W = size
    B, h, d = k_pad.shape[0], k_pad.shape[1], k_pad.shape[-1]
    inner = (slice(None), slice(None), slice(r, r + H), slice(r, r + W))
    dk = dv = None
    if dk_pad is not None:
        dk = normalize_backward(dk_pad[inner], k_pad[inner], k_norm).reshape(B, h, H * W, d)
    if dv_pad is not None:
        dv = dv_pad[inner].reshape(B, h, H * W, d)
    return dk, dv


# Inference runs big activations in chunks of at least this many tokens: small enough that the
# transient buffers stay cache- and allocator-friendly (fresh multi-MB buffers cost page faults),
# large enough that every matmul stays efficient.
MIN_CHUNK_TOKENS = 2048


def inference_chunks(x: Tensor, size: tuple[int, int], bands: bool = False) -> list[tuple[int, int, int, int]] | None:
    """Chunks (b0, b1, y0, y1) of images / row bands to run a no-grad op on, or None for one pass.

    Whole images are grouped up to ``MIN_CHUNK_TOKENS``; with ``bands``, an image of more than
    eight times that is split into bands of rows (the op supplies its own halo rows).
    """
    if torch.is_grad_enabled() or is_tracing():
        return None
    B = x.shape[0]
    H, W = size
    N = H * W
    if bands and N >= 8 * MIN_CHUNK_TOKENS:
        rows = max(16, -(-2 * MIN_CHUNK_TOKENS // W))
        return [(b, b + 1, y, min(H, y + rows)) for b in range(B) for y in range(0, H, rows)]
    # At least two images: oneDNN runs a batch of one in NCHW, which costs layout copies.
    per = max(2, -(-MIN_CHUNK_TOKENS // N))
    if per >= B:
        return None
    return [(b, min(B, b + per), 0, H) for b in range(0, B, per)]
