"""The reference's published dense-task checkpoints (mmseg / mmdet state dicts) in our models.

:func:`load_reference_checkpoint` reads a checkpoint file (or a state dict already in memory),
recognises which reference format it is (:data:`REFERENCE_FORMATS`), renames its keys to ours and
loads them with the strict report of classification checkpoints (one :class:`CheckpointError`
naming every missing, unexpected and mis-shaped key). Files are read with the project's safe
loader: nothing pickled is executed.

UPerNet (mmseg 0.x and 1.x ``EncoderDecoder``, e.g. the ADE20K 160k files): ``{"meta": ...,
"state_dict": {...}}`` with

=================================================  ==============================================
mmseg                                              ours (:class:`~transnext.dense.UPerNet`)
=================================================  ==============================================
``backbone.*``                                     ``backbone.model.*`` (the classification names)
``decode_head.psp_modules.{i}.1.{conv,bn}.*``      ``decode_head.ppm.{i}.1.{0,1}.*``
``decode_head.bottleneck.{conv,bn}.*``             ``decode_head.ppm_bottleneck.{0,1}.*``
``decode_head.{lateral,fpn}_convs.{i}.{conv,bn}``  ``decode_head.{lateral,fpn}_convs.{i}.{0,1}``
``decode_head.fpn_bottleneck.{conv,bn}.*``         ``decode_head.fpn_bottleneck.{0,1}.*``
``decode_head.conv_seg.*``                         ``decode_head.classifier.1.*``
``auxiliary_head.convs.{i}.{conv,bn}.*``           ``aux_head.convs.{i}.{0,1}.*``
``auxiliary_head.conv_seg.*``                      ``aux_head.classifier.1.*``
=================================================  ==============================================

The checkpoint does not record the backbone's position-bias settings: build the model as the
checkpoint's config did (``upernet_transnext(variant, num_classes=150)`` for the ``*_ss`` configs,
``preset="upernet_extrapolation"`` for the ``*_ms_extrapolation`` ones).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor, nn

from ..checkpoints import CheckpointError, _unwrap, checkpoint_filter_fn, load_state_dict, load_state_dict_into, safe_torch_load

__all__ = ["REFERENCE_FORMATS", "ReferenceFormat", "convert_mmseg_upernet", "is_mmseg_upernet", "load_reference_checkpoint"]


class ReferenceFormat(NamedTuple):
    """One reference checkpoint layout: how to recognise it, convert it, and which model it fits."""

    description: str  # for messages: what the checkpoint is
    detect: Callable[[Mapping[str, Tensor]], bool]
    convert: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
    fits: Callable[[nn.Module], bool]
    model_hint: str  # for messages: the model to build for it
    to_reference_name: Callable[[str], str] = lambda key: key  # our key -> the checkpoint's, for error messages


# ---------------------------------------------------------------------------------------- mmseg UPerNet
# (mmseg prefix, our prefix); "{i}" is a module index. ConvModule's conv / bn are our Sequential's 0 / 1.
_UPERNET_RULES = [
    ("decode_head.psp_modules.{i}.1.conv.", "decode_head.ppm.{i}.1.0."),
    ("decode_head.psp_modules.{i}.1.bn.", "decode_head.ppm.{i}.1.1."),
    ("decode_head.bottleneck.conv.", "decode_head.ppm_bottleneck.0."),
    ("decode_head.bottleneck.bn.", "decode_head.ppm_bottleneck.1."),
    ("decode_head.lateral_convs.{i}.conv.", "decode_head.lateral_convs.{i}.0."),
    ("decode_head.lateral_convs.{i}.bn.", "decode_head.lateral_convs.{i}.1."),
    ("decode_head.fpn_convs.{i}.conv.", "decode_head.fpn_convs.{i}.0."),
    ("decode_head.fpn_convs.{i}.bn.", "decode_head.fpn_convs.{i}.1."),
    ("decode_head.fpn_bottleneck.conv.", "decode_head.fpn_bottleneck.0."),
    ("decode_head.fpn_bottleneck.bn.", "decode_head.fpn_bottleneck.1."),
    ("decode_head.conv_seg.", "decode_head.classifier.1."),
    ("auxiliary_head.convs.{i}.conv.", "aux_head.convs.{i}.0."),
    ("auxiliary_head.convs.{i}.bn.", "aux_head.convs.{i}.1."),
    ("auxiliary_head.conv_seg.", "aux_head.classifier.1."),
    ("backbone.", "backbone.model."),
]


def _compile(src: str, dst: str) -> tuple[re.Pattern[str], str]:
    return re.compile(re.escape(src).replace(r"\{i\}", r"(\d+)")), dst.replace("{i}", r"\1")


_TO_OURS = [_compile(theirs, ours) for theirs, ours in _UPERNET_RULES]
_TO_THEIRS = [_compile(ours, theirs) for theirs, ours in _UPERNET_RULES]


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, template in rules:
        found = pattern.match(key)
        if found:
            return found.expand(template) + key[found.end():]
    return key


def _upernet_reference_name(key: str) -> str:
    return _rename(key, _TO_THEIRS)


def is_mmseg_upernet(state_dict: Mapping[str, Tensor]) -> bool:
    """An mmseg ``EncoderDecoder`` with a ``UPerHead`` (its pyramid pooling and FPN fusion keys)."""
    keys = list(state_dict)
    return (any(k.startswith("backbone.") for k in keys) and any(k.startswith("decode_head.psp_modules.") for k in keys)
            and any(k.startswith("decode_head.fpn_bottleneck.") for k in keys))


def convert_mmseg_upernet(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """An mmseg UPerNet state dict (bare or ``{"meta", "state_dict"}``) in the key names of :class:`UPerNet`.

    The backbone goes through :func:`~transnext.checkpoints.checkpoint_filter_fn` (size tables that
    some exports carry are dropped); keys of no known module are kept unchanged, so a strict load
    reports them as unexpected.
    """
    state_dict = _unwrap(state_dict, "<mmseg state dict>")
    backbone = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    # the dense backbone has no classifier: nn.Module() stands for a model without a head
    out = {"backbone.model." + k: v for k, v in checkpoint_filter_fn(backbone, nn.Module()).items()}
    for k, v in state_dict.items():
        if not k.startswith("backbone."):
            out[_rename(k, _TO_OURS)] = v
    return out


def _is_upernet(model: nn.Module) -> bool:
    from .upernet import UPerNet

    return isinstance(model, UPerNet)


def _mmdet(name: str) -> Callable[..., Any]:
    """A function of .reference_mmdet, imported on first use (it needs torchvision)."""
    def call(*args: Any) -> Any:
        from . import reference_mmdet

        return getattr(reference_mmdet, name)(*args)

    return call


def _mask2former(name: str) -> Callable[..., Any]:
    """A function of .mask2former, imported on first use."""
    def call(*args: Any) -> Any:
        from . import mask2former

        return getattr(mask2former, name)(*args)

    return call


def _dino(name: str) -> Callable[..., Any]:
    """A function of .dino, imported on first use."""
    def call(*args: Any) -> Any:
        from . import dino

        return getattr(dino, name)(*args)

    return call


def _is_dino(model: nn.Module) -> bool:
    from .dino import DINO

    return isinstance(model, DINO)


# Further formats are one entry each.
REFERENCE_FORMATS: dict[str, ReferenceFormat] = {
    "mmseg_upernet": ReferenceFormat(
        "an mmseg UPerNet checkpoint", is_mmseg_upernet, convert_mmseg_upernet, _is_upernet,
        "a UPerNet (transnext.dense.upernet_transnext)", _upernet_reference_name,
    ),
    # Mask R-CNN 1x (mmdet): renaming, class order and mmdet's test-time computation in .reference_mmdet
    "mmdet_maskrcnn": ReferenceFormat(
        "an mmdet Mask R-CNN checkpoint", _mmdet("is_mmdet_maskrcnn"), _mmdet("convert_mmdet_maskrcnn"), _mmdet("is_maskrcnn"),
        "a Mask R-CNN (transnext.dense.maskrcnn_transnext(..., num_classes=81, reference=True))", _mmdet("mmdet_reference_name"),
    ),
    # Mask2Former (mmseg 1.x around mmdet's head): the head's names are the reference's, see .mask2former
    "mmseg_mask2former": ReferenceFormat(
        "an mmseg Mask2Former checkpoint", _mask2former("is_mmseg_mask2former"), _mask2former("convert_mmdet_mask2former"),
        _mask2former("is_mask2former"), "a Mask2Former (transnext.dense.mask2former_transnext)", _upernet_reference_name,
    ),
    # DINO (mmdet 3): the transformer and head names are the reference's, see .dino
    "mmdet_dino": ReferenceFormat(
        "an mmdet DINO checkpoint", _dino("is_mmdet_dino"), _dino("convert_mmdet_dino"), _is_dino,
        "a DINO (transnext.dense.dino_transnext(variant, num_classes=80, num_feature_levels=4 or 5))", _upernet_reference_name,
    ),
}


# ---------------------------------------------------------------------------------------- loading
def _classes(obj: Any) -> list[str] | None:
    """Class names an mmseg / mmdet checkpoint records (0.x ``meta.CLASSES``, 1.x ``meta.dataset_meta.classes``)."""
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return None
    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), Mapping):
        names = meta["dataset_meta"].get("classes")
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else None


def _detect(state_dict: Mapping[str, Tensor], source: str) -> str:
    for name, fmt in REFERENCE_FORMATS.items():
        if fmt.detect(state_dict):
            return name
    known = "; ".join(fmt.description for fmt in REFERENCE_FORMATS.values())
    hint = ""
    if "head.weight" in state_dict or any(k.startswith(("patch_embed1.", "block1.")) for k in state_dict):
        hint = " It looks like a classification checkpoint: pass it as backbone_weights= when building the model."
    raise CheckpointError(f"{source}: not a recognised reference checkpoint (expected {known}; its keys start with "
                          f"{', '.join(sorted({k.split('.', 1)[0] for k in state_dict})[:6])}).{hint}")


def _name_hints(message: str, converted: Mapping[str, Tensor], model: nn.Module, fmt: ReferenceFormat) -> str:
    """The checkpoint's own names of the keys a strict error lists, and a class-count hint."""
    notes = []
    seen: set[str] = set()
    for key in re.findall(r"[A-Za-z_][\w]*(?:\.[\w]+)+", message):
        theirs = fmt.to_reference_name(key)
        if theirs != key and key not in seen:
            seen.add(key)
            notes.append(f"{key} = {theirs}")
    hint = ""
    weight = converted.get("decode_head.classifier.1.weight")
    if weight is None and "decode_head.cls_embed.weight" in converted:  # Mask2Former: classes + "no object"
        weight = converted["decode_head.cls_embed.weight"][:-1]
    classes = getattr(model, "num_classes", None)
    if weight is not None and classes is not None and weight.shape[0] != classes:
        hint = f" The checkpoint has {weight.shape[0]} classes, the model {classes}: build it with num_classes={weight.shape[0]}."
    if getattr(model, "aux_head", False) is None and any(k.startswith("aux_head.") for k in converted):
        hint += " The checkpoint has the auxiliary FCN head: build the model with aux_head=True (or load with strict=False)."
    names = f" In the checkpoint's names: {'; '.join(notes[:8])}{' ...' if len(notes) > 8 else ''}." if notes else ""
    return hint + names


def load_reference_checkpoint(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Any], *,
                              strict: bool = True) -> dict[str, Any]:
    """Load a published reference dense-task checkpoint into ``model`` (kind detected from its keys).

    ``path_or_state_dict``: a ``.pth`` file (read with ``torch.load(weights_only=True)`` and a small
    allow-list; a file that needs other pickled objects is refused), a ``.safetensors`` file, or a
    state dict, bare or ``{"meta": ..., "state_dict": ...}``.

    Returns:
        ``{"kind": "mmseg_upernet", "classes": [...] or None, "missing_keys": [...],
        "unexpected_keys": [...], "mismatched_keys": [...]}`` (our key names; the lists are empty
        after a strict load).

    Raises:
        CheckpointError: unreadable or refused file, an unrecognised layout, a model of the wrong
            kind, or (``strict``) any missing, unexpected or mis-shaped key, named in our and the
            checkpoint's terms.
    """
    if isinstance(path_or_state_dict, Mapping):
        source, raw = "<state dict>", path_or_state_dict
        state_dict = _unwrap(raw, source)
    else:
        path = Path(path_or_state_dict)
        source = str(path)
        if path.suffix.lower() == ".safetensors":
            raw, state_dict = {}, load_state_dict(path)
        else:
            raw = safe_torch_load(path, what="reference checkpoint")
            state_dict = _unwrap(raw, source)
    kind = _detect(state_dict, source)
    fmt = REFERENCE_FORMATS[kind]
    if not fmt.fits(model):
        raise CheckpointError(f"{source} is {fmt.description}; it loads into {fmt.model_hint}, not a {type(model).__name__}")
    converted = fmt.convert(state_dict)
    try:
        report = load_state_dict_into(model, converted, source, strict=strict, filter_fn=None)
    except CheckpointError as e:
        raise CheckpointError(f"{e}.{_name_hints(str(e), converted, model, fmt)}") from None
    return {"kind": kind, "classes": _classes(raw), **report}
