"""Building models for training, evaluation and prediction (registry variants or custom sizes)."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..checkpoints import CheckpointError

__all__ = ["build_model", "checkpoint_info", "model_from_checkpoint"]


def build_model(
    model: str,
    num_classes: int = 1000,
    model_kwargs: dict[str, Any] | None = None,
    img_size: int | None = None,
    pretrain_size: int | None = None,
    pos_bias: str = "extrapolate",
    fixed_pool_size: int | None = None,
    drop_path: float = 0.0,
    attn_backend: str | None = None,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
) -> torch.nn.Module:
    """``transnext.create_model`` plus architecture overrides (``model_kwargs``) and the arch record."""
    from ..models import create_model

    kwargs = dict(model_kwargs or {})
    if attn_backend is not None:
        kwargs["attn_backend"] = attn_backend
    m = create_model(
        model, pretrained=pretrained, checkpoint_path=checkpoint_path, num_classes=num_classes, img_size=img_size,
        pretrain_size=pretrain_size, pos_bias=pos_bias, fixed_pool_size=fixed_pool_size, drop_path_rate=drop_path,
        **kwargs,
    )
    m.arch = dict(  # type: ignore[attr-defined]
        model=model, model_kwargs={k: list(v) if isinstance(v, tuple) else v for k, v in (model_kwargs or {}).items()},
        num_classes=num_classes, img_size=list(m.img_size), pretrain_size=list(m.pretrain_size), pos_bias=pos_bias,
    )
    return m


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata a transnext checkpoint carries (arch, classes, data config); {} for plain weights."""
    from ..checkpoints import load_state_dict

    path = str(path)
    if path.endswith(".safetensors"):
        head = load_state_dict(path).get("head.weight")
        return {"head_classes": int(head.shape[0])} if head is not None else {}
    from ..checkpoints import safe_torch_load

    obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    info = {k: obj[k] for k in ("arch", "classes", "data_cfg", "metrics", "epoch") if k in obj}
    sd = obj.get("model") if isinstance(obj.get("model"), dict) else obj
    head = sd.get("head.weight") if isinstance(sd, dict) else None
    if isinstance(head, torch.Tensor):
        info["head_classes"] = int(head.shape[0])
    return info


def model_from_checkpoint(
    path: str | os.PathLike,
    model: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    pos_bias: str | None = None,
    fixed_pool_size: int | None = None,
    attn_backend: str | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as (or ``model``) and load its weights."""
    info = checkpoint_info(path)
    arch = info.get("arch") or {}
    name = model or arch.get("model")
    if name is None:
        raise ValueError(f"{path} does not record its architecture; pass --model VARIANT (e.g. transnext_tiny)")
    kwargs = arch.get("model_kwargs", {}) if (model is None or model == arch.get("model")) else {}
    n_cls = num_classes or arch.get("num_classes") or info.get("head_classes") or 1000
    pre = arch.get("pretrain_size")
    m = build_model(
        name, num_classes=n_cls, model_kwargs=kwargs,
        img_size=img_size or (arch.get("img_size") or [None])[0],
        pretrain_size=pre[0] if pre else None, pos_bias=pos_bias or arch.get("pos_bias", "extrapolate"),
        fixed_pool_size=fixed_pool_size, attn_backend=attn_backend, checkpoint_path=str(path),
    )
    return m, info


def _size_problem(model: Any, size: int) -> str | None:
    """Why a size x size input cannot run through ``model`` (None when it can)."""
    fixed = getattr(model, "fixed_pool_size", None)
    for i, grid in enumerate(model.stage_grids((size, size))):
        g = min(grid)
        sr = model.sr_ratios[i]
        if g < 1:
            return f"stage {i + 1} would have an empty feature map"
        if sr == 1:
            continue
        if fixed is not None and fixed > g:
            return f"fixed_pool_size={fixed} is larger than the stage {i + 1} feature map {grid[0]}x{grid[1]}"
        if fixed is None and g < sr:
            return f"the stage {i + 1} feature map {grid[0]}x{grid[1]} is smaller than its sr_ratio {sr} (empty pooled key grid)"
    return None


def check_image_size(model: Any, size: int, flag: str = "--img-size") -> None:
    """Raise a ValueError naming the smallest usable size when ``size`` is too small for ``model``."""
    problem = _size_problem(model, size)
    if problem is None:
        return
    smallest = next((s for s in range(1, 8193) if _size_problem(model, s) is None), None)
    hint = f"; the minimum input is {smallest}x{smallest}" if smallest else ""
    raise ValueError(f"{flag} {size}: input {size}x{size} is too small: {problem}{hint}")
