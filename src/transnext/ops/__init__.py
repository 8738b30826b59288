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
The ``TRANSNEXT_ATTN_BACKEND`` environment variable overrides ``auto``. Selection, per-backend
capabilities and the fallbacks (each warned once) live in :mod:`transnext.ops.dispatch`.

The normalisation of queries and keys and the query scaling (query embedding, softplus
temperature, length scale) are part of the ops: the fast backends fuse them and keep only the
normalised tensors and their norms for backward.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import Tensor

from ._common import autocast_dtype, inference_chunks, is_tracing
from .bias_mlp import CHUNK_ROWS as BIAS_MLP_CHUNK_ROWS
from .bias_mlp import bias_mlp
from .conv_glu import conv_glu
from .dispatch import BACKENDS, CAPABILITIES, ENV_VAR, resolve_backend, select_backend, triton_usable
from .pooling import sr_gelu_pool

__all__ = [
    "BACKENDS",
    "CAPABILITIES",
    "ENV_VAR",
    "BIAS_MLP_CHUNK_ROWS",
    "aggregated_attention",
    "autocast_dtype",
    "available_backends",
    "bias_mlp",
    "conv_glu",
    "full_attention",
    "inference_chunks",
    "resolve_backend",
    "select_backend",
    "set_backend",
    "sr_gelu_pool",
]

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


# The pure-PyTorch backends are imported with the package, so the first forward of a model under
# torch.compile finds them loaded (an import inside a traced forward is a graph break in every
# layer); Triton stays lazy (it may be absent or slow to import).
_load("reference")
_load("torch")


def available_backends(device_type: str = "cpu") -> list[str]:
    """Backends that can run on ``device_type`` in this environment."""
    names = ["reference", "torch"]
    if triton_usable(device_type):
        names.append("triton")
    return names


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
    """Aggregated Attention (docs/model.md section 4) from the projected queries, keys and values.

    Shapes (any strides; views of the projection outputs avoid copies): ``q``, ``k`` (raw, not
    normalised), ``v``: (B, h, N, d) over the row-major ``size`` = (H, W) grid; ``k_pool`` (raw),
    ``v_pool``: (B, h, Np, d); ``query_embedding`` (h, 1, d); ``temperature`` (h, 1, 1), the raw
    parameter (softplus is applied here); ``length_scale`` (N, 1), ln(keys seen per query);
    ``local_bias`` (h, w*w); ``pool_bias`` (h, N, Np), or its factors
    (:class:`~transnext.ops.bias.SeparableBias`, large grids; other backends than ``torch``
    get it materialised); ``learnable_tokens`` (h, d, w*w);
    ``learnable_bias`` (h, 1, w*w); ``padding_mask`` (N, w*w) bool, True outside the image.
    Returns (B, h, N, d).
    """
    name = select_backend("aggregated_attention", backend, q.device.type, attn_drop > 0.0 and training, is_tracing())
    if not isinstance(pool_bias, Tensor) and name != "torch":
        pool_bias = pool_bias.materialize()  # only the torch backend takes the bias as factors
    return _load(name).aggregated_attention(
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
    name = select_backend("full_attention", backend, q.device.type, attn_drop > 0.0 and training, is_tracing())
    if not isinstance(bias, Tensor) and name != "torch":
        bias = bias.materialize()
    return _load(name).full_attention(q, k, v, query_embedding, temperature, length_scale, bias, attn_drop, training)


def set_backend(model, backend: str | None) -> None:
    """Select the ops backend for every attention layer and Conv-GLU of ``model``.

    ``reference`` then means the reference formulation throughout (unfold attention, plain
    Conv-GLU and pooling branch): the baseline of the benchmarks.
    """
    if backend is not None:
        resolve_backend(backend, "cpu")  # validate the name
    for m in model.modules():
        if hasattr(m, "attn_backend"):
            m.attn_backend = backend
