"""Reading, writing and converting TransNeXt checkpoints.

Loading never executes pickled code: ``.pth`` files go through ``torch.load(weights_only=True)``
and ``.safetensors`` through safetensors. A ``.pth`` file that needs arbitrary Python objects to be
unpickled is refused with an error saying which object. Writing is atomic (temporary file, fsync,
rename), so an interrupted save never destroys the previous file.

Accepted layouts: a bare state dict, or a training checkpoint with the state dict under ``model``,
``state_dict``, ``model_ema`` or ``module``; keys may carry a ``module.`` prefix (DataParallel /
DDP). Key names are those of the published checkpoints (SPEC section 6), which are also the names
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


def _refusal(path: Path, err: Exception) -> CheckpointError:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    what = f"the Python object {found.group(1)!r}" if found else "Python objects beyond tensors"
    return CheckpointError(
        f"{path}: refused to load: unpickling the file needs {what}, and loading arbitrary pickled "
        "objects can execute code. Expected a state dict of tensors (bare or under 'model'/'state_dict'); "
        "if you trust the file, re-save only its state dict, or convert it to .safetensors in a trusted "
        "environment."
    )


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
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise _refusal(path, e) from e
        found = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        detail = found.group(1).strip() if found else (str(e).splitlines() or [""])[0]
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): the weights-only unpickler "
            f"rejected it ({detail})"
        ) from e
    except Exception as e:  # RuntimeError (zip), EOFError, KeyError (garbage), ...
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {type(e).__name__}: {detail}"
        ) from e


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


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert between ``.pth`` and ``.safetensors`` (direction by suffix); tensors unchanged.

    Wrapped training checkpoints are reduced to their state dict (``module.`` prefixes stripped).
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"source and destination are the same file: {src}")
    state_dict = load_state_dict(src)
    return save_state_dict(state_dict, dst, metadata={"format": "pt", "source": src.name})


def download_weights(weights: Weights, cache_dir: str | os.PathLike | None = None) -> str:
    """Fetch a published checkpoint through huggingface_hub; returns the local path.

    Honours the hub's cache and environment (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``):
    a file already in the cache is used without network access.
    """
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "pretrained=True needs huggingface_hub: pip install 'transnext-pytorch[hub]' "
            f"(or download {weights.url} yourself and pass checkpoint_path=)"
        ) from e
    try:
        return hf_hub_download(
            repo_id=weights.hf_hub_id, filename=weights.filename,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
        )
    except Exception as e:
        # Offline without a cached copy, no network, hub errors: say what to do instead.
        raise CheckpointError(
            f"could not fetch {weights.filename} of {weights.name} from the Hugging Face hub "
            f"({weights.hf_hub_id}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            f"Download {weights.url} and pass checkpoint_path=, or allow network access."
        ) from e
