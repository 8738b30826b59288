"""Aggregated-attention ops: one functional API, interchangeable backends chosen at run time.

Backends: ``reference`` (unfold formulation, the baseline), ``torch`` (no unfolded copies),
``triton`` (fused CUDA kernels, when available). ``auto`` picks the fastest one available for
the tensors' device. The ``TRANSNEXT_ATTN_BACKEND`` environment variable overrides ``auto``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from torch import Tensor

__all__ = ["BACKENDS", "aggregated_attention", "available_backends", "full_attention", "resolve_backend"]

BACKENDS = ("reference", "torch", "triton")
ENV_VAR = "TRANSNEXT_ATTN_BACKEND"

_MODULES = {"reference": "transnext.ops.reference", "torch": "transnext.ops.torch_backend", "triton": "transnext.ops.triton_backend"}


def _load(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


def _triton_usable(device_type: str) -> bool:
    if device_type != "cuda":
        return False
    try:
        return bool(_load("triton").is_available())
    except ImportError:
        return False


def available_backends(device_type: str = "cpu") -> list[str]:
    """Backends that can run on ``device_type`` in this environment."""
    names = ["reference", "torch"]
    if _triton_usable(device_type) or (os.environ.get("TRITON_INTERPRET") == "1" and _has_triton()):
        names.append("triton")
    return names


def _has_triton() -> bool:
    try:
        _load("triton")
        return True
    except ImportError:
        return False


def resolve_backend(name: str | None, device_type: str) -> str:
    """Turn ``None`` / ``"auto"`` / an explicit name into a concrete backend name."""
    if name is None or name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
    if name == "auto":
        return "triton" if _triton_usable(device_type) else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {', '.join(BACKENDS)} or 'auto'")
    return name


def aggregated_attention(
    q: Tensor,
    q_scaled: Tensor,
    k: Tensor,
    v: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    local_bias: Tensor,
    pool_bias: Tensor,
    learnable_tokens: Tensor,
    learnable_bias: Tensor,
    padding_mask: Tensor,
    size: tuple[int, int],
    window: int = 3,
    attn_drop: float = 0.0,
    training: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Aggregated Attention core (SPEC section 4), after the projections.

    Shapes: ``q``, ``q_scaled`` (normalised query, and the same with query embedding,
    temperature and length scale applied), ``k`` (normalised), ``v``: (B, h, N, d) over the
    row-major ``size`` = (H, W) grid; ``k_pool`` (normalised), ``v_pool``: (B, h, Np, d);
    ``local_bias`` (h, w*w); ``pool_bias`` (h, N, Np); ``learnable_tokens`` (h, d, w*w);
    ``learnable_bias`` (h, 1, w*w); ``padding_mask`` (N, w*w) bool, True outside the image.
    Returns (B, h, N, d).
    """
    impl = _load(resolve_backend(backend, q.device.type))
    return impl.aggregated_attention(
        q, q_scaled, k, v, k_pool, v_pool, local_bias, pool_bias, learnable_tokens, learnable_bias,
        padding_mask, size, window, attn_drop, training,
    )


def full_attention(
    q_scaled: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    attn_drop: float = 0.0,
    training: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Cosine full attention with position bias: softmax(q_scaled @ k^T + bias) @ v, no 1/sqrt(d)."""
    name = resolve_backend(backend, q_scaled.device.type)
    impl = _load("torch" if name == "triton" else name)
    return impl.full_attention(q_scaled, k, v, bias, attn_drop, training)
