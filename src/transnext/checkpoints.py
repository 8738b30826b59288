"""Reading, writing and converting TransNeXt checkpoints.

Loading never executes pickled code: ``.pth`` files go through ``torch.load(weights_only=True)``
and ``.safetensors`` through safetensors. Writing is atomic (temporary file, fsync, rename), so an
interrupted save never destroys the previous file.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
import zipfile
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
    "save_state_dict",
]

SAFETENSORS_SUFFIXES = (".safetensors",)
_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")


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
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() in SAFETENSORS_SUFFIXES


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    """Find the state dict inside a training checkpoint ({'model': sd, ...}) or a bare one."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors:
            return {k[len("module."):] if k.startswith("module.") else k: v for k, v in tensors.items()}
    raise CheckpointError(
        f"{path}: no state dict found (expected a mapping of parameter names to tensors, bare or under "
        f"one of {', '.join(repr(k) for k in _WRAPPER_KEYS)})"
    )


def load_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read the tensors of a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file, safely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e) or "weights_only" in str(e):
            raise CheckpointError(
                f"{path}: refused to load: the file contains pickled Python objects beyond tensors, and loading "
                "them could execute arbitrary code. Re-save only the state dict (or convert it to .safetensors "
                f"in a trusted environment). Details: {str(e).splitlines()[0]}"
            ) from e
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    return _unwrap(obj, path)


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Adapt a reference (or wrapped) state dict to ``model``.

    Strips ``module.`` prefixes and unwraps ``{'model': ...}``; drops the non-persistent tables
    some exports carry (position index/coordinates, masks, length scales); drops a classifier
    head whose size differs from the model's, with a warning.
    """
    if "model" in state_dict or "state_dict" in state_dict:
        state_dict = _unwrap(state_dict, Path("<state dict>"))
    out = {}
    skip = ("relative_pos_index", "relative_coords_table", "seq_length_scale", "padding_mask")
    for k, v in state_dict.items():
        if k.startswith("module."):
            k = k[len("module."):]
        if any(s in k.rsplit(".", 1)[-1] or k.startswith(s) for s in skip):
            continue
        out[k] = v
    head = getattr(model, "head", None)
    head_w = out.get("head.weight")
    if head_w is not None:
        want = head.weight.shape if isinstance(head, nn.Linear) else None
        if want != head_w.shape:
            got_n = head_w.shape[0]
            want_n = want[0] if want is not None else 0
            warnings.warn(
                f"checkpoint classifier has {got_n} classes, the model {want_n}: the head is not loaded "
                "(it keeps its fresh initialisation)",
                stacklevel=3,
            )
            out.pop("head.weight", None)
            out.pop("head.bias", None)
    return out


def _shorten(items: list[str], limit: int = 8) -> str:
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... ({len(items) - limit} more)"


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    strict: bool = True,
    filter_fn: Callable[[Mapping[str, Tensor], nn.Module], dict[str, Tensor]] | None = checkpoint_filter_fn,
) -> dict[str, list[str]]:
    """Load weights from ``path`` into ``model``.

    Strict by default: missing, unexpected and shape-mismatched keys raise one error listing
    each kind. Weights containing NaN or Inf are refused. Returns the dict of missing /
    unexpected keys (empty lists when strict).
    """
    path = Path(path)
    state_dict = load_state_dict(path)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    own = model.state_dict()
    bad_values = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad_values:
        raise CheckpointError(f"{path}: non-finite values (NaN/Inf) in {_shorten(bad_values)}")
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if strict:
        # A head dropped by the filter is expected to be missing.
        dropped_head = "head.weight" not in state_dict and "head.weight" in own
        missing_strict = [k for k in missing if not (dropped_head and k.startswith("head."))]
        if missing_strict or unexpected or mismatched:
            parts = []
            if missing_strict:
                parts.append(f"missing keys ({len(missing_strict)}): {_shorten(missing_strict)}")
            if unexpected:
                parts.append(f"unexpected keys ({len(unexpected)}): {_shorten(unexpected)}")
            if mismatched:
                parts.append(f"shape mismatches ({len(mismatched)}): {_shorten(mismatched)}")
            raise CheckpointError(f"{path} does not fit {type(model).__name__}: " + "; ".join(parts))
    else:
        for k in [m.split(" ", 1)[0] for m in mismatched]:
            state_dict.pop(k)
    with torch.no_grad():
        model.load_state_dict(state_dict, strict=False)
    return {"missing_keys": missing, "unexpected_keys": unexpected}


def save_state_dict(state_dict: Mapping[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors atomically as ``.safetensors`` (by suffix) or a bare ``.pth`` state dict."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if _is_safetensors(path):
        from safetensors.torch import save_file

        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert between ``.pth`` and ``.safetensors`` (direction by suffix); tensors unchanged."""
    state_dict = load_state_dict(src)
    return save_state_dict(state_dict, dst, metadata={"format": "pt", "source": Path(src).name})


def download_weights(weights: Weights, cache_dir: str | None = None) -> str:
    """Fetch a published checkpoint through huggingface_hub (honours HF_HOME / HF_HUB_OFFLINE)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "pretrained=True needs huggingface_hub: pip install 'transnext[hub]' "
            f"(or download {weights.url} and pass checkpoint_path=)"
        ) from e
    return hf_hub_download(repo_id=weights.hf_hub_id, filename=weights.filename, cache_dir=cache_dir)
