"""Which implementation runs an op: one function, :func:`select_implementation`, decides.

The caller describes the problem (:class:`AttentionProblem` / :class:`LayerProblem`: the op, the
requested backend, device, dtype, whether a gradient is wanted, the graph-capture mode, dropout,
autocast and the shapes) and the budgets in force (:class:`KernelPolicy`, changed with
:func:`transnext.ops.policy`). Each op has an ordered list of implementations; each declares what
it takes (a factored position bias or not) and has a ``can_run`` check that returns None or the
reason it cannot. The first that can run is chosen; the :class:`Choice` carries the reasons of
those refused before it. The kernels below this module only assert their preconditions.

Backends by name (``attn_backend=`` of a model, :meth:`TransNeXt.set_attn_backend`,
:func:`transnext.ops.set_backend`) or ``"auto"``: ``auto`` reads ``TRANSNEXT_ATTN_BACKEND`` and
otherwise picks ``triton`` for CUDA tensors when it is installed, else ``torch``. What ``triton``
does not cover (full attention, Conv-GLU, the pooling branch, dropout on the attention
probabilities, graph capture) runs in ``torch``, with a warning once per process; ``reference``
and ``torch`` cover every op in every situation.

Aggregated attention, in order of preference:

1. ``reference``: the unfold formulation (requested backend ``reference``);
2. ``triton``: fused kernels (requested ``triton``; CUDA, no dropout, no graph capture);
3. ``functional``: standard ops for graph export (torch.export, ONNX, TorchScript, fx), and for
   dropout under torch.compile;
4. ``compiled_inference``: under torch.compile without autograd or autocast, the eager kernel of
   the same problem (``whole`` / ``blocked_native`` / ``blocked_torch``) as one custom op;
5. ``compiled_blocked``: under torch.compile otherwise, the blocked kernels and their backward as
   custom ops;
6. ``whole``: one pass over whole logits (small problems, dropout);
7. ``blocked_native``: blocks of query rows in the native CPU kernel;
8. ``blocked_torch``: blocks of query rows in torch ops.

Full attention: ``reference``, ``inference`` (CPU, no autograd: blocks with the bias written into
the logits), ``sdpa`` (whole logits; graph capture), ``sdpa_blocked``. Conv-GLU and the pooling
branch: ``reference``, ``compiled_inference``, ``compiled_train`` (Conv-GLU), ``traceable``,
``recompute`` (autograd, recomputing backward), ``inference``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from . import compiled, native
from . import conv_glu as _conv_glu
from . import pooling as _pooling
from . import reference as _reference
from . import torch_backend as _torch
from ._common import (
    AttentionInputs,
    CaptureMode,
    Geometry,
    KernelPolicy,
    QueryScaling,
    WindowTerms,
    autocast_dtype,
    batch_chunks,
    capture_mode,
    current_policy,
)
from .blocked import blocked_aggregated_attention

__all__ = [
    "BACKENDS", "CAPABILITIES", "ENV_VAR", "AttentionProblem", "Capabilities", "Choice", "Implementation",
    "LayerProblem", "IMPLEMENTATIONS", "describe_decisions", "format_decisions", "resolve_backend", "select_backend",
    "select_implementation", "triton_usable",
]

ENV_VAR = "TRANSNEXT_ATTN_BACKEND"
OPS = ("aggregated_attention", "full_attention", "conv_glu", "sr_gelu_pool")
_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ backends by name
@dataclass(frozen=True)
class Capabilities:
    """What a backend runs: ops, device types, attention dropout, graph capture (tracing/export)."""

    ops: tuple[str, ...]
    devices: tuple[str, ...] | None  # None: any device
    dropout: bool
    tracing: bool


CAPABILITIES: dict[str, Capabilities] = {
    "reference": Capabilities(OPS, None, dropout=True, tracing=True),
    "torch": Capabilities(OPS, None, dropout=True, tracing=True),
    # CPU only under TRITON_INTERPRET=1 (tests); see triton_usable().
    "triton": Capabilities(("aggregated_attention",), ("cuda", "cpu"), dropout=False, tracing=False),
}
BACKENDS = tuple(CAPABILITIES)

_warned: set[tuple[str, str, str]] = set()


def triton_usable(device_type: str) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests only)."""
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if device_type not in ("cuda", "cpu"):
        return False
    try:
        from . import triton_backend
    except ImportError:
        return False
    return bool(triton_backend.is_available())


def resolve_backend(name: str | None, device_type: str) -> str:
    """Turn ``None`` / ``"auto"`` / an explicit name into a concrete backend name."""
    if name is None or name == "auto":
        name = os.environ.get(ENV_VAR, "auto") or "auto"
    if name == "auto":
        return "triton" if device_type == "cuda" and triton_usable(device_type) else "torch"
    if name not in CAPABILITIES:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {', '.join(BACKENDS)} or 'auto'")
    return name


def _backend_refusal(op: str, backend: str, device_type: str, dropout: bool, tracing: bool) -> str | None:
    """Why ``backend`` cannot run ``op`` in this situation (it then runs in ``torch``), or None."""
    caps = CAPABILITIES[backend]
    if op not in caps.ops:
        return f"it has no {op} kernel"
    if dropout and not caps.dropout:
        return "it does not support dropout on the attention probabilities"
    if tracing and not caps.tracing:
        return "graphs for tracing, export or compilation need standard ops"
    if backend == "triton" and not triton_usable(device_type):
        raise RuntimeError(
            f"attention backend 'triton' cannot run on {device_type} tensors here: it needs CUDA and the "
            "triton package (on CPU only under TRITON_INTERPRET=1, for tests); use 'torch' or 'auto'"
        )
    return None


def _fallback(op: str, backend: str, reason: str) -> str:
    key = (backend, op, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"transnext: {op} runs in the 'torch' backend instead of {backend!r}: {reason}", stacklevel=4)
    return "torch"


def select_backend(op: str, name: str | None, device_type: str, dropout: bool = False, tracing: bool = False) -> str:
    """The backend that runs ``op`` for a request of ``name``: the resolved one, or ``torch`` (warned once)."""
    backend = resolve_backend(name, device_type)
    reason = _backend_refusal(op, backend, device_type, dropout, tracing)
    return backend if reason is None else _fallback(op, backend, reason)


# ------------------------------------------------------------------------------ problems and choices
@dataclass(frozen=True)
class AttentionProblem:
    """What the kernel choice of one attention call depends on (no tensors)."""

    op: str  # "aggregated_attention" or "full_attention"
    backend: str  # the requested backend, resolved ("reference", "torch", "triton")
    device: str  # device type
    dtype: torch.dtype  # the inputs' dtype
    grad: bool  # autograd wants a gradient of some input
    capture: CaptureMode
    autocast: bool
    dropout: bool  # dropout on the attention probabilities (p > 0 in training)
    batch: int
    heads: int
    tokens: int  # N queries
    keys: int  # pooled keys (aggregated) or N (full)
    head_dim: int
    window: int = 0  # local window (aggregated)
    factored_bias: bool = False  # the position bias arrives as factors (SeparableBias / BlockwiseBias)
    bias_dtype: torch.dtype | None = None  # the position bias's dtype (default: the inputs')

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the fused kernels compute in (float32 for half inputs)."""
        return torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype

    @property
    def logits_bytes(self) -> int:
        """Bytes of the whole logits: (B, h, w*w + Np, N), or (B, h, N, N) for full attention."""
        local = self.window * self.window if self.op == "aggregated_attention" else 0
        return self.batch * self.heads * self.tokens * (self.keys + local) * self.compute_dtype.itemsize

    @property
    def bias_bytes(self) -> int:
        """Bytes of the whole position bias (h, N, keys)."""
        return self.heads * self.tokens * self.keys * (self.bias_dtype or self.dtype).itemsize


@dataclass(frozen=True)
class LayerProblem:
    """What the kernel choice of a Conv-GLU or pooling-branch call depends on."""

    op: str  # "conv_glu" or "sr_gelu_pool"
    backend: str
    device: str
    grad: bool
    capture: CaptureMode
    autocast: bool
    dropout: bool = False  # dropout on Conv-GLU's activations (p > 0 in training)
    biases: bool = True  # Conv-GLU: fc1 and fc2 have biases (the compiled training op needs them)


Problem = AttentionProblem | LayerProblem


@dataclass(frozen=True)
class Choice:
    """The implementation that runs, why, and why each earlier candidate did not."""

    op: str
    impl: str
    reason: str
    refused: tuple[tuple[str, str], ...] = ()
    kernel: str | None = None  # the eager kernel inside a compiled custom op
    factored_bias: bool = False  # the implementation takes the position bias as factors

    def __str__(self) -> str:
        name = f"{self.impl}({self.kernel})" if self.kernel else self.impl
        # Candidates for another situation (compiler, export, autograd) are left out of the text.
        refused = "; ".join(f"not {n}: {r}" for n, r in self.refused
                            if r not in _SITUATIONAL and not r.startswith("not requested"))
        return f"{name}: {self.reason}" + (f" [{refused}]" if refused else "")


_SITUATIONAL = frozenset({"not under torch.compile", "no graph export", "no graph capture", "no gradient is wanted",
                          "graph capture needs standard ops"})


@dataclass(frozen=True)
class Implementation:
    """One way to run an op: its name, the backend it belongs to, whether it takes a factored bias,
    and ``can_run(problem, policy)`` -> None or the reason it cannot."""

    name: str
    backends: tuple[str, ...]  # the requested backends it serves
    can_run: Callable[[Problem, KernelPolicy], str | None]
    factored_bias: bool = False


def _mib(n: int) -> str:
    return f"{n / 2**20:.3g} MiB"


def _native_takes(problem: AttentionProblem) -> str | None:
    """Why the native CPU kernel cannot run this problem's blocks (None when it can)."""
    if problem.device != "cpu":
        return f"it runs on CPU tensors, not {problem.device}"
    return _native_ready(problem.compute_dtype, problem.head_dim, problem.window)


@torch.compiler.assume_constant_result
def _native_ready(dtype: torch.dtype, head_dim: int, window: int) -> str | None:
    # A constant for the compiler: the kernel's availability is looked up (built on first use) outside the graph.
    if not native.supports(torch.empty((0, head_dim), dtype=dtype), window):
        if not native.available(dtype):
            return native.describe(dtype)
        return f"it does not take {dtype} with head size {head_dim} and a {window}x{window} window"
    return None


def _requested(backend: str) -> Callable[[Problem], str | None]:
    return lambda p: None if p.backend == backend else f"not requested (backend {p.backend})"


# Each check returns None (may run) or the reason it may not.
def _aa_reference(p: AttentionProblem, _: KernelPolicy) -> str | None:
    return _requested("reference")(p)


def _aa_triton(p: AttentionProblem, _: KernelPolicy) -> str | None:
    return _requested("triton")(p)


def _aa_functional(p: AttentionProblem, _: KernelPolicy) -> str | None:
    if p.capture in ("export", "fx"):
        return None
    if p.capture == "compile" and p.dropout:
        return None
    return "no graph export" if p.capture == "eager" else "the compiler keeps the eager kernels as custom ops"


def _aa_compiled_inference(p: AttentionProblem, _: KernelPolicy) -> str | None:
    if p.capture != "compile":
        return "not under torch.compile"
    if p.grad or p.autocast:
        return "a gradient is wanted" if p.grad else "under autocast"
    return None


def _aa_compiled_blocked(p: AttentionProblem, _: KernelPolicy) -> str | None:
    return None if p.capture == "compile" else "not under torch.compile"


def _aa_whole(p: AttentionProblem, policy: KernelPolicy) -> str | None:
    if p.dropout:
        return None
    if p.factored_bias:
        return "the bias comes as factors"
    limit = policy.whole_logits_bytes_training if p.grad else policy.whole_logits_bytes
    if p.logits_bytes > limit:
        return f"whole logits of {_mib(p.logits_bytes)} pass the {_mib(limit)} budget"
    return None


def _aa_blocked_native(p: AttentionProblem, _: KernelPolicy) -> str | None:
    return _native_takes(p)


def _full_reference(p: AttentionProblem, _: KernelPolicy) -> str | None:
    return _requested("reference")(p)


def _full_inference(p: AttentionProblem, _: KernelPolicy) -> str | None:
    if p.capture != "eager":
        return "graph capture needs standard ops"
    if p.grad:
        return "a gradient is wanted"
    if p.device != "cpu":
        return "CUDA's fused attention never materialises the logits" if p.device == "cuda" else f"not on CPU ({p.device})"
    return "under autocast" if p.autocast else None


def _full_rows(p: AttentionProblem, policy: KernelPolicy) -> int:
    return max(1, policy.full_attention_block_bytes // (p.compute_dtype.itemsize * p.batch * p.heads * p.keys))


def _full_sdpa(p: AttentionProblem, policy: KernelPolicy) -> str | None:
    if p.capture != "eager" or _full_rows(p, policy) >= p.tokens:
        return None
    return f"whole logits of {_mib(p.logits_bytes)} pass the {_mib(policy.full_attention_block_bytes)} block budget"


def _layer_reference(p: LayerProblem, _: KernelPolicy) -> str | None:
    if p.backend == "reference" or p.dropout:
        return None
    return f"not requested (backend {p.backend})"


def _layer_compiled_inference(p: LayerProblem, _: KernelPolicy) -> str | None:
    if p.capture != "compile":
        return "not under torch.compile"
    if p.grad or p.autocast:
        return "a gradient is wanted" if p.grad else "under autocast"
    return None


def _layer_compiled_train(p: LayerProblem, _: KernelPolicy) -> str | None:
    if p.capture != "compile":
        return "not under torch.compile"
    if p.autocast:
        return "under autocast"
    return None if p.biases else "the compiled op needs the fc1 and fc2 biases"


def _layer_traceable(p: LayerProblem, _: KernelPolicy) -> str | None:
    return None if p.capture != "eager" else "no graph capture"


def _layer_recompute(p: LayerProblem, _: KernelPolicy) -> str | None:
    return None if p.grad else "no gradient is wanted"


def _always(_p: Problem, _policy: KernelPolicy) -> str | None:
    return None


IMPLEMENTATIONS: dict[str, tuple[Implementation, ...]] = {
    "aggregated_attention": (
        Implementation("reference", ("reference",), _aa_reference),
        Implementation("triton", ("triton",), _aa_triton),
        Implementation("functional", ("torch",), _aa_functional),
        Implementation("compiled_inference", ("torch",), _aa_compiled_inference, factored_bias=True),
        Implementation("compiled_blocked", ("torch",), _aa_compiled_blocked, factored_bias=True),
        Implementation("whole", ("torch",), _aa_whole),
        Implementation("blocked_native", ("torch",), _aa_blocked_native, factored_bias=True),
        Implementation("blocked_torch", ("torch",), _always, factored_bias=True),
    ),
    "full_attention": (
        Implementation("reference", ("reference",), _full_reference),
        Implementation("inference", ("torch",), _full_inference, factored_bias=True),
        Implementation("sdpa", ("torch",), _full_sdpa),
        Implementation("sdpa_blocked", ("torch",), _always, factored_bias=True),
    ),
    "conv_glu": (
        Implementation("reference", ("reference", "torch"), _layer_reference),
        Implementation("compiled_inference", ("torch",), _layer_compiled_inference),
        Implementation("compiled_train", ("torch",), _layer_compiled_train),
        Implementation("traceable", ("torch",), _layer_traceable),
        Implementation("recompute", ("torch",), _layer_recompute),
        Implementation("inference", ("torch",), _always),
    ),
    "sr_gelu_pool": (
        Implementation("reference", ("reference", "torch"), _layer_reference),
        Implementation("compiled_inference", ("torch",), _layer_compiled_inference),
        Implementation("traceable", ("torch",), _layer_traceable),
        Implementation("recompute", ("torch",), _layer_recompute),
        Implementation("inference", ("torch",), _always),
    ),
}

_ACCEPTED = {
    "reference": "requested", "triton": "requested", "functional": "graph export needs standard ops",
    "compiled_inference": "torch.compile keeps the eager kernel as a custom op",
    "compiled_blocked": "torch.compile keeps the blocked kernels and their backward as custom ops",
    "compiled_train": "torch.compile keeps the recomputing kernel and its backward as custom ops",
    "whole": "small enough for one pass", "blocked_native": "native CPU kernel", "blocked_torch": "blocks of query rows",
    "inference": "no autograd", "sdpa": "whole logits", "sdpa_blocked": "blocks of query rows",
    "traceable": "graph capture needs standard ops", "recompute": "autograd, recomputing backward",
}


def select_implementation(problem: Problem, policy: KernelPolicy | None = None) -> Choice:
    """The implementation that runs ``problem`` under ``policy`` (default: the budgets in force).

    The requested backend first gives way to ``torch`` where it cannot run the problem (warned once);
    then the op's implementations are tried in order and the first whose ``can_run`` check passes is
    chosen, with the reasons of the ones refused before it.
    """
    policy = current_policy() if policy is None else policy
    candidates = IMPLEMENTATIONS.get(problem.op)
    if candidates is None:
        raise ValueError(f"unknown op {problem.op!r}; expected one of {', '.join(IMPLEMENTATIONS)}")
    refused: list[tuple[str, str]] = []
    backend = problem.backend
    reason = _backend_refusal(problem.op, backend, problem.device, problem.dropout, problem.capture != "eager")
    if reason is not None:
        refused.append((backend, reason))
        backend = _fallback(problem.op, backend, reason)
        problem = dataclasses.replace(problem, backend=backend)
    for impl in candidates:
        if backend not in impl.backends:
            continue
        why_not = impl.can_run(problem, policy)
        if why_not is not None:
            refused.append((impl.name, why_not))
            continue
        kernel = _inner_kernel(impl.name, problem, policy)
        reason = _ACCEPTED.get(impl.name, "")
        if impl.name == "reference" and isinstance(problem, LayerProblem) and problem.backend != "reference":
            reason = "dropout on the activations"
        elif impl.name == "whole" and isinstance(problem, AttentionProblem) and problem.dropout:
            reason = "dropout needs the whole probabilities"
        return Choice(problem.op, impl.name, reason, tuple(refused), kernel, impl.factored_bias)
    raise AssertionError(f"no implementation of {problem.op} accepted {problem}")  # the last one always runs


def _inner_kernel(name: str, problem: Problem, policy: KernelPolicy) -> str | None:
    """The eager kernel a compiled custom op runs: what an eager call of the same problem would pick
    (for the inference op, per group of images as the op runs them)."""
    if name == "compiled_inference" and isinstance(problem, AttentionProblem):
        largest = max(b1 - b0 for b0, b1 in batch_chunks(problem.batch, problem.tokens, policy.min_chunk_tokens))
        eager = dataclasses.replace(problem, capture="eager", batch=largest)
        return select_implementation(eager, policy).impl
    if name == "compiled_blocked":
        return "blocked_native" if _aa_blocked_native(problem, policy) is None else "blocked_torch"
    return None


def wants_factored_bias(problem: AttentionProblem, policy: KernelPolicy | None = None) -> bool:
    """Whether a layer should hand this problem its position bias as factors: the chosen
    implementation takes them and the whole bias would pass its budget."""
    policy = current_policy() if policy is None else policy
    if problem.op == "aggregated_attention":
        limit = policy.aggregated_bias_bytes_training if problem.grad else policy.aggregated_bias_bytes
    else:
        limit = policy.full_bias_bytes
    if problem.bias_bytes <= limit:
        return False
    choice = select_implementation(dataclasses.replace(problem, factored_bias=True), policy)
    return choice.factored_bias


# ------------------------------------------------------------------------------ problems from tensors
def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def aggregated_problem(inputs: AttentionInputs, scaling: QueryScaling, terms: WindowTerms, bias, geometry: Geometry,
                       attn_drop: float, training: bool, backend: str | None,
                       extra_grad: tuple = (), bias_dtype: torch.dtype | None = None) -> AttentionProblem:
    """The :class:`AttentionProblem` of an Aggregated Attention call (``extra_grad``: more tensors whose
    gradient counts, e.g. the bias MLP's parameters before the bias is built)."""
    q, k_pool = inputs.q, inputs.k_pool
    bias_tensors = (bias,) if isinstance(bias, Tensor) else (bias.table,) if bias is not None else ()
    B, h, N, d = q.shape
    return AttentionProblem(
        op="aggregated_attention", backend=resolve_backend(backend, _device(q)), device=_device(q), dtype=q.dtype,
        grad=_needs_grad((*inputs, *scaling[:2], terms.local_bias, terms.learnable_tokens, terms.learnable_bias,
                          *bias_tensors, *extra_grad)),
        capture=capture_mode(), autocast=autocast_dtype(q) is not None, dropout=attn_drop > 0.0 and training,
        batch=B, heads=h, tokens=N, keys=k_pool.shape[2], head_dim=d, window=geometry.window,
        factored_bias=bias is not None and not isinstance(bias, Tensor),
        bias_dtype=bias_dtype if bias_dtype is not None else bias.dtype if bias is not None else None,
    )


def full_problem(q: Tensor, tensors: tuple, bias, attn_drop: float, training: bool, backend: str | None,
                 extra_grad: tuple = (), bias_dtype: torch.dtype | None = None) -> AttentionProblem:
    """The :class:`AttentionProblem` of a full-attention call."""
    B, h, N, d = q.shape
    bias_tensors = (bias,) if isinstance(bias, Tensor) else ()
    return AttentionProblem(
        op="full_attention", backend=resolve_backend(backend, _device(q)), device=_device(q), dtype=q.dtype,
        grad=_needs_grad((q, *tensors, *bias_tensors, *extra_grad)) or (
            bias is not None and not isinstance(bias, Tensor) and _lazy_grad(bias)),
        capture=capture_mode(), autocast=autocast_dtype(q) is not None, dropout=attn_drop > 0.0 and training,
        batch=B, heads=h, tokens=N, keys=N, head_dim=d, factored_bias=bias is not None and not isinstance(bias, Tensor),
        bias_dtype=bias_dtype if bias_dtype is not None else bias.dtype if bias is not None else None,
    )


def _lazy_grad(bias) -> bool:
    return torch.is_grad_enabled() and bool(getattr(bias.table, "requires_grad", False))


# ------------------------------------------------------------------------------ running the choice
def _record(choice: Choice) -> None:
    rec = _RECORDING.get()
    if rec is not None:
        rec.rows.append((rec.layer, choice))
    elif capture_mode() == "eager" and _log.isEnabledFor(logging.DEBUG):
        _log.debug("%s: %s", choice.op, choice)


def _device(t: Tensor) -> str:
    rec = _RECORDING.get()
    return rec.device if rec is not None and rec.device is not None else t.device.type


def _planning() -> bool:
    rec = _RECORDING.get()
    return rec is not None and rec.plan_only


def run_aggregated_attention(inputs: AttentionInputs, scaling: QueryScaling, terms: WindowTerms, bias,
                             geometry: Geometry, attn_drop: float = 0.0, training: bool = False,
                             backend: str | None = None) -> Tensor:
    """Choose and run the Aggregated Attention implementation for these inputs (see the module notes)."""
    policy = current_policy()
    problem = aggregated_problem(inputs, scaling, terms, bias, geometry, attn_drop, training, backend)
    choice = select_implementation(problem, policy)
    _record(choice)
    if _planning():
        return inputs.q.new_empty(inputs.q.shape)
    if not isinstance(bias, Tensor) and not choice.factored_bias:
        bias = bias.materialize()  # the implementation takes the whole bias
    impl = choice.impl
    if impl == "reference":
        return _reference.aggregated_attention(inputs, scaling, terms, bias, geometry, attn_drop, training)
    if impl == "triton":
        from . import triton_backend  # imported when chosen: it imports triton

        return triton_backend.aggregated_attention(inputs, scaling, terms, bias, geometry)
    if impl == "functional":
        return _torch.functional_aggregated_attention(inputs, scaling, terms, bias, geometry, attn_drop, training)
    if impl == "compiled_inference":
        return compiled.aggregated_attention_inference(inputs, scaling, terms, bias, geometry, kernel=choice.kernel,
                                                       block_elements=policy.block_elements,
                                                       chunk_tokens=policy.min_chunk_tokens)
    if impl == "compiled_blocked":
        return compiled.aggregated_attention_training(inputs, scaling, terms, bias, geometry, kernel=choice.kernel,
                                                      block_elements=policy.block_elements)
    if impl == "whole":
        return _torch.whole_aggregated_attention(inputs, scaling, terms, bias, geometry, attn_drop, training)
    return blocked_aggregated_attention(inputs, scaling, terms, bias, geometry, native=impl == "blocked_native",
                                        block_elements=policy.block_elements)


def run_full_attention(q: Tensor, k: Tensor, v: Tensor, query_embedding: Tensor, temperature: Tensor,
                       length_scale, bias, attn_drop: float = 0.0, training: bool = False,
                       backend: str | None = None) -> Tensor:
    """Choose and run the full-attention implementation for these inputs."""
    policy = current_policy()
    problem = full_problem(q, (k, v, query_embedding, temperature), bias, attn_drop, training, backend)
    choice = select_implementation(problem, policy)
    _record(choice)
    if _planning():
        return q.new_empty(q.shape)
    if not isinstance(bias, Tensor) and not choice.factored_bias:
        bias = bias.materialize()
    args = (q, k, v, query_embedding, temperature, length_scale, bias, attn_drop, training)
    if choice.impl == "reference":
        return _reference.full_attention(*args)
    return _torch.full_attention(*args, kernel=choice.impl, block_bytes=policy.full_attention_block_bytes)


def _layer_problem(op: str, x: Tensor, tensors: tuple, backend: str | None, dropout: bool = False,
                   biases: bool = True) -> LayerProblem:
    return LayerProblem(op=op, backend=resolve_backend(backend, _device(x)), device=_device(x),
                        grad=_needs_grad((x, *tensors)), capture=capture_mode(), autocast=autocast_dtype(x) is not None,
                        dropout=dropout, biases=biases)


def run_conv_glu(x: Tensor, w1: Tensor, b1: Tensor | None, wd: Tensor, bd: Tensor | None, w2: Tensor,
                 b2: Tensor | None, size: tuple[int, int], drop: float = 0.0, training: bool = False,
                 backend: str | None = None) -> Tensor:
    """Choose and run the Conv-GLU implementation."""
    size = tuple(size)
    problem = _layer_problem("conv_glu", x, (w1, b1, wd, bd, w2, b2), backend, drop > 0.0 and training,
                             b1 is not None and b2 is not None)
    choice = select_implementation(problem)
    _record(choice)
    if _planning():
        return x.new_empty(x.shape[:-1] + (w2.shape[0],))
    args = (x, w1, b1, wd, bd, w2, b2, size)
    impl = choice.impl
    if impl == "reference":
        return _conv_glu._plain(*args, drop, training)
    if impl == "compiled_inference":
        return compiled.conv_glu_inference(*args)
    if impl == "compiled_train":
        return compiled.conv_glu_train(*args)
    if impl == "traceable":
        return _conv_glu.traceable(*args)
    if impl == "recompute":
        return _conv_glu.recompute(*args)
    return _conv_glu.inference(*args)


def run_sr_gelu_pool(x: Tensor, weight: Tensor, bias: Tensor | None, size: tuple[int, int], pool: tuple[int, int],
                     backend: str | None = None) -> Tensor:
    """Choose and run the pooling-branch implementation."""
    size, pool = tuple(size), tuple(pool)
    choice = select_implementation(_layer_problem("sr_gelu_pool", x, (weight, bias), backend))
    _record(choice)
    if _planning():
        return x.new_empty((x.shape[0], pool[0] * pool[1], weight.shape[0]))
    impl = choice.impl
    if impl == "reference":
        return _pooling.plain(x, weight, bias, size, pool)
    if impl == "compiled_inference":
        return compiled.sr_gelu_pool_inference(x, weight, bias, size, pool)
    if impl == "recompute":
        return _pooling.recompute(x, weight, bias, size, pool)
    return _pooling.inference(x, weight, bias, size, pool)  # also the traceable form


def attention_chunks(x: Tensor, size: tuple[int, int], backend: str | None) -> list[tuple[int, int, int, int]] | None:
    """Groups of images an attention layer runs at inference (None: one pass). The reference
    formulation runs the whole batch at once, as the original does."""
    if resolve_backend(backend, _device(x)) == "reference":
        return None
    from ._common import inference_chunks

    return inference_chunks(x, size)


# ------------------------------------------------------------------------------ decisions per layer
@dataclass
class _Recording:
    device: str | None
    plan_only: bool
    layer: str = ""
    rows: list = dataclasses.field(default_factory=list)


_RECORDING: contextvars.ContextVar[_Recording | None] = contextvars.ContextVar("transnext_dispatch_recording",
                                                                                default=None)


@contextlib.contextmanager
def _recording(model: torch.nn.Module, device: str | None, plan_only: bool) -> Iterator[_Recording]:
    rec = _Recording(device, plan_only)
    handles = []
    for name, module in model.named_modules():
        if hasattr(module, "attn_backend"):
            def enter(_m, _args, name=name):
                rec.layer = name
            handles.append(module.register_forward_pre_hook(enter))
    token = _RECORDING.set(rec)
    try:
        yield rec
    finally:
        _RECORDING.reset(token)
        for h in handles:
            h.remove()


def describe_decisions(model: torch.nn.Module, input_size: tuple[int, int] | int, batch: int = 1, train: bool = False,
                       device: str | None = None) -> list[dict[str, str]]:
    """The implementation each layer of ``model`` would run for a (batch, 3, H, W) input, and why.

    The model is run on a meta-device copy (no weights, no arithmetic: seconds even at dense sizes)
    with the decisions made as for ``device`` (default: the model's), in training or inference.
    Returns one row per op call: ``layer``, ``op``, ``impl`` (with the kernel of a compiled custom op)
    and ``reason`` (with the candidates refused before it).
    """
    import copy

    H, W = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device.type if param is not None else "cpu"
    was_training = model.training
    shadow = copy.deepcopy(model).to("meta").train(train)
    x = torch.empty((batch, 3, H, W), device="meta")
    with _recording(shadow, device, plan_only=True) as rec, torch.set_grad_enabled(train):
        shadow(x)
    model.train(was_training)
    rows: list[dict[str, str]] = []
    for layer, c in rec.rows:
        row = dict(layer=layer, op=c.op, impl=f"{c.impl}({c.kernel})" if c.kernel else c.impl,
                   reason=str(c).split(": ", 1)[1])
        if row not in rows[-3:]:  # a layer run in groups of images decides once per group
            rows.append(row)
    return rows


def format_decisions(rows: list[dict[str, str]]) -> str:
    """The rows of :func:`describe_decisions` as aligned text lines: one per op call, consecutive
    layers with the same decision on one line (``block3.0-14.attn``)."""
    if not rows:
        return "(no transnext op ran)"
    groups: list[list[dict[str, str]]] = []
    for r in rows:
        for g in reversed(groups[-3:]):  # the same op a block earlier (blocks run attention, pooling, Conv-GLU)
            last = g[-1]
            if (last["op"], last["impl"], last["reason"]) == (r["op"], r["impl"], r["reason"]) and _next_block(last, r):
                g.append(r)
                break
        else:
            groups.append([r])
    labels = [_span(g) + " " + g[0]["op"] for g in groups]
    width = max(len(label) for label in labels)
    return "\n".join(f"{label.ljust(width)}  {g[0]['impl']}: {g[0]['reason']}" for label, g in zip(labels, groups))


def _parts(layer: str) -> tuple[str, int, str] | None:
    head, _, rest = layer.partition(".")
    index, _, tail = rest.partition(".")
    return (head, int(index), tail) if index.isdigit() else None


def _next_block(a: dict[str, str], b: dict[str, str]) -> bool:
    pa, pb = _parts(a["layer"]), _parts(b["layer"])
    return pa is not None and pb is not None and (pa[0], pa[2]) == (pb[0], pb[2]) and pb[1] == pa[1] + 1


def _span(group: list[dict[str, str]]) -> str:
    if len(group) == 1:
        return group[0]["layer"] or "(model)"
    head, first, tail = _parts(group[0]["layer"])
    return f"{head}.{first}-{_parts(group[-1]['layer'])[1]}.{tail}"
