"""Which ops backend runs an op: one place, with the capabilities each backend declares.

A backend is chosen by name (``attn_backend=`` of a model, :meth:`TransNeXt.set_attn_backend`,
:func:`transnext.ops.set_backend`) or ``"auto"``; ``auto`` reads ``TRANSNEXT_ATTN_BACKEND`` and
otherwise picks ``triton`` for CUDA tensors when it is installed, else ``torch``. The chosen
backend then runs every op it declares; for an op or situation it does not cover, the op runs in
``torch`` and a warning says so once per process:

* ``triton`` has only the aggregated-attention kernels: full attention, Conv-GLU and the pooling
  branch run in ``torch``; so does attention with dropout on its probabilities (the kernels keep
  no probabilities) and attention under tracing or export (graphs need standard ops);
* ``reference`` and ``torch`` cover every op in every situation.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

__all__ = ["BACKENDS", "CAPABILITIES", "ENV_VAR", "Capabilities", "resolve_backend", "select_backend"]

ENV_VAR = "TRANSNEXT_ATTN_BACKEND"
OPS = ("aggregated_attention", "full_attention", "conv_glu", "sr_gelu_pool")


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


def select_backend(op: str, name: str | None, device_type: str, dropout: bool = False, tracing: bool = False) -> str:
    """The backend that runs ``op`` for a request of ``name``: the resolved one, or ``torch`` (warned once)."""
    backend = resolve_backend(name, device_type)
    caps = CAPABILITIES[backend]
    reason = None
    if op not in caps.ops:
        reason = f"it has no {op} kernel"
    elif dropout and not caps.dropout:
        reason = "it does not support dropout on the attention probabilities"
    elif tracing and not caps.tracing:
        reason = "graphs for tracing, export or compilation need standard ops"
    elif backend == "triton" and not triton_usable(device_type):
        raise RuntimeError(
            f"attention backend 'triton' cannot run on {device_type} tensors here: it needs CUDA and the "
            "triton package (on CPU only under TRITON_INTERPRET=1, for tests); use 'torch' or 'auto'"
        )
    if reason is None:
        return backend
    key = (backend, op, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"transnext: {op} runs in the 'torch' backend instead of {backend!r}: {reason}", stacklevel=3)
    return "torch"
