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
The ``TRANSNEXT_ATTN_BACKEND`` environment variable overrides ``auto``. Which implementation
runs each call (reference, whole, blocked torch, blocked native, triton, a compiled custom op, ...)
is decided in one place, :func:`transnext.ops.dispatch.select_implementation`, from the problem
and the budgets of :class:`KernelPolicy` (changed with :func:`policy`);
:func:`describe_decisions` lists the decision of every layer of a model.

Layering (each module imports only from the layers below it; ``tests/test_dispatch.py`` checks):
shared helpers (``_common``, ``bias``) <- kernels (``reference``, ``torch_backend``, ``blocked``,
``native``, ``triton_backend``, ``conv_glu``, ``pooling``, ``bias_mlp``) <- custom-op wrappers
(``compiled``) <- ``dispatch`` <- this package.

The normalisation of queries and keys and the query scaling (query embedding, softplus
temperature, length scale) are part of the ops: the fast backends fuse them and keep only the
normalised tensors and their norms for backward.
"""

from __future__ import annotations

from torch import Tensor

from ._common import (
    AttentionInputs,
    CaptureMode,
    Geometry,
    KernelPolicy,
    QueryScaling,
    WindowTerms,
    autocast_dtype,
    capture_mode,
    current_policy,
    inference_chunks,
    policy,
)
from .bias_mlp import bias_mlp
from .dispatch import (
    BACKENDS,
    CAPABILITIES,
    ENV_VAR,
    AttentionProblem,
    Choice,
    LayerProblem,
    aggregated_problem,
    attention_chunks,
    describe_decisions,
    format_decisions,
    full_problem,
    resolve_backend,
    run_aggregated_attention,
    run_conv_glu,
    run_full_attention,
    run_sr_gelu_pool,
    select_backend,
    select_implementation,
    triton_usable,
    wants_factored_bias,
)

__all__ = [
    "BACKENDS",
    "CAPABILITIES",
    "ENV_VAR",
    "AttentionInputs",
    "AttentionProblem",
    "CaptureMode",
    "Choice",
    "Geometry",
    "KernelPolicy",
    "LayerProblem",
    "QueryScaling",
    "WindowTerms",
    "aggregated_attention",
    "aggregated_problem",
    "attention_chunks",
    "autocast_dtype",
    "available_backends",
    "bias_mlp",
    "capture_mode",
    "conv_glu",
    "current_policy",
    "describe_decisions",
    "format_decisions",
    "full_attention",
    "full_problem",
    "inference_chunks",
    "policy",
    "resolve_backend",
    "select_backend",
    "select_implementation",
    "set_backend",
    "sr_gelu_pool",
    "wants_factored_bias",
]


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
    (:class:`~transnext.ops.bias.SeparableBias`, large grids; implementations that do not take
    factors get it materialised); ``learnable_tokens`` (h, d, w*w);
    ``learnable_bias`` (h, 1, w*w); ``padding_mask`` (N, w*w) bool, True outside the image.
    Returns (B, h, N, d).
    """
    return run_aggregated_attention(
        AttentionInputs(q, k, v, k_pool, v_pool), QueryScaling(query_embedding, temperature, length_scale),
        WindowTerms(local_bias, learnable_tokens, learnable_bias, padding_mask), pool_bias,
        Geometry((int(size[0]), int(size[1])), int(window)), attn_drop, training, backend,
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
    grids (the blocked ``torch`` kernels take it a block of queries at a time; the others
    materialise it). Returns (B, h, N, d).
    """
    return run_full_attention(q, k, v, query_embedding, temperature, length_scale, bias, attn_drop, training, backend)


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


def conv_glu(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    dw_weight: Tensor,
    dw_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    size: tuple[int, int],
    drop: float = 0.0,
    training: bool = False,
    backend: str | None = None,
) -> Tensor:
    """``fc2(GELU(dwconv3x3(gate)) * value)``, ``[gate | value] = fc1(x)``; x: (B, N, C) over ``size``.

    The ``reference`` backend runs the plain module formulation (the baseline of benchmarks).
    """
    return run_conv_glu(x, fc1_weight, fc1_bias, dw_weight, dw_bias, fc2_weight, fc2_bias, size, drop, training, backend)


def sr_gelu_pool(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    size: tuple[int, int],
    pool: tuple[int, int],
    backend: str | None = None,
) -> Tensor:
    """``adaptive_avg_pool2d(GELU(conv1x1(x_map)), pool)`` as (B, Hp*Wp, C) tokens; x: (B, N, C) over ``size``.

    The ``reference`` backend runs the plain module formulation.
    """
    return run_sr_gelu_pool(x, weight, bias, size, pool, backend)
