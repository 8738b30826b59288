"""The one mixed-precision rule of training, evaluation and prediction.

``amp`` is ``"auto"`` (fp16 on CUDA, bf16 elsewhere), ``"fp16"`` (CUDA only), ``"bf16"`` or
``"none"``. Inference commands leave it unset (``None``) by default, which means fp16 on CUDA,
as the reference evaluation runs, and full precision on CPU.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["AMP_MODES", "autocast", "resolve_amp"]

AMP_MODES = ("auto", "fp16", "bf16", "none")


def resolve_amp(amp: str | None, device: torch.device) -> str:
    """The concrete mode (``fp16``, ``bf16`` or ``none``) of ``amp`` on ``device``."""
    if amp is None:  # inference default
        return "fp16" if device.type == "cuda" else "none"
    if amp not in AMP_MODES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "auto":
        return "fp16" if device.type == "cuda" else "bf16"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA; on CPU use --amp bf16 or --amp none")
    return amp


def autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    """Autocast context of ``amp`` on ``device`` (a no-op for ``none``)."""
    mode = resolve_amp(amp, device)
    if mode == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if mode == "fp16" else torch.bfloat16)
