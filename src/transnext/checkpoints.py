"""Reading, writing and converting TransNeXt checkpoints.

Loading never executes pickled code: ``.pth`` files go through ``torch.load(weights_only=True)``
and ``.safetensors`` through safetensors. A ``.pth`` file that needs arbitrary Python objects to be
unpickled is refused with an error saying which object. Writing is atomic (temporary file, fsync,
rename), so an interrupted save never destroys the previous file.

Accepted layouts: a bare state dict, or a training checkpoint with the state dict under ``model``,
``state_dict``, ``model_ema`` or ``module``; keys may carry a ``module.`` prefix (DataParallel /
DDP). Key names are those of the published checkpoints (docs/model.md section 6), which are also the names
of :class:`~transnext.models.TransNeXt`, so no renaming is needed.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .models.registry import Weights

__all__ = [
    "CheckpointError",
    "atomic_write",
    "checkpoint_filter_fn",
    "checkpoint_metadata",
    "convert_checkpoint",
    "download_weights",
    "load_checkpoint",
    "load_state_dict",
    "safe_torch_load",
    "save_state_dict",
]

SAFETENSORS_SUFFIXES = (".safetensors",)
_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")
# Non-persistent tables some exports carry; they are recomputed from the input size.
_SIZE_TABLES = ("relative_pos_index", "relative_coords_table", "seq_length_scale", "padding_mask")
# Plain containers of training metadata that are safe to rebuild (no code runs for them); NumPy
# scalars are added when NumPy is installed (see safe_torch_load).
_SAFE_GLOBALS = (argparse.Namespace,)


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read or does not fit the model."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync it, then rename it over ``path`` (same directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY)
        except OSError:  # pragma: no cover - directories cannot be opened on some platforms
            return path
        try:
            os.fsync(dir_fd)
        except OSError:  # pragma: no cover
            pass
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() in SAFETENSORS_SUFFIXES


def _strip_prefix(state_dict: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def _unwrap(obj: Any, source: str) -> dict[str, Tensor]:
    """Find the state dict inside a training checkpoint ({'model': sd, ...}) or a bare one."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
        if tensors:
            return _strip_prefix(tensors)
    raise CheckpointError(
        f"{source}: no state dict found (expected a mapping of parameter names to tensors, bare or under "
        f"one of {', '.join(repr(k) for k in _WRAPPER_KEYS)}; got {type(obj).__name__})"
    )


# Modules whose globals a plain tensor checkpoint legitimately references (tensor rebuilding,
# containers, the metadata allow-list); anything else found in a refused pickle is named as the culprit.
_EXPECTED_GLOBAL_MODULES = ("torch", "collections", "numpy", "argparse", "_codecs")
# Phrases of torch's own error text that must never reach the user: they advise unsafe loading.
_UNSAFE_ADVICE = ("weights_only", "will likely succeed", "add_safe_globals", "safe_globals(", "trust")


def _pickle_globals(path: Path) -> list[str]:
    """The ``module.name`` globals a pickle references, read from its opcodes without executing any.

    Looks inside torch's zip layout (``*/data.pkl``) or at a bare pickle; stops quietly where the
    stream is truncated or not a pickle (the caller then reports the file as corrupt).
    """
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                data = zf.read(name) if name else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return []
    found: list[str] = []
    strings: list[str] = []  # recent string pushes, for STACK_GLOBAL (module, name)
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL" and isinstance(arg, str):
                found.append(arg.replace(" ", ".", 1))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                strings.append(str(arg))
    except Exception:  # noqa: BLE001 - truncated or not a pickle: what was read so far is all there is
        pass
    return found


def _unexpected_global(path: Path, err: Exception) -> str | None:
    """The offending global of a refused pickle: as torch reports it, else found by scanning the opcodes."""
    reported = re.search(r"GLOBAL ([\w.]+)", str(err))
    if reported:
        return reported.group(1)
    for name in _pickle_globals(path):
        if name.split(".", 1)[0] not in _EXPECTED_GLOBAL_MODULES:
            return name
    return None


def _refusal(path: Path, name: str | None) -> CheckpointError:
    what = f"the Python object {name!r}" if name else "Python objects beyond tensors"
    return CheckpointError(
        f"{path}: refused to load: unpickling the file needs {what}: the file contains code or objects that are not "
        "allowed for safe loading (unpickling them can execute code). Expected a state dict of tensors (bare or under "
        "'model'/'state_dict'): ask the file's provider for a plain state dict or a .safetensors file."
    )


def _safe_detail(err: Exception) -> str:
    """A short reason from a torch error, without torch's advice to load unsafely."""
    text = str(err)
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    lines = [found.group(1)] if found else text.splitlines()
    for line in (ln.strip() for ln in lines):
        if line and not any(p in line for p in _UNSAFE_ADVICE) and not line.startswith("Check the documentation"):
            return f"{type(err).__name__}: {line}"
    return type(err).__name__


def _numpy_safe_globals() -> list[Any]:
    """NumPy scalars (e.g. a best accuracy saved as ``np.float64``): rebuilt from a dtype and raw bytes."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is optional for the core
        return []
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    dtypes = [type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.float16, np.float32,
                                          np.float64)]
    return [scalar, np.dtype, *dtypes]


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint", map_location: str | torch.device = "cpu") -> Any:
    """The one reader of ``.pth`` files: ``torch.load(weights_only=True)`` with a small allow-list.

    Tensors, numbers, strings and containers load as usual; so do the plain metadata objects
    published training checkpoints carry (``argparse.Namespace`` of the training arguments, NumPy
    scalars), which are rebuilt without running code. Anything else is refused before any of
    it is executed. ``what`` names the file in errors ("checkpoint to resume from", ...).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is empty, truncated or corrupt, or needs arbitrary pickled objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    try:
        safe_globals = getattr(torch.serialization, "safe_globals", None)
        if safe_globals is None:  # pragma: no cover - torch < 2.5
            return torch.load(path, map_location=map_location, weights_only=True)
        with safe_globals([*_SAFE_GLOBALS, *_numpy_safe_globals()]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, KeyError (garbage), ...
        if isinstance(e, pickle.UnpicklingError):
            culprit = _unexpected_global(path, e)
            if culprit is not None or "Unsupported global" in str(e):
                raise _refusal(path, culprit) from None
        # from None: torch's own text (chained otherwise) advises loading the file unsafely
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {_safe_detail(e)}") from None


def load_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read the tensors of a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file, safely.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is empty, truncated, corrupt, holds no state dict, or needs
            arbitrary pickled objects (refused).
    """
    path = Path(path)
    if not _is_safetensors(path):
        return _unwrap(safe_torch_load(path, map_location=map_location), str(path))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    from safetensors.torch import load_file

    try:
        return _strip_prefix(load_file(str(path), device=str(map_location)))
    except Exception as e:  # SafetensorError, OSError, ValueError, ... depending on the damage
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e


def _head_size(model: nn.Module) -> tuple[int, ...] | None:
    head = getattr(model, "head", None)
    return tuple(head.weight.shape) if isinstance(head, nn.Linear) else None


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Adapt a reference (or wrapped) state dict to ``model``.

    Unwraps ``{'model': ...}`` / ``{'state_dict': ...}`` and strips ``module.`` prefixes; drops the
    non-persistent size tables some exports carry (position index/coordinates, masks, length
    scales); drops a classifier head whose size differs from the model's (or that the model does
    not have), with a warning. Usable as timm's ``pretrained_filter_fn``.
    """
    if any(k in state_dict for k in ("model", "state_dict")) and not all(isinstance(v, Tensor) for v in state_dict.values()):
        state_dict = _unwrap(state_dict, "<state dict>")
    out = {}
    for k, v in _strip_prefix(state_dict).items():
        if k.rsplit(".", 1)[-1].rstrip("0123456789") in _SIZE_TABLES:  # e.g. relative_pos_index1
            continue
        out[k] = v
    head_w = out.get("head.weight")
    if head_w is not None:
        want = _head_size(model)
        if want != tuple(head_w.shape):
            if want is not None:  # a head-less backbone drops the classifier silently
                what = (f"has {head_w.shape[0]} classes, the model {want[0]}" if head_w.shape[0] != want[0]
                        else f"has shape {tuple(head_w.shape)}, the model's {want}")
                warnings.warn(
                    f"the checkpoint classifier {what}: the head is not loaded (it keeps its fresh initialisation)",
                    UserWarning,
                    stacklevel=2,
                )
            out.pop("head.weight", None)
            out.pop("head.bias", None)
    return out


def _shorten(items: list[str], limit: int = 6) -> str:
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... ({len(items) - limit} more)"


def _check_finite(state_dict: Mapping[str, Tensor], source: str) -> None:
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        counts = []
        for k in bad[:3]:
            v = state_dict[k]
            counts.append(f"{k}: {int(v.isnan().sum())} NaN, {int(v.isinf().sum())} Inf of {v.numel()}")
        raise CheckpointError(
            f"{source}: non-finite weights (NaN/Inf) in {len(bad)} tensor(s): {_shorten(bad)} [{'; '.join(counts)}]. "
            "Expected finite values; the checkpoint probably comes from a diverged run or is damaged."
        )


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    strict: bool = True,
    filter_fn: Callable[[Mapping[str, Tensor], nn.Module], dict[str, Tensor]] | None = checkpoint_filter_fn,
) -> dict[str, list[str]]:
    """Load weights from ``path`` into ``model``.

    Strict by default: missing, unexpected and shape-mismatched keys raise one
    :class:`CheckpointError` listing each kind. A classifier head of another size is dropped
    with a warning (the model keeps its own). Weights containing NaN or Inf are refused. With
    ``strict=False`` whatever fits is loaded and mismatched tensors are skipped.

    Returns:
        ``{"missing_keys": [...], "unexpected_keys": [...], "mismatched_keys": [...]}``.
    """
    path = Path(path)
    raw = load_state_dict(path)
    return load_state_dict_into(model, raw, str(path), strict=strict, filter_fn=filter_fn)


def load_state_dict_into(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str = "<state dict>",
    strict: bool = True,
    filter_fn: Callable[[Mapping[str, Tensor], nn.Module], dict[str, Tensor]] | None = checkpoint_filter_fn,
) -> dict[str, list[str]]:
    """:func:`load_checkpoint` for a state dict already in memory (``source`` names it in errors)."""
    had_head = "head.weight" in state_dict or "module.head.weight" in state_dict
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    state_dict = dict(state_dict)
    _check_finite(state_dict, source)
    own = model.state_dict()
    dropped_head = had_head and "head.weight" not in state_dict
    missing = [k for k in own if k not in state_dict and not (dropped_head and k.startswith("head."))]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if strict and (missing or unexpected or mismatched):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_shorten(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_shorten(unexpected)}")
        if mismatched:
            shown = [f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)})" for k in mismatched]
            parts.append(f"shape mismatches ({len(mismatched)}): {_shorten(shown, 4)}")
        hint = ""
        if mismatched or len(missing) > len(own) // 2:
            hint = " (is it a checkpoint of another variant?)"
        raise CheckpointError(f"{source} does not fit {type(model).__name__}{hint}: " + "; ".join(parts))
    for k in mismatched:
        state_dict.pop(k)
    with torch.no_grad():
        model.load_state_dict(state_dict, strict=False)
    return {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": mismatched}


def save_state_dict(
    state_dict: Mapping[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write tensors atomically as ``.safetensors`` (by suffix) or a bare ``.pth`` state dict."""
    path = Path(path)
    # Own, contiguous CPU copies: safetensors refuses tensors that share storage.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    if _is_safetensors(path):
        from safetensors.torch import save_file

        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return atomic_write(path, lambda tmp: torch.save(tensors, tmp))


# What a converted file keeps besides the tensors: the model record and the labels, so that the
# converted file rebuilds the same model (``model_from_checkpoint``) and names the same classes.
METADATA_KEYS = ("arch", "classes", "data_cfg", "task")
_META_PREFIX = "transnext."
PTH_SUFFIXES = (".pth", ".pt", ".bin")
CONVERT_SUFFIXES = (*PTH_SUFFIXES, *SAFETENSORS_SUFFIXES)


def safetensors_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The transnext records (``arch``, ``classes``, ...) a ``.safetensors`` file carries as JSON strings; {} if none."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # SafetensorError, OSError, ... depending on the damage
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {type(e).__name__}: {e}") from None
    out: dict[str, Any] = {}
    for name in METADATA_KEYS:  # in this order, whatever the file's
        text = raw.get(_META_PREFIX + name)
        if text is not None:
            try:
                out[name] = json.loads(text)
            except ValueError as e:
                raise CheckpointError(f"{path}: metadata {_META_PREFIX + name!r} is not valid JSON ({e})") from None
    return out


def checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The transnext records (``arch``, ``classes``, ``data_cfg``, ``task``) of a ``.pth`` or ``.safetensors`` file."""
    path = Path(path)
    if _is_safetensors(path):
        return safetensors_metadata(path)
    obj = safe_torch_load(path)
    return {k: obj[k] for k in METADATA_KEYS if isinstance(obj, Mapping) and obj.get(k) is not None}


def check_convert_target(dst: str | os.PathLike) -> None:
    """Raise a ValueError unless ``dst`` names a format :func:`convert_checkpoint` writes (by suffix)."""
    suffix = Path(dst).suffix.lower()
    if suffix not in CONVERT_SUFFIXES:
        hint = "; to export a model to ONNX use 'transnext export onnx'" if suffix == ".onnx" else ""
        raise ValueError(f"cannot convert to {Path(dst).name!r}: the output suffix must be one of {', '.join(CONVERT_SUFFIXES)}{hint}")


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert between ``.pth`` and ``.safetensors`` (direction by suffix); tensors unchanged.

    Wrapped training checkpoints are reduced to their state dict (``module.`` prefixes stripped)
    plus their model record, classes and data settings (:data:`METADATA_KEYS`): JSON strings in
    the safetensors metadata, plain entries beside ``model`` in a ``.pth`` (a bare state dict when
    there are none). Optimizer and scheduler states are dropped.

    Raises:
        ValueError: ``dst`` has another suffix than ``.pth``/``.pt``/``.bin``/``.safetensors``, or is ``src``.
    """
    import json

    src, dst = Path(src), Path(dst)
    check_convert_target(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"source and destination are the same file: {src}")
    state_dict = load_state_dict(src)
    meta = checkpoint_metadata(src)
    if _is_safetensors(dst):
        try:
            extra = {_META_PREFIX + k: json.dumps(v) for k, v in meta.items()}
        except TypeError as e:
            raise CheckpointError(f"{src}: its metadata cannot be written as JSON into {dst.name} ({e})") from None
        return save_state_dict(state_dict, dst, metadata={"format": "pt", "source": src.name, **extra})
    if not meta:
        return save_state_dict(state_dict, dst)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    return atomic_write(dst, lambda tmp: torch.save({"model": tensors, **meta}, tmp))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def download_weights(
    weights: Weights, cache_dir: str | os.PathLike | None = None, local_option: str = "checkpoint_path="
) -> str:
    """Fetch a published checkpoint through huggingface_hub; returns the local path.

    Honours the hub's cache and environment (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``,
    ``HF_ENDPOINT``, proxies): a file already in the cache is used without network access. When
    not offline, one quick metadata request without retries comes first: an unreachable hub then
    fails in seconds (or falls back to the cached copy) instead of after the hub client's retries,
    which are kept for the download itself. ``local_option`` is how the caller passes a local
    file instead (``checkpoint_path=`` from Python, ``--checkpoint PATH`` from the command line);
    the errors name it.

    Raises:
        ImportError: huggingface_hub is not installed.
        CheckpointError: the hub cannot be reached (or refuses the file) and the cache has no copy.
    """
    instead = f"Download {weights.url} and pass {local_option}"
    try:
        import huggingface_hub
        from huggingface_hub import constants as hub_constants
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"published weights need huggingface_hub: pip install 'transnext-pytorch[hub]' (or: {instead})") from e
    cache = str(cache_dir) if cache_dir is not None else None

    def fail(reason: str, err: BaseException) -> CheckpointError:
        return CheckpointError(
            f"could not fetch {weights.filename} of {weights.name} from the Hugging Face hub ({weights.hf_hub_id}): "
            f"{reason}: {_first_line(err)}. {instead}, or allow network access."
        )

    if not hub_constants.HF_HUB_OFFLINE:
        url = huggingface_hub.hf_hub_url(weights.hf_hub_id, weights.filename)
        try:
            huggingface_hub.get_hf_file_metadata(url, timeout=10)
        except Exception as e:  # connection refused, DNS, timeout, proxy, HTTP error: one try is enough to know
            cached = huggingface_hub.try_to_load_from_cache(weights.hf_hub_id, weights.filename, cache_dir=cache)
            if isinstance(cached, str):
                return cached
            answered = getattr(e, "response", None) is not None  # an HTTP error (404, 401, ...), not a network failure
            where = "the hub refused the request" if answered else f"the hub is not reachable at {hub_constants.ENDPOINT}"
            raise fail(f"{where} and the file is not in the local cache", e) from None
    try:
        return huggingface_hub.hf_hub_download(repo_id=weights.hf_hub_id, filename=weights.filename, cache_dir=cache)
    except Exception as e:
        reason = "offline (HF_HUB_OFFLINE) and the file is not in the local cache" if hub_constants.HF_HUB_OFFLINE else "download failed"
        raise fail(reason, e) from None
