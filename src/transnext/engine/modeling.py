"""Building models for training, evaluation and prediction (registry variants or custom sizes)."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..checkpoints import CheckpointError

__all__ = ["checkpoint_info", "create_model_with_arch", "model_from_checkpoint"]


def create_model_with_arch(
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
    """``transnext.create_model`` plus architecture overrides (``model_kwargs``), recording them in ``model.arch``
    (saved in training checkpoints so that ``model_from_checkpoint`` can rebuild the same model)."""
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
    from ..checkpoints import load_state_dict, safetensors_metadata

    path = str(path)
    if path.lower().endswith(".safetensors"):
        sd = load_state_dict(path)
        info = safetensors_metadata(path)  # written by transnext convert: arch, classes, data_cfg, task
        head = sd.get("head.weight")
        if head is not None:
            info["head_classes"] = int(head.shape[0])
        _note_dense_task(info, sd)
        return info
    from ..checkpoints import safe_torch_load

    obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    info = {k: obj[k] for k in ("arch", "classes", "data_cfg", "metrics", "epoch", "task") if k in obj}
    sd = obj.get("model") if isinstance(obj.get("model"), dict) else obj
    head = sd.get("head.weight") if isinstance(sd, dict) else None
    if isinstance(head, torch.Tensor):
        info["head_classes"] = int(head.shape[0])
    keys_of = next((v for v in (obj.get("model"), obj.get("state_dict")) if isinstance(v, dict)), obj)
    _note_dense_task(info, keys_of)
    return info


# Key prefixes only the dense models have: torchvision detectors (RPN / ROI heads, RetinaNet / FCOS
# heads on an FPN body), the reference mmdet ones, and UPerNet's decode head (ours and mmseg's).
_DETECT_PREFIXES = ("rpn.", "roi_heads.", "backbone.fpn.", "backbone.body.", "head.classification_head.", "head.regression_head.",
                    "rpn_head.", "roi_head.", "bbox_head.")
_SEGMENT_PREFIXES = ("decode_head.", "auxiliary_head.", "aux_head.")
_DENSE_TASKS = {"detect": "detect", "detection": "detect", "segment": "segment", "segmentation": "segment"}


def _note_dense_task(info: dict[str, Any], state_dict: dict[str, Any]) -> None:
    """Set ``info["dense_task"]`` ("detect" / "segment") for a detection or segmentation checkpoint.

    From its recorded task when it has one, else from key names (a converted or foreign file).
    """
    arch = info.get("arch") if isinstance(info.get("arch"), dict) else {}
    task = _DENSE_TASKS.get(str(arch.get("task"))) or _DENSE_TASKS.get(str(info.get("task")))
    if task is None:
        keys = [k[len("module."):] if k.startswith("module.") else k for k in state_dict if isinstance(k, str)]
        if any(k.startswith(_SEGMENT_PREFIXES) for k in keys):
            task = "segment"
        elif any(k.startswith(_DETECT_PREFIXES) for k in keys):
            task = "detect"
    if task is not None:
        info["dense_task"] = task


def refuse_dense_checkpoint(path: str | os.PathLike, info: dict[str, Any], command: str | None = None) -> None:
    """Raise a ValueError naming the right command when ``info`` describes a detection / segmentation checkpoint.

    ``command`` is the classification command that was given the file ("eval", "predict"), if any.
    """
    task = info.get("dense_task")
    if task is None:
        return
    arch = info.get("arch") if isinstance(info.get("arch"), dict) else {}
    kind = "detection" if task == "detect" else "segmentation"
    model = arch.get("detector") or ("upernet" if task == "segment" and arch else None)
    about = f" ({model} on {arch['variant']})" if model and arch.get("variant") else ""
    if command in ("eval", "predict"):
        took = f"'transnext {command}' takes image classification checkpoints"
        use = f"'transnext {task} {command} --checkpoint {path}' (see 'transnext {task} {command} --help')"
    else:
        took = "an image classifier cannot be built from it"
        use = f"'transnext {task} eval' / 'transnext {task} predict' with --checkpoint {path}"
    raise ValueError(f"{path} is a {kind} checkpoint{about}, not an image classification one: {took}; use {use}")


def model_from_checkpoint(
    path: str | os.PathLike,
    model: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    pos_bias: str | None = None,
    fixed_pool_size: int | None = None,
    attn_backend: str | None = None,
    command: str | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as (or ``model``) and load its weights.

    ``command`` ("eval", "predict") names the caller in the error a detection / segmentation
    checkpoint gets (it says which command takes it).
    """
    info = checkpoint_info(path)
    refuse_dense_checkpoint(path, info, command)
    arch = info.get("arch") or {}
    name = model or arch.get("model")
    if name is None:
        raise ValueError(f"{path} does not record its architecture; pass --model VARIANT (e.g. transnext_tiny)")
    kwargs = arch.get("model_kwargs", {}) if (model is None or model == arch.get("model")) else {}
    n_cls = num_classes or arch.get("num_classes") or info.get("head_classes") or 1000
    pre = arch.get("pretrain_size")
    m = create_model_with_arch(
        name, num_classes=n_cls, model_kwargs=kwargs,
        img_size=img_size or (arch.get("img_size") or [None])[0],
        pretrain_size=pre[0] if pre else None, pos_bias=pos_bias or arch.get("pos_bias", "extrapolate"),
        fixed_pool_size=fixed_pool_size, attn_backend=attn_backend, checkpoint_path=str(path),
    )
    return m, info


def check_image_size(model: Any, size: int, flag: str = "--img-size") -> None:
    """Raise a ValueError naming ``flag`` (and the smallest usable size) when ``size`` cannot run.

    The rule itself is the model's resolution plan (:class:`transnext.models.geometry.ResolutionPlan`).
    """
    try:
        model.check_input_size((size, size))
    except ValueError as e:
        raise ValueError(f"{flag} {size}: {e}") from None
