"""Attention ops of TransNeXt: one functional API, interchangeable backends chosen at run time.

Layering (as in neighbourhood-attention libraries): this module is the functional API the model
calls; each backend module implements it, the fast ones through a custom autograd Function.

Backends:

* ``reference``: the plain unfold formulation of the paper (the baseline of tests and benchmarks);
* ``torch``: no unfolded copies of keys and values; the nine window offsets are shifted views of
  one padded tensor, and a custom autograd Function keeps only what backward needs (default on
  CPU);
* ``triton``: fused forward and backward kernels (CUDA; runs on CPU only under
  ``TRITON_INTERPRET=1``, for tests).

``auto`` (the default) picks ``triton`` for CUDA tensors when it is installed, else ``torch``.
The ``TRANSNEXT_ATTN_BACKEND`` environment variable overrides ``auto``.

The normalisation of queries and keys and the query scaling (query embedding, softplus
temperature, length scale) are part of the ops: the fast backends fuse them and keep only the
normalised tensors and their norms for backward.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from torch import Tensor

from ._common import inference_chunks
from .conv_glu import conv_glu
from .pooling import sr_gelu_pool

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "aggregated_attention",
    "available_backends",
    "conv_glu",
    "full_attention",
    "inference_chunks",
    "resolve_backend",
    "set_backend",
    "sr_gelu_pool",
]

BACKENDS = ("reference", "torch", "triton")
ENV_VAR = "TRANSNEXT_ATTN_BACKEND"

_MODULES = {
    "reference": "transnext.ops.reference",
    "torch": "transnext.ops.torch_backend",
    "triton": "transnext.ops.triton_backend",
}


_LOADED: dict[str, ModuleType] = {}


def _load(name: str) -> ModuleType:
    # A plain dict lookup after the first import: torch.compile traces through it without a
    # graph break (importlib.import_module is opaque to it).
    mod = _LOADED.get(name)
    if mod is None:
        mod = _LOADED[name] = importlib.import_module(_MODULES[name])
    return mod


def _triton_importable() -> bool:
    try:
        return bool(_load("triton").is_available())
    except ImportError:
        return False


def _triton_usable(device_type: str) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests only)."""
    if device_type == "cuda":
        return _triton_importable()
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and _triton_importable()


def available_backends(device_type: str = "cpu") -> list[str]:
    """Backends that can run on ``device_type`` in this environment."""
    names = ["reference", "torch"]
    if _triton_usable(device_type):
        names.append("triton")
    return names


def resolve_backend(name: str | None, device_type: str) -> str:
    """Turn ``None`` / ``"auto"`` / an explicit name into a concrete backend name."""
    if name is None or name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
    if name == "auto":
        return "triton" if device_type == "cuda" and _triton_usable(device_type) else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {', '.join(BACKENDS)} or 'auto'")
    return name


def _impl(backend: str | None, device_type: str) -> ModuleType:
    name = resolve_backend(backend, device_type)
    if name == "triton" and not _triton_usable(device_type):
        raise RuntimeError(
            f"attention backend 'triton' cannot run on {device_type} tensors here: it needs CUDA and the "
            "triton package (on CPU only under TRITON_INTERPRET=1, for tests); use 'torch' or 'auto'"
        )
    return _load(name)


def aggregated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    query_embedding: Tensor,
    temperature: Tensor,
    length_scale: Tensor,
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
    """Aggregated Attention (SPEC section 4) from the projected queries, keys and values.

    Shapes (any strides; views of the projection outputs avoid copies): ``q``, ``k`` (raw, not
    normalised), ``v``: (B, h, N, d) over the row-major ``size`` = (H, W) grid; ``k_pool`` (raw),
    ``v_pool``: (B, h, Np, d); ``query_embedding`` (h, 1, d); ``temperature`` (h, 1, 1), the raw
    parameter (softplus is applied here); ``length_scale`` (N, 1), ln(keys seen per query);
    ``local_bias`` (h, w*w); ``pool_bias`` (h, N, Np); ``learnable_tokens`` (h, d, w*w);
    ``learnable_bias`` (h, 1, w*w); ``padding_mask`` (N, w*w) bool, True outside the image.
    Returns (B, h, N, d).
    """
    impl = _impl(backend, q.device.type)
    if not isinstance(pool_bias, Tensor) and impl is not _load("torch"):
        pool_bias = pool_bias.materialize()
    return impl.aggregated_attention(
        q, k, v, k_pool, v_pool, query_embedding, temperature, length_scale, local_bias, pool_bias,
        learnable_tokens, learnable_bias, padding_mask, size, window, attn_drop, training,
    )


def full_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    query_embedding: Tensor,
    temperature: Tensor,
    length_scale: float | Tensor,
    bias,
    attn_drop: float = 0.0,
    training: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Cosine full attention with position bias (stages with sr_ratio 1).

    ``softmax(((q_hat + query_embedding) * softplus(temperature) * length_scale) @ k_hat^T + bias) @ v``
    with L2-normalised ``q_hat``, ``k_hat`` and no 1/sqrt(d). ``q``, ``k``, ``v``: (B, h, N, d);
    ``bias``: (h, N, N), or a :class:`~transnext.models.position_bias.BlockwiseBias` for large
    grids (the ``torch`` backend takes it a block of queries at a time; the others materialise
    it). Returns (B, h, N, d).
    """
    impl = _impl(backend, q.device.type)
    if not hasattr(impl, "full_attention"):
        impl = _load("torch")
    if not isinstance(bias, Tensor) and impl is not _load("torch"):
        bias = bias.materialize()
    return impl.full_attention(q, k, v, query_embedding, temperature, length_scale, bias, attn_drop, training)


def set_backend(model, backend: str | None) -> None:
    """Select the ops backend for every attention layer and Conv-GLU of ``model``.

    ``reference`` then means the reference formulation throughout (unfold attention, plain
    Conv-GLU and pooling branch): the baseline of the benchmarks.
    """
    if backend is not None:
        resolve_backend(backend, "cpu")
    for m in model.modules():
        if hasattr(m, "attn_backend"):
            m.attn_backend = backend
        if type(m).__name__ == "ConvGLU":
            m.ops_backend = backend
