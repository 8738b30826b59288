"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A training checkpoint is a ``torch.save`` dict that ``torch.load(weights_only=True)`` reads:
tensors, numbers, strings, lists and dicts only (RNG states are converted to tensors/lists).
Its ``model`` entry is a plain state dict, so :func:`transnext.load_checkpoint` and
``create_model(checkpoint_path=...)`` accept these files too.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import CheckpointError, atomic_write, safe_torch_load

__all__ = ["capture_rng_state", "load_training_checkpoint", "restore_rng_state", "save_training_checkpoint"]

FORMAT = "transnext-train-v1"


def capture_rng_state() -> dict[str, Any]:
    import numpy as np

    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": int(version), "state": [int(s) for s in state], "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def save_training_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    state = dict(state, format=FORMAT)
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_training_checkpoint` (safely, weights only)."""
    path = Path(path)
    ck = safe_torch_load(path, "checkpoint to resume from")
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a transnext training checkpoint (no '{FORMAT}' marker); to start from a weights file "
            "use --initial-checkpoint instead of --resume"
        )
    missing = [k for k in ("model", "optimizer", "epoch", "step_in_epoch", "global_step", "config") if k not in ck]
    if missing:
        raise CheckpointError(f"{path}: incomplete training checkpoint, missing {', '.join(missing)}")
    return ck
