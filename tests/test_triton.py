"""Triton backend: kernels checked on CPU under TRITON_INTERPRET=1; the package works without triton.

The interpreter flag must be set before the kernels are defined, so the checks run the Triton
cases of test_ops.py in a fresh interpreter.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _run_triton_tests(selection: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_ops.py"), "-q", "-p", "no:cacheprovider",
           "-k", selection]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]


@needs_triton
def test_triton_kernels_match_reference_odd_sizes() -> None:
    """Forward and all gradients in float64 at 7x11 and 13x5 (interpreted kernels)."""
    _run_triton_tests("triton and (7x11 or 13x5)")


@needs_triton
@pytest.mark.slow
def test_triton_kernels_full_suite() -> None:
    """Every ops test with the Triton backend: fixed pool, window 5, bf16 autocast, whole model."""
    _run_triton_tests("triton or model_backends")


def test_package_works_without_triton(monkeypatch) -> None:
    """No triton installed: the backend is unavailable, 'auto' falls back to torch, models run."""
    from transnext import ops

    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    monkeypatch.delitem(sys.modules, "transnext.ops.triton_backend", raising=False)
    assert "triton" not in ops.available_backends("cuda")
    assert ops.resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(RuntimeError, match="triton"):
        ops.select_backend("aggregated_attention", "triton", "cpu")
    import transnext

    model = transnext.TransNeXt(img_size=64, embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1),
                                num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
