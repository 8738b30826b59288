"""Native CPU kernel of the Aggregated Attention forward, built on first use with the system C compiler.

At dense resolutions the torch formulation of the pooled branch costs about 5 ns per (head, query,
pooled key) on a CPU core: a batched matmul with a 24-wide inner dimension, a bias pass, a softmax
and a second matmul, each a pass through a cache-sized block. The C kernel in
``aggregated_attention.c`` does all of it for four queries at a time in registers and one scratch
row (logits, the position bias read from its small factors, softmax, aggregation of pooled and
window values), so no (heads, N, Np) block is written at all.

It needs no build step at install time and no torch headers: the first call compiles one small
shared library per element type with ``cc`` (``$CC`` if set), about a second, into a per-user
cache keyed by the source, compiler and flags, and loads it with :mod:`ctypes`. Where no compiler
works (or on a platform it does not handle), :func:`available` is False and the torch kernels
run instead, with the same results. ``TRANSNEXT_NATIVE=0`` turns the kernel off;
``TRANSNEXT_CACHE_DIR`` moves the cache (default ``~/.cache/transnext``).

Work is split over threads (``torch.get_num_threads()``) by contiguous ranges of
(batch * head, grid row) items; ctypes releases the GIL for the duration of each call.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "ENV_VAR", "aggregated_attention_backward", "aggregated_attention_forward", "available", "bias_table", "build_error",
    "supports", "usable",
]

ENV_VAR = "TRANSNEXT_NATIVE"
_XBAND = 16  # query columns per work item (XBAND in the C source)
_SOURCE = Path(__file__).with_name("aggregated_attention.c")
_DTYPES = {torch.float32: ("float", ""), torch.float64: ("double", "-DREAL_IS_DOUBLE")}
_FLAG_SETS = (["-O3", "-march=native"], ["-O3", "-mcpu=native"], ["-O3"])

_lock = threading.Lock()
_libs: dict[torch.dtype, ctypes.CDLL] = {}
_errors: dict[torch.dtype, str] = {}
_pool: ThreadPoolExecutor | None = None


def _enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    root = os.environ.get("TRANSNEXT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "transnext")
    return Path(root) / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _compile(dtype: torch.dtype) -> ctypes.CDLL:
    """Compile (or find in the cache) and load the library for ``dtype``; raises with the reason."""
    if sys.platform == "win32":
        raise RuntimeError("the native kernel is built with a GCC/Clang-style compiler; not on Windows")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install cc)")
    source = _SOURCE.read_bytes()
    real, define = _DTYPES[dtype]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    errors = []
    for flags in _FLAG_SETS:
        args = [f"-DREAL={real}", *([define] if define else []), *flags, "-fPIC", "-shared", "-std=gnu11", "-ffp-contract=fast"]
        key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(args).encode(),
                                         platform.machine().encode(), platform.node().encode()])).hexdigest()[:16]
        target = _cache_dir() / f"aggregated_attention_{real}_{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            # Build beside the target and rename: concurrent processes never load a partial file.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            proc = subprocess.run([cc, *args, "-o", tmp, str(_SOURCE), "-lm"], capture_output=True, text=True,
                                  timeout=300)
            if proc.returncode != 0:
                os.unlink(tmp)
                errors.append(f"{' '.join(flags)}: {proc.stderr.strip()[-500:]}")
                continue
            os.replace(tmp, target)
        lib = ctypes.CDLL(str(target))
        fn = lib.transnext_aggregated_attention_forward
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 11 + [ctypes.c_int64] * 14
        lib.transnext_native_vector_length.restype = ctypes.c_int
        bwd = lib.transnext_aggregated_attention_backward
        bwd.restype = ctypes.c_int
        bwd.argtypes = [ctypes.c_void_p] * 21 + [ctypes.c_int64] * 14
        lib.transnext_bias_table.restype = ctypes.c_int
        lib.transnext_bias_table.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 9
        return lib
    raise RuntimeError("compiling the native kernel failed: " + " | ".join(errors))


def _library(dtype: torch.dtype) -> ctypes.CDLL | None:
    if dtype in _libs:
        return _libs[dtype]
    if dtype in _errors:
        return None
    with _lock:
        if dtype not in _libs and dtype not in _errors:
            try:
                _libs[dtype] = _compile(dtype)
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _errors[dtype] = str(exc)
    return _libs.get(dtype)


def build_error(dtype: torch.dtype = torch.float32) -> str | None:
    """Why the kernel for ``dtype`` is not available (None when it is, or was not tried yet)."""
    return _errors.get(dtype)


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the native kernel runs for ``dtype`` here (compiles it on the first call)."""
    return _enabled() and dtype in _DTYPES and _library(dtype) is not None


def supports(q: Tensor, window: int) -> bool:
    """Whether the kernel takes this problem: CPU, float32/float64, head size a multiple of the
    vector length (8 floats / 4 doubles) up to 8 vectors, window up to 8x8, no autograd graph."""
    if q.device.type != "cpu" or q.dtype not in _DTYPES or window * window > 64:
        return False
    vl = 32 // q.element_size()
    d = q.shape[-1]
    return d % vl == 0 and d // vl <= 8 and available(q.dtype)


def usable(*tensors: Tensor) -> bool:
    """Whether plain CPU tensors of one supported dtype, outside autograd, tracing and compilation,
    can go to the native kernels (and the kernels are available)."""
    t0 = tensors[0]
    if t0.device.type != "cpu" or t0.dtype not in _DTYPES or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.dtype == t0.dtype and t.device == t0.device for t in tensors) and available(t0.dtype)


def _forget_pool() -> None:
    # A forked child (data-loader workers, multiprocessing) inherits the pool object but not its
    # threads: it starts its own on first use.
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool._max_workers < workers:
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="transnext-native")
    return _pool


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


def _parallel(fn, items: int, *args) -> None:
    """Run ``fn(*args, item0, item1)`` over [0, items) split into one contiguous range per thread."""
    workers = max(1, min(torch.get_num_threads(), items))
    bounds = [items * i // workers for i in range(workers + 1)]

    def run(i: int) -> int:
        return fn(*args, bounds[i], bounds[i + 1])

    codes = [run(0)] if workers == 1 else list(_executor(workers).map(run, range(workers)))
    if any(codes):
        raise RuntimeError(f"a native kernel rejected its arguments (code {min(codes)})")


def bias_table(mlp_table: Tensor, x_index: Tensor, x_weight: Tensor) -> Tensor:
    """(Uy, h, W, Kw) pooled-key bias with the x axis resolved, from the bias MLP on unique pairs
    ``mlp_table`` (h, Uy, Ux) and the x-axis taps (W, Kw, T): the table of
    :meth:`transnext.ops.bias.SeparableBias.from_mlp_table`, without autograd."""
    lib = _library(mlp_table.dtype)
    if lib is None:
        raise RuntimeError(f"native kernels are not available: {build_error(mlp_table.dtype)}")
    h, uy, ux = mlp_table.shape
    W, kw, taps = x_index.shape
    if int(x_index.min()) < 0 or int(x_index.max()) >= ux:
        raise ValueError(f"x taps index {ux} unique x offsets; got indices in [{int(x_index.min())}, {int(x_index.max())}]")
    if taps < 1:
        raise ValueError("x taps need at least one tap per entry")
    vl = 32 // mlp_table.element_size()
    uyp = -(-uy // vl) * vl
    # Unique rows innermost (zero-padded to whole vectors): the kernel works on a vector of rows.
    mlpt = mlp_table.new_zeros((h, ux, uyp))
    mlpt[:, :, :uy].copy_(mlp_table.transpose(1, 2))
    ix = x_index.to(torch.int64).contiguous()
    wx = x_weight.to(mlp_table.dtype).contiguous()
    out = mlp_table.new_empty((uy, h, W, kw))
    with torch.profiler.record_function("transnext::native_bias_table"):
        _parallel(lib.transnext_bias_table, h * (uyp // vl), _ptr(mlpt), _ptr(ix), _ptr(wx), _ptr(out), h, uy, uyp, ux,
                  W, kw, taps)
    return out


def _panels(x: Tensor, PP: int, vl: int) -> Tensor:
    """(B, h, P, d) rows in panels of 2 vectors of rows: (B, h, PP / (2 vl), d, 2 vl), zero-padded."""
    B, h, P, d = x.shape
    out = x.new_zeros((B, h, PP, d))
    out[:, :, :P].copy_(x)
    return out.view(B, h, PP // (2 * vl), 2 * vl, d).transpose(-1, -2).contiguous()


def _problem(qs, kp_hat, vp, k_pad, v_pad, table, y_index, y_weight, local_table, extra, size, contiguous_table=False):
    """Checked, contiguous inputs of the kernels and their integer arguments."""
    lib = _library(qs.dtype)
    if lib is None:
        raise RuntimeError(f"native aggregated attention is not available: {build_error(qs.dtype)}")
    B, h, N, d = qs.shape
    H, W = size
    P = kp_hat.shape[2]
    vl = 32 // qs.element_size()
    PP = -(-P // (2 * vl)) * (2 * vl)
    _, kh, taps = y_index.shape
    kw = table.shape[3]
    if kh * kw != P or table.shape[1:3] != (h, W) or y_index.shape[0] != H:
        raise ValueError(f"bias factors {tuple(table.shape)} / {tuple(y_index.shape)} do not match {h} heads, a {H}x{W} "
                         f"grid and {P} pooled keys")
    if int(y_index.min()) < 0 or int(y_index.max()) >= table.shape[0]:
        raise ValueError(f"bias row index out of range [0, {table.shape[0]}): [{int(y_index.min())}, {int(y_index.max())}]")
    if contiguous_table or table.stride(3) != 1 or table.stride(2) != kw:  # (x, kx): one run per (u, head)
        table = table.contiguous()
    inputs = [t.contiguous() for t in (qs, _panels(kp_hat, PP, vl), vp, k_pad, v_pad)] + [table] + [
        t.contiguous() for t in (y_index.to(torch.int64), y_weight.to(qs.dtype), local_table, extra)]
    dims = [table.stride(0), table.stride(1), h, H, W, d, P, PP, kh, kw, taps]
    return lib, inputs, dims, PP, vl


def aggregated_attention_forward(
    qs: Tensor, kp_hat: Tensor, vp: Tensor, k_pad: Tensor, v_pad: Tensor, table: Tensor, y_index: Tensor,
    y_weight: Tensor, local_table: Tensor, extra: Tensor, size: tuple[int, int], window: int,
) -> Tensor:
    """(B, h, N, d) output of Aggregated Attention from prepared inputs (see the C file for layouts).

    ``qs`` (B, h, N, d) scaled queries; ``kp_hat`` / ``vp`` (B, h, P, d) normalised pooled keys and
    pooled values; ``k_pad`` / ``v_pad`` (B, h, H+2r, W+2r, d); bias factors ``table`` (U, h, W, Kw),
    ``y_index`` / ``y_weight`` (H, Kh, T); ``local_table`` (h, N, L); ``extra`` (B, h, N, L).
    All in one dtype (float32 or float64) on the CPU, with no autograd graph.
    """
    lib, inputs, dims, _, _ = _problem(qs, kp_hat, vp, k_pad, v_pad, table, y_index, y_weight, local_table, extra, size)
    B, h, N, d = qs.shape
    out = qs.new_empty((B, h, N, d))
    ptrs = [_ptr(t) for t in inputs] + [_ptr(out)]
    with torch.profiler.record_function("transnext::native_aggregated_attention"):
        _parallel(lib.transnext_aggregated_attention_forward, B * h * -(-size[1] // _XBAND), *ptrs, *dims, window)
    return out


def aggregated_attention_backward(
    grad_out: Tensor, qs: Tensor, kp_hat: Tensor, vp: Tensor, k_pad: Tensor, v_pad: Tensor, table: Tensor,
    y_index: Tensor, y_weight: Tensor, local_table: Tensor, extra: Tensor, size: tuple[int, int], window: int,
    want_k: bool = True, want_v: bool = True, want_table: bool = True,
) -> dict[str, Tensor | None]:
    """Gradients of the op of :func:`aggregated_attention_forward` with respect to its prepared
    inputs, recomputing the probabilities (nothing is saved by the forward).

    Returns ``dqs`` (B, h, N, d); ``dw`` and ``dloc`` (B, h, N, L), the gradients of the window
    aggregation weights and of the window logits; ``dkp`` / ``dvp`` (B, h, P, d); ``dk_pad`` /
    ``dv_pad`` (layout of ``k_pad``) and ``dtable`` (U, h, W, Kw), None where not wanted.
    """
    lib, inputs, dims, PP, vl = _problem(qs, kp_hat, vp, k_pad, v_pad, table, y_index, y_weight, local_table, extra,
                                         size, contiguous_table=True)
    B, h, N, d = qs.shape
    L = window * window
    P = kp_hat.shape[2]
    g = grad_out.to(qs.dtype).contiguous()
    vt = _panels(vp, PP, vl)
    kp = kp_hat.contiguous()
    dqs = qs.new_empty((B, h, N, d))
    dw = qs.new_empty((B, h, N, L))
    dloc = qs.new_empty((B, h, N, L))
    dkp = qs.new_zeros((B, h, P, d))
    dvp = qs.new_zeros((B, h, P, d))
    dk_pad = torch.zeros_like(inputs[3]) if want_k else None
    dv_pad = torch.zeros_like(inputs[4]) if want_v else None
    items = B * h
    workers = max(1, min(torch.get_num_threads(), items))
    table_c = inputs[5]
    # Heads are shared by the images of a batch: each thread sums its table gradient apart.
    dtables = qs.new_zeros((workers, *table_c.shape)) if want_table else None
    bounds = [items * i // workers for i in range(workers + 1)]
    fn = lib.transnext_aggregated_attention_backward
    ptrs = [_ptr(t) for t in inputs] + [_ptr(g), _ptr(vt), _ptr(kp), _ptr(dqs), _ptr(dw), _ptr(dloc), _ptr(dkp),
                                        _ptr(dvp), _ptr(dk_pad) if want_k else None, _ptr(dv_pad) if want_v else None]

    def run(i: int) -> int:
        dtable = _ptr(dtables[i]) if dtables is not None else None
        return fn(*ptrs, dtable, *dims, window, bounds[i], bounds[i + 1])

    with torch.profiler.record_function("transnext::native_aggregated_attention_backward"):
        codes = [run(0)] if workers == 1 else list(_executor(workers).map(run, range(workers)))
    if any(codes):
        raise RuntimeError(f"a native kernel rejected its arguments (code {min(codes)})")
    dtable = dtables.sum(0) if dtables is not None else None
    return dict(dqs=dqs, dw=dw, dloc=dloc, dkp=dkp, dvp=dvp, dk_pad=dk_pad, dv_pad=dv_pad, dtable=dtable)
