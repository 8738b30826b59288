"""Helpers shared by every kernel: the size budgets (:class:`KernelPolicy`), the graph-capture mode,
compute dtype under autocast, normalisation and the pieces of the attention kernels' backward.

This is the bottom layer of ``transnext.ops``: it imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Literal, NamedTuple

import torch
from torch import Tensor

EPS = 1e-12  # F.normalize's default


# ------------------------------------------------------------------------------ budgets
@dataclasses.dataclass(frozen=True)
class KernelPolicy:
    """Every size budget the kernel choice and the kernels read, in one frozen value.

    Change them for a block of code with :func:`policy` (``transnext.ops.policy``); the values in
    force are :func:`current_policy`. Byte budgets compare the size of the tensor a path would hold.
    """

    # Largest pooled-key bias (h, N, Np) an Aggregated Attention layer builds whole; past it the layer
    # hands the kernel the bias as factors (SeparableBias). Stage 1 of transnext_tiny passes 16 MiB
    # from about 300 px.
    aggregated_bias_bytes: int = 16 << 20
    # In training the whole bias costs its construction's backward too (the gather's scatter-add and,
    # in interpolate mode, two bilinear resizes) where the factors' gradient is a few slab additions.
    aggregated_bias_bytes_training: int = 4 << 20
    # Largest full-attention bias (h, N, N) built whole; past it the bias is produced per block of
    # queries (BlockwiseBias). 64 MiB is N = 836 tokens at 24 heads (transnext_tiny's last stage at ~900 px).
    full_bias_bytes: int = 64 << 20
    # Whole (B, h, Np + w*w, N) logits are kept up to this size (small grids and batches: one pass over
    # everything); past it, or when the bias comes as factors, queries go in blocks of rows.
    whole_logits_bytes: int = 32 << 20
    # With gradients the whole-tensor path also keeps the probabilities for backward while the blocked
    # one recomputes them: on a 2-core CPU the blocked path was as fast in training (224 px batch 8:
    # within run-to-run noise) and lighter (peak -8% there, -14% at 512 px batch 2).
    whole_logits_bytes_training: int = 4 << 20
    # Logits of one block of the blocked kernel: B * h * rows * W * (Np + w*w) values. 2^20 floats keeps
    # a block's buffers in the L2/L3 caches of a CPU core pair while each matmul still has hundreds of rows
    # (on a 2-core Zen 3, blocks of 2^19 to 2^21 values ran within 5% of each other at 800 x 1344).
    block_elements: int = 1 << 20
    # Full attention runs in blocks of query rows once its (B, h, N, N) logits would pass this size:
    # at 2048 px the last stage has N = 4096 tokens, i.e. 1.6 GB per (h, N, N) tensor.
    full_attention_block_bytes: int = 64 << 20
    # Inference runs big activations in chunks of at least this many tokens: small enough that transient
    # buffers stay cache- and allocator-friendly (fresh multi-MB buffers cost page faults), large enough
    # that every matmul stays efficient.
    min_chunk_tokens: int = 2048
    # Position-bias MLP inputs per chunk, in training and at inference: 2,048 x 512 hidden floats = 4 MiB.
    # Training at dense sizes recomputes each chunk's hidden activation in backward instead of keeping it.
    bias_mlp_rows: int = 2048

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            least = 1 if f.name in _AT_LEAST_ONE else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"kernel policy {f.name} must be an integer >= {least}, got {value!r}")


_AT_LEAST_ONE = frozenset({"block_elements", "min_chunk_tokens", "bias_mlp_rows"})
# The default is frozen, so sharing it is safe; a default given here (not to get()) is what torch.compile traces.
_POLICY: contextvars.ContextVar[KernelPolicy] = contextvars.ContextVar(
    "transnext_kernel_policy", default=KernelPolicy())  # noqa: B039


def current_policy() -> KernelPolicy:
    """The budgets in force in this thread / task (the defaults unless :func:`policy` changed them)."""
    return _POLICY.get()


@contextlib.contextmanager
def policy(**budgets: int) -> Iterator[KernelPolicy]:
    """Run a block with some budgets of :class:`KernelPolicy` changed, e.g.
    ``with transnext.ops.policy(whole_logits_bytes=0): ...`` (always the blocked kernel).

    The change is local to the current thread or asyncio task (a context variable) and undone on exit.
    """
    names = {f.name for f in dataclasses.fields(KernelPolicy)}
    unknown = sorted(set(budgets) - names)
    if unknown:
        raise TypeError(f"unknown kernel budget(s) {', '.join(unknown)}; expected some of {', '.join(sorted(names))}")
    token = _POLICY.set(dataclasses.replace(current_policy(), **budgets))
    try:
        yield current_policy()
    finally:
        _POLICY.reset(token)


# ------------------------------------------------------------------------------ parameter bundles
class AttentionInputs(NamedTuple):
    """Projected queries, keys and values (B, h, N, d) over a row-major grid and the pooled keys and
    values (B, h, Np, d); any strides (views of the projection outputs avoid copies). Keys are raw
    (the kernels normalise them)."""

    q: Tensor
    k: Tensor
    v: Tensor
    k_pool: Tensor
    v_pool: Tensor


class QueryScaling(NamedTuple):
    """``qs = (q_hat + query_embedding) * softplus(temperature) * length_scale``: ``query_embedding``
    (h, 1, d), ``temperature`` (h, 1, 1) the raw parameter, ``length_scale`` (N, 1) ln(keys per query)."""

    query_embedding: Tensor
    temperature: Tensor
    length_scale: Tensor


class WindowTerms(NamedTuple):
    """The local window's own terms: ``local_bias`` (h, w*w), ``learnable_tokens`` (h, d, w*w),
    ``learnable_bias`` (h, 1, w*w) and ``padding_mask`` (N, w*w) bool, True outside the image."""

    local_bias: Tensor
    learnable_tokens: Tensor
    learnable_bias: Tensor
    padding_mask: Tensor


class Geometry(NamedTuple):
    """The (H, W) query grid and the odd local window size."""

    size: tuple[int, int]
    window: int


# The flat tensor arguments of the Aggregated Attention kernels that take the pooled-key bias as factors
# (the autograd Function and the registered custom ops), in order; ``mult``, the softplus of the
# temperature, stands for the raw parameter.
AA_FLAT_FIELDS = ("q", "k", "v", "k_pool", "v_pool", "query_embedding", "mult", "length_scale", "local_bias",
                  "bias_table", "bias_y_index", "bias_y_weight", "learnable_tokens", "learnable_bias", "padding_mask")
# Those of them that get a gradient.
AA_DIFFERENTIABLE = ("q", "k", "v", "k_pool", "v_pool", "query_embedding", "mult", "local_bias", "bias_table",
                     "learnable_tokens", "learnable_bias")


# ------------------------------------------------------------------------------ graph capture
CaptureMode = Literal["eager", "compile", "export", "fx"]


def _fx_tracing() -> bool:
    symbolic = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None)  # torch >= 2.5
    return bool(symbolic() if symbolic is not None else torch.fx._symbolic_trace.is_fx_tracing())


def capture_mode() -> CaptureMode:
    """How the running code is being captured, decided here only:

    * ``"fx"``: torch.fx symbolic tracing (proxies stand in for tensors and sizes);
    * ``"export"``: torch.export, ONNX export, TorchScript tracing or scripting: the graph must hold
      standard ops only (no transnext custom op);
    * ``"compile"``: torch.compile (the kernels may run as registered custom ops);
    * ``"eager"``: none of these.
    """
    if _fx_tracing():
        return "fx"
    exporting = getattr(torch.compiler, "is_exporting", None)
    onnx = getattr(torch, "onnx", None)
    if (torch.jit.is_tracing() or torch.jit.is_scripting() or (exporting is not None and exporting())
            or bool(onnx is not None and getattr(onnx, "is_in_onnx_export", lambda: False)())):
        return "export"
    if torch.compiler.is_compiling():
        return "compile"
    return "eager"


# ------------------------------------------------------------------------------ kernel helpers
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


def window_offsets(window: int) -> list[tuple[int, int, int]]:
    """(slot, row offset, column offset) of every slot of a ``window`` x ``window`` local window."""
    return [(o, o // window, o % window) for o in range(window * window)]


def local_table(local_bias: Tensor, padding_mask: Tensor, dtype: torch.dtype, keys_major: bool = False) -> Tensor:
    """The local position bias with -inf on window slots outside the image: (h, N, L), or (h, L, N)
    with ``keys_major`` (the whole-tensor kernel's logits layout)."""
    mask = padding_mask.t() if keys_major else padding_mask
    neg = torch.zeros(mask.shape, dtype=dtype, device=local_bias.device)
    neg.masked_fill_(mask.to(local_bias.device), float("-inf"))
    bias = local_bias.to(dtype)
    return (bias.unsqueeze(-1) if keys_major else bias.unsqueeze(1)) + neg


def cast(x: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``x`` in ``dtype`` (None stays None): a gradient handed back in its input's dtype."""
    return None if x is None else x.to(dtype)


def attention_input_grads(
    dqs: Tensor, dq_hat: Tensor, q_hat: Tensor, q_norm: Tensor, qe: Tensor, factor: Tensor, length_scale: Tensor,
    dk_pad: Tensor | None, dv_pad: Tensor | None, k_pad: Tensor, k_norm: Tensor, dkp_hat: Tensor | None,
    kp_hat: Tensor, kp_norm: Tensor, size: tuple[int, int], window: int, need_q: bool, need_mult: bool, need_qe: bool,
) -> dict[str, Tensor | None]:
    """The common tail of the Aggregated Attention kernels' backward: from the gradients of the scaled
    queries, normalised queries, padded keys / values and normalised pooled keys to those of the raw
    inputs and of the query scaling. Returns ``q``, ``k``, ``v``, ``k_pool``, ``mult``, ``qe`` (None
    where not wanted)."""
    d_mult, d_qe = scaled_query_backward(dqs, dq_hat, q_hat, qe, factor, length_scale, need_mult, need_qe)
    del dqs
    dq = normalize_backward(dq_hat, q_hat, q_norm) if need_q else None
    dk, dv = window_input_grads(dk_pad, dv_pad, k_pad, k_norm, size, window // 2)
    dkp = normalize_backward(dkp_hat, kp_hat, kp_norm) if dkp_hat is not None else None
    return dict(q=dq, k=dk, v=dv, k_pool=dkp, mult=d_mult, qe=d_qe)


def batch_chunks(B: int, N: int, min_tokens: int) -> list[tuple[int, int]]:
    """Groups [b0, b1) of images with at least ``min_tokens`` tokens each (and two images: oneDNN runs a
    batch of one in NCHW, which costs layout copies); one group when the batch is that small."""
    per = max(2, -(-min_tokens // max(1, N)))
    return [(b, min(B, b + per)) for b in range(0, B, per)]


def inference_chunks(x: Tensor, size: tuple[int, int], bands: bool = False) -> list[tuple[int, int, int, int]] | None:
    """Chunks (b0, b1, y0, y1) of images / row bands to run a no-grad op on, or None for one pass.

    Whole images are grouped up to ``KernelPolicy.min_chunk_tokens``; with ``bands``, an image of more
    than eight times that is split into bands of rows (the op supplies its own halo rows). Autograd and
    graph capture run in one pass.
    """
    if torch.is_grad_enabled() or capture_mode() != "eager":
        return None
    min_tokens = current_policy().min_chunk_tokens
    B = x.shape[0]
    H, W = size
    N = H * W
    if bands and N >= 8 * min_tokens:
        rows = max(16, -(-2 * min_tokens // W))
        return [(b, b + 1, y, min(H, y + rows)) for b in range(B) for y in range(0, H, rows)]
    chunks = batch_chunks(B, N, min_tokens)
    if len(chunks) == 1:
        return None
    return [(b0, b1, 0, H) for b0, b1 in chunks]
