"""Native CPU kernel of the Aggregated Attention forward, built on first use with the system C compiler.

At dense resolutions the torch formulation of the pooled branch costs about 5 ns per (head, query,
pooled key) on a CPU core: a batched matmul with a 24-wide inner dimension, a bias pass, a softmax
and a second matmul, each a pass through a cache-sized block. The C kernel in
``aggregated_attention.c`` does all of it for four queries at a time in registers and one scratch
row (logits, the position bias read from its small factors, softmax, aggregation of pooled and
window values), so no (heads, N, Np) block is written at all.

It needs no build step at install time and no torch headers: the first call compiles one small
shared library per element type with ``cc`` (``$CC`` if set), a few seconds, and loads it with
:mod:`ctypes`. The build targets the highest named instruction set level the CPU runs
(x86-64-v2/v3/v4, armv8-a) with FMA contraction fixed, so one build gives the same results on
every machine of that level; it is cached under a key of the source, the compiler's identity, the
flags and that level (not the host), in ``$TRANSNEXT_CACHE_DIR/native`` (default
``$XDG_CACHE_HOME/transnext`` or ``~/.cache/transnext``), a directory of mode 0700.

Loading trusts only what this user alone could have written: the directory and the files must be
theirs and writable by nobody else (otherwise the kernel is built in a private temporary
directory, with a warning). Each library has a record beside it (size, sha256, ABI), written
after it atomically; a library that does not match its record, does not load, lacks an entry
point or reports another ABI (:data:`ABI_VERSION`) is rebuilt before any kernel is called.
Where no compiler works (or on a platform it does not handle), :func:`available` is False, one
:class:`NativeKernelWarning` per process says why and how to fix it, and the torch kernels run
instead with the same results. ``TRANSNEXT_NATIVE=0`` turns the kernel off (no warning).

Work runs on torch's own intra-op threads: where torch's parallel backend is OpenMP (its Linux
builds), the kernel is compiled with ``-fopenmp`` and linked against the very OpenMP runtime torch
loaded, so each call opens a parallel region of ``torch.get_num_threads()`` threads on torch's
team, the threads (and the waiting policy, ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT``) of every other
torch op, not a second pool competing with them for the cores. The items (bands of query columns
of one image and head) are split into one contiguous range per thread. Where torch does not use
OpenMP or the compiler cannot build against its runtime, the library is built without OpenMP and
the ranges run on a small pool of Python threads instead (ctypes releases the GIL for each call);
:func:`status` says which (``threads``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "ABI_VERSION", "ENV_VAR", "PROTOTYPES", "NativeKernelWarning", "aggregated_attention_backward",
    "aggregated_attention_forward", "available", "bias_table", "build_error", "describe", "status", "supports", "usable",
]

ENV_VAR = "TRANSNEXT_NATIVE"
CACHE_ENV_VAR = "TRANSNEXT_CACHE_DIR"
ABI_VERSION = 2  # TRANSNEXT_NATIVE_ABI in aggregated_attention.c
_XBAND = 16  # query columns per work item (XBAND in the C source)
_SOURCE = Path(__file__).with_name("aggregated_attention.c")
_DTYPES = {torch.float32: ("float", ""), torch.float64: ("double", "-DREAL_IS_DOUBLE")}
# Fixed in the flags: FMA contraction changes the last bits, so one build level gives one result.
_COMMON_FLAGS = ["-O3", "-fPIC", "-shared", "-std=gnu11", "-ffp-contract=fast"]

_PTR, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# The entry points of aggregated_attention.c as (restype, argtypes), in the order of its prototypes;
# the only place their argument lists are declared on this side.
PROTOTYPES: dict[str, tuple[type, tuple[type, ...]]] = {
    "transnext_native_abi_version": (_INT, ()),
    "transnext_native_real_size": (_INT, ()),
    "transnext_native_vector_length": (_INT, ()),
    "transnext_native_openmp": (_INT, ()),
    # qs, kt, vp, kpad, vpad, table, yidx, yw, ltab, extra, out; table_su ... window, item0, item1, threads
    "transnext_aggregated_attention_forward": (_INT, (_PTR,) * 11 + (_I64,) * 15),
    # the 10 inputs, g, vt, kp, dqs, dw, dloc, dkp, dvp, dkpad, dvpad, dtable; dtable_stride, table_su ... threads
    "transnext_aggregated_attention_backward": (_INT, (_PTR,) * 21 + (_I64,) * 16),
    # mlpt, ix, wx, out; h, Uy, UyP, Ux, W, Kw, T, item0, item1, threads
    "transnext_bias_table": (_INT, (_PTR,) * 4 + (_I64,) * 10),
}
# Names of the GNU OpenMP runtime as torch's wheels ship it (libgomp.so.1, or a hashed copy).
_GOMP = re.compile(r"libgomp(?:-[0-9a-f]+)?\.so(?:\.\d+)*")

# Feature macros of the x86-64 levels: a level is targeted when the compiler defines, for this CPU
# (-march=native), every one of them that it defines for the level.
_X86_FEATURES = (
    "SSE3", "SSSE3", "SSE4_1", "SSE4_2", "POPCNT", "AVX", "AVX2", "BMI", "BMI2", "F16C", "FMA", "LZCNT", "MOVBE",
    "XSAVE", "AVX512F", "AVX512BW", "AVX512CD", "AVX512DQ", "AVX512VL",
)

_lock = threading.Lock()
_libs: dict[torch.dtype, ctypes.CDLL] = {}
_errors: dict[torch.dtype, str] = {}
_info: dict[torch.dtype, dict[str, str]] = {}
_warned: set[str] = set()
_opened: set[str] = set()  # library paths handed to the loader in this process
_private_dir: Path | None = None
_pool: ThreadPoolExecutor | None = None


class NativeKernelWarning(RuntimeWarning):
    """The native kernel is not available, or its cache was not used as it stood (with the reason)."""


class _Stale(Exception):
    """A cached library that must not be loaded as it is (the message says why); it is rebuilt."""


def _enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, NativeKernelWarning, stacklevel=3)


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV_VAR)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "transnext") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "transnext")
    return Path(root) / "native"


def _untrusted(path: Path, st: os.stat_result, kind: str) -> str | None:
    """Why ``path`` must not be trusted with code to load (None when it may): it must belong to this
    user and be writable by nobody else."""
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{kind} {path} is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    if st.st_mode & 0o022:
        who = "group and others" if st.st_mode & 0o022 == 0o022 else ("group" if st.st_mode & 0o020 else "others")
        return f"{kind} {path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _private_location() -> Path:
    """A fresh directory only this process's user can write, removed at exit."""
    global _private_dir
    if _private_dir is None:
        _private_dir = Path(tempfile.mkdtemp(prefix="transnext-native-"))
        atexit.register(shutil.rmtree, _private_dir, True)
    return _private_dir


def _library_dir() -> Path:
    """The cache directory (created private, mode 0700), or a private temporary one where the cache
    cannot be trusted or created (with a warning saying why)."""
    if _private_dir is not None:
        return _private_dir
    where = _cache_dir()
    try:
        where.mkdir(parents=True, exist_ok=True, mode=0o700)
        reason = _untrusted(where, where.stat(), "the cache directory")
    except OSError as exc:
        reason = f"the cache directory {where} cannot be created ({exc.strerror or exc})"
    if reason is None:
        return where
    _warn_once("cache-dir", f"transnext: not loading the native kernel from its cache: {reason}. It is built in a private "
                            f"temporary directory for this process instead. To fix it: chmod 700 {where} (and own it), "
                            f"or set {CACHE_ENV_VAR} to a directory only you can write.")
    return _private_location()


def _compiler() -> list[str] | None:
    """The compiler command ($CC, which may carry arguments, or cc), its program resolved on PATH."""
    words = shlex.split(os.environ.get("CC") or "cc") or ["cc"]
    program = shutil.which(words[0])
    return None if program is None else [program, *words[1:]]


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@functools.cache
def _macros(cc: tuple[str, ...], flags: tuple[str, ...]) -> frozenset[str] | None:
    """The macros the compiler predefines with ``flags`` (None where it rejects them)."""
    proc = _run([*cc, *flags, "-dM", "-E", "-x", "c", os.devnull])
    if proc.returncode != 0:
        return None
    return frozenset(line.strip() for line in proc.stdout.splitlines() if line.startswith("#define "))


def _x86_level(cc: tuple[str, ...]) -> int | None:
    native = _macros(cc, ("-march=native",))
    if native is None:
        return None
    for level in (4, 3, 2):
        wanted = _macros(cc, (f"-march=x86-64-v{level}",))
        if wanted is not None and all(f"#define __{f}__ 1" in native for f in _X86_FEATURES
                                      if f"#define __{f}__ 1" in wanted):
            return level
    return None


def _targets(cc: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """(instruction set level, flags) to try in order: the highest named level this CPU runs, so one
    build serves every machine of that level; -march=native only where no level is known."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        level = _x86_level(cc)
        named = [(f"x86-64-v{level}", [f"-march=x86-64-v{level}"])] if level else []
        return [*named, ("native", ["-march=native"]), ("x86-64", [])]
    if machine in ("aarch64", "arm64"):
        return [("armv8-a", ["-march=armv8-a"]), ("arm64", [])]
    return [(machine or "generic", [])]


@functools.cache
def _openmp_runtime() -> Path | None:
    """The GNU OpenMP runtime torch's intra-op threads run on, where torch's parallel backend is
    OpenMP: the libgomp mapped into this process (torch loaded it), else one in torch's lib
    directory. None where torch uses another backend or runtime (the kernel then runs on its own
    Python threads)."""
    try:
        if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
            return None
    except Exception:  # an unusual build that cannot describe itself: no OpenMP to share
        return None
    found: list[Path] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split(None, 5)
            if len(fields) == 6 and _GOMP.fullmatch(os.path.basename(fields[5].strip())):
                found.append(Path(fields[5].strip()))
    if not found:
        found = sorted(p for p in (Path(torch.__file__).parent / "lib").glob("libgomp*.so*") if _GOMP.fullmatch(p.name))
    return next((p for p in found if p.is_file()), None)


def _openmp_flags(cc: tuple[str, ...]) -> list[str]:
    """Compile flags that emit calls into the GNU OpenMP runtime (clang's default runtime is another)."""
    clang = "#define __clang__ 1" in (_macros(cc, ()) or ())
    return ["-fopenmp=libgomp"] if clang else ["-fopenmp"]


@functools.cache
def _identity(cc: tuple[str, ...]) -> str:
    """The compiler's version and target, not its path: one image's compiler anywhere is one compiler."""
    return _run([*cc, "--version"]).stdout + "\0" + _run([*cc, "-dumpmachine"]).stdout


def _build_key(cc: tuple[str, ...], args: list[str], source: bytes, runtime: str = "") -> str:
    """Hash of everything the built code depends on: the source, the compiler identity, the
    arguments and the macros they define (what -march=native resolves to), and the name of the
    OpenMP runtime it is linked against. Not the host: machines of one level with one compiler
    share a build."""
    macros = "\n".join(sorted(_macros(cc, tuple(args)) or ()))
    parts = [source, str(ABI_VERSION), _identity(cc), " ".join(args), macros, runtime]
    return hashlib.sha256(b"\0".join(p if isinstance(p, bytes) else p.encode() for p in parts)).hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checked_file(path: Path, kind: str) -> os.stat_result:
    st = os.lstat(path)  # a link is not followed: only a regular file of ours is loaded
    if not stat.S_ISREG(st.st_mode):
        raise _Stale(f"{kind} {path} is not a regular file")
    reason = _untrusted(path, st, kind)
    if reason:
        raise _Stale(reason)
    return st


def _record_path(where: Path, stem: str) -> Path:
    return where / f"{stem}.json"


def _verified(where: Path, stem: str, real_size: int) -> Path:
    """The cached library of ``stem`` after checking its record (ABI, size, sha256) and ownership,
    before anything maps it; raises :class:`_Stale` with the reason, FileNotFoundError when none."""
    record_path = _record_path(where, stem)
    try:
        _checked_file(record_path, "the build record")
        text = record_path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _Stale(f"the build record {record_path} cannot be read ({exc})") from None
    try:
        record = json.loads(text)
        name, size, digest = record["library"], int(record["size"]), record["sha256"]
        abi, rsize = int(record["abi"]), int(record["real_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise _Stale(f"the build record {record_path} is damaged ({exc})") from None
    if not isinstance(name, str) or not re.fullmatch(re.escape(stem) + r"-[0-9a-f]{16}\.so", name):
        raise _Stale(f"the build record {record_path} names an unexpected file {name!r}")
    if (abi, rsize) != (ABI_VERSION, real_size):
        raise _Stale(f"the cached library was built for ABI {abi} / {rsize}-byte reals, not {ABI_VERSION} / {real_size}")
    path = where / name
    try:
        st = _checked_file(path, "the cached library")
    except FileNotFoundError:
        raise _Stale(f"the cached library {path} is missing") from None
    if st.st_size != size:
        raise _Stale(f"the cached library {path} has {st.st_size} bytes, its record says {size}")
    if _sha256(path) != digest:
        raise _Stale(f"the cached library {path} does not match the sha256 of its record")
    return path


def _open(path: Path, real_size: int) -> ctypes.CDLL:
    """Load a verified library and declare its entry points; raises :class:`_Stale` where it is
    not a library of this ABI (none of its kernels is called then)."""
    try:
        if str(path) in _opened:
            # The loader hands back the library already open under a name, whatever the file
            # there is now (a rebuild of a stale one): a fresh name loads the fresh file.
            fd, tmp = tempfile.mkstemp(prefix=".load-", suffix=".so", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(path.read_bytes())
            try:
                lib = ctypes.CDLL(tmp)
            finally:
                os.unlink(tmp)
        else:
            _opened.add(str(path))
            lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise _Stale(f"the cached library {path} does not load ({exc})") from None
    missing = [name for name in PROTOTYPES if not hasattr(lib, name)]
    if missing:
        raise _Stale(f"the cached library {path} lacks {', '.join(missing)}")
    for name, (restype, argtypes) in PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, list(argtypes)
    abi, rsize = lib.transnext_native_abi_version(), lib.transnext_native_real_size()
    if (abi, rsize) != (ABI_VERSION, real_size):
        raise _Stale(f"the cached library {path} has ABI {abi} / {rsize}-byte reals, not {ABI_VERSION} / {real_size}")
    if lib.transnext_native_vector_length() * real_size != 32:
        raise _Stale(f"the cached library {path} has an unexpected vector length")
    lib.transnext_openmp = bool(lib.transnext_native_openmp())
    return lib


def _build(cc: list[str], args: list[str], where: Path, stem: str, real_size: int, runtime: Path | None = None) -> Path:
    """Compile into ``where`` under a temporary name, then move the library to its content-named
    file and its record beside it, each with os.replace: a reader never sees a partial file, and a
    record always names a complete library. With ``runtime`` (``args`` then holding the OpenMP
    flag) the library is linked against that OpenMP runtime."""
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=".so", dir=where)
    os.close(fd)
    obj = tmp[:-3] + ".o"
    try:
        if runtime is None:
            steps = [[*cc, *args, "-o", tmp, str(_SOURCE), "-lm"]]
        else:
            # Compiled with OpenMP, linked without the driver's own runtime and against torch's: the
            # library needs that runtime's soname, which the loader finds already loaded by torch.
            link = [a for a in args if not a.startswith("-fopenmp")]
            steps = [[*cc, *args, "-c", "-o", obj, str(_SOURCE)], [*cc, *link, "-o", tmp, obj, str(runtime), "-lm"]]
        for cmd in steps:
            proc = _run(cmd, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr.strip()[-500:] or f"exit code {proc.returncode}")
        os.chmod(tmp, 0o700)
        digest = _sha256(Path(tmp))
        path = where / f"{stem}-{digest[:16]}.so"
        size = os.stat(tmp).st_size
        os.replace(tmp, path)
    finally:
        for left in (tmp, obj):
            if os.path.exists(left):
                os.unlink(left)
    record = {"library": path.name, "size": size, "sha256": digest, "abi": ABI_VERSION, "real_size": real_size,
              "flags": " ".join(args), "openmp_runtime": runtime.name if runtime is not None else None}
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=".json", dir=where)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, _record_path(where, stem))
    return path


def _discard(where: Path, stem: str, keep: Path) -> None:
    """Remove the other libraries of ``stem`` (damaged or superseded builds); best effort."""
    for old in where.glob(f"{stem}-*.so"):
        if old != keep:
            with contextlib.suppress(OSError):
                old.unlink()


def _compile(dtype: torch.dtype) -> ctypes.CDLL:
    """Find in the cache (verified) or compile, and load the library for ``dtype``; raises with the reason."""
    if sys.platform == "win32":
        raise RuntimeError("the native kernel is built with a GCC/Clang-style compiler, not on Windows")
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler found ({os.environ.get('CC') or 'cc'!r} is not a program on PATH)")
    source = _SOURCE.read_bytes()
    real, define = _DTYPES[dtype]
    real_size = torch.empty((), dtype=dtype).element_size()
    where = _library_dir()
    runtime = _openmp_runtime()
    errors = []
    openmp_error = None
    # On torch's OpenMP threads where it can be built so; else (or where that build fails) on our own.
    builds = [(isa, flags, omp) for isa, flags in _targets(tuple(cc)) for omp in ((runtime, None) if runtime else (None,))]
    for isa, flags, omp in builds:
        omp_flags = _openmp_flags(tuple(cc)) if omp is not None else []
        args = [f"-DREAL={real}", *([define] if define else []), *flags, *_COMMON_FLAGS, *omp_flags]
        key = _build_key(tuple(cc), args, source, omp.name if omp is not None else "")
        stem = f"aggregated_attention_{real}_{isa}{'_omp' if omp is not None else ''}_{key}"
        what = " ".join(flags + omp_flags) or "default flags"
        origin = "cache"
        try:
            path = _verified(where, stem, real_size)
            lib = _open(path, real_size)
        except FileNotFoundError:
            lib = None
            origin = "built"
        except _Stale as stale:
            lib = None
            origin = f"rebuilt ({stale})"
            _warn_once(f"stale-{stem}", f"transnext: {stale}; the native kernel is rebuilt.")
        if lib is None:
            try:
                path = _build(cc, args, where, stem, real_size, omp)
            except RuntimeError as exc:
                errors.append(f"{what}: {exc}")
                if omp is not None and openmp_error is None:
                    openmp_error = (str(exc).strip().splitlines() or ["?"])[-1]
                continue
            try:
                lib = _open(_verified(where, stem, real_size), real_size)
            except _Stale as stale:  # a fresh build that fails its own checks: report, never loop
                errors.append(f"{what}: {stale}")
                continue
            _discard(where, stem, path)
        if lib.transnext_openmp:
            threads = f"torch's OpenMP threads ({omp.name if omp is not None else 'OpenMP'})"
        elif runtime is None:
            threads = "own Python threads (torch's threads are not an OpenMP team this kernel can join)"
        else:
            threads = f"own Python threads (building against torch's OpenMP runtime failed: {openmp_error})"
        _info[dtype] = {"path": str(path), "isa": isa, "origin": origin, "flags": " ".join(args), "threads": threads}
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
                _warn_once("unavailable", (
                    f"transnext: the native CPU kernel is not available ({dtype}): {exc}. The torch kernels run "
                    f"instead (same results, slower). To fix it, install a C compiler (cc, gcc or clang) or set CC "
                    f"to one; set {ENV_VAR}=0 to turn the native kernel off and silence this warning."))
    return _libs.get(dtype)


def build_error(dtype: torch.dtype = torch.float32) -> str | None:
    """Why the kernel for ``dtype`` is not available (None when it is, or was not tried yet)."""
    return _errors.get(dtype)


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the native kernel runs for ``dtype`` here (compiles it on the first call)."""
    return _enabled() and dtype in _DTYPES and _library(dtype) is not None


def status(dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Where the kernel for ``dtype`` stands, building it if needed: ``state`` "loaded" (with
    ``path``, ``isa`` the instruction set level, ``origin`` cache / built / rebuilt (why), ``flags``),
    "off" (switched off by the environment) or "unavailable" (with ``reason``)."""
    if not _enabled():
        return {"state": "off", "reason": f"{ENV_VAR}={os.environ.get(ENV_VAR)}"}
    if dtype not in _DTYPES or _library(dtype) is None:
        return {"state": "unavailable", "reason": _errors.get(dtype, f"no kernel for {dtype}")}
    return {"state": "loaded", **_info.get(dtype, {})}


def describe(dtype: torch.dtype = torch.float32) -> str:
    """One line on the kernel's status (for ``transnext info``)."""
    s = status(dtype)
    if s["state"] == "off":
        return f"native kernel: off ({s['reason']}); the torch kernels run"
    if s["state"] == "unavailable":
        return f"native kernel: not available ({s['reason']}); the torch kernels run"
    line = f"native kernel: {s.get('isa', '?')}, {s.get('origin', 'loaded')}, loaded from {s.get('path', '?')}"
    return line + (f"; runs on {s['threads']}" if s.get("threads") else "")


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
    # A forked child (data-loader workers, multiprocessing) inherits the fallback pool object but
    # not its threads: it starts its own on first use.
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


def _workers(items: int) -> int:
    return max(1, min(torch.get_num_threads(), items))


def _parallel(lib: ctypes.CDLL, fn: Callable[..., int], items: int, args: Callable[[int], Sequence[object]]) -> None:
    """Run ``fn(*args(t), item0, item1, threads)`` over the items [0, items), one contiguous range
    per thread (range t = items * t // n .. items * (t + 1) // n of n threads, as in the C side).

    An OpenMP build splits the items itself on torch's intra-op team: one call, ``args(0)``. A
    build without OpenMP gets one call per range on the fallback pool, each with ``args(t)`` and
    one thread, so per-thread outputs are laid out the same either way.
    """
    workers = _workers(items)
    if workers == 1 or lib.transnext_openmp:
        codes = [fn(*args(0), 0, items, workers)]
    else:
        bounds = [items * i // workers for i in range(workers + 1)]
        codes = list(_executor(workers).map(lambda i: fn(*args(i), bounds[i], bounds[i + 1], 1), range(workers)))
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
        args = (_ptr(mlpt), _ptr(ix), _ptr(wx), _ptr(out), h, uy, uyp, ux, W, kw, taps)
        _parallel(lib, lib.transnext_bias_table, h * (uyp // vl), lambda _: args)
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
        args = (*ptrs, *dims, window)
        _parallel(lib, lib.transnext_aggregated_attention_forward, B * h * -(-size[1] // _XBAND), lambda _: args)
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
    table_c = inputs[5]
    # Heads are shared by the images of a batch: each thread sums its table gradient apart.
    dtables = qs.new_zeros((_workers(items), *table_c.shape)) if want_table else None
    stride = table_c.numel()
    ptrs = [_ptr(t) for t in inputs] + [_ptr(g), _ptr(vt), _ptr(kp), _ptr(dqs), _ptr(dw), _ptr(dloc), _ptr(dkp),
                                        _ptr(dvp), _ptr(dk_pad) if want_k else None, _ptr(dv_pad) if want_v else None]

    def args(i: int) -> list[object]:
        dtable = _ptr(dtables[i]) if dtables is not None else None
        return [*ptrs, dtable, stride, *dims, window]

    with torch.profiler.record_function("transnext::native_aggregated_attention_backward"):
        _parallel(lib, lib.transnext_aggregated_attention_backward, items, args)
    dtable = dtables.sum(0) if dtables is not None else None
    return dict(dqs=dqs, dw=dw, dloc=dloc, dkp=dkp, dvp=dvp, dk_pad=dk_pad, dv_pad=dv_pad, dtable=dtable)
