"""Register the TransNeXt variants with timm (imported by ``import transnext`` when timm is installed).

After registration::

    timm.create_model("transnext_tiny", pretrained=True)                      # ImageNet-1K, 224
    timm.create_model("transnext_small.in1k_384", pretrained=True)            # 384 fine-tune
    timm.create_model("transnext_tiny", features_only=True, out_indices=(1, 2, 3))
    timm.create_model("transnext_tiny", pretrained=True, num_classes=10)      # head dropped, warning

Pretrained configs are generated from :data:`transnext.models.WEIGHTS` (hub id, file name,
evaluation transforms); published ``.pth`` files are adapted by
:func:`transnext.checkpoints.checkpoint_filter_fn`. Feature extraction uses timm's ``getter``
wrapper around :meth:`TransNeXt.forward_intermediates` (four NCHW maps, strides 4 to 32).
Variants are built through :func:`transnext.models.variant_kwargs`, as ``create_model`` builds
them; extra keyword arguments reach :class:`~transnext.models.TransNeXt` (``img_size``,
``pretrain_size``, ``pos_bias``, ``fixed_pool_size``, ``drop_path_rate``, ``attn_backend``, ...).
The FX leaf modules of :mod:`transnext.integrations.fx` are registered with timm here.
"""

from __future__ import annotations

import sys
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..checkpoints import checkpoint_filter_fn
from ..models.registry import DEFAULT_TAG, VARIANTS, WEIGHTS, Weights, variant_kwargs
from ..models.transnext import TransNeXt
from .fx import register_with_timm

__all__ = ["default_cfgs", "pretrained_cfg", "MODEL_NAMES"]

PAPER = "TransNeXt: Robust Foveal Visual Perception for Vision Transformers"
PAPER_ID = "arXiv:2311.17132"


def pretrained_cfg(w: Weights) -> dict[str, Any]:
    """timm pretrained config of one published checkpoint."""
    cfg = w.as_pretrained_cfg()
    for key in ("architecture", "tag", "url"):  # timm fills these from the registered name / hub id
        cfg.pop(key)
    return dict(cfg, paper_name=PAPER, paper_ids=PAPER_ID)


def _ordered_weights() -> list[Weights]:
    # The default tag of each variant first: timm makes the first tag with weights the default.
    ws = sorted(WEIGHTS.values(), key=lambda w: (w.variant, w.tag != DEFAULT_TAG[w.variant], w.tag))
    return ws


default_cfgs = generate_default_cfgs({w.name: pretrained_cfg(w) for w in _ordered_weights()})


def _weights_for(variant: str, cfg: Any) -> Weights:
    """The weights record behind timm's ``pretrained_cfg`` argument (a tag, or None = default)."""
    if isinstance(cfg, str) and f"{variant}.{cfg}" in WEIGHTS:
        return WEIGHTS[f"{variant}.{cfg}"]
    tag = getattr(cfg, "tag", None) if cfg is not None and not isinstance(cfg, dict) else (cfg or {}).get("tag")
    if tag and f"{variant}.{tag}" in WEIGHTS:
        return WEIGHTS[f"{variant}.{tag}"]
    return WEIGHTS[f"{variant}.{DEFAULT_TAG[variant]}"]


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> TransNeXt:
    w = _weights_for(variant, kwargs.get("pretrained_cfg"))
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    # timm's own arguments (pretrained_cfg, features_only, ...) pass through to build_model_with_cfg.
    return build_model_with_cfg(
        TransNeXt,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **variant_kwargs(w.name, **kwargs),
    )


def _entrypoint(variant: str):
    def fn(pretrained: bool = False, **kwargs: Any) -> TransNeXt:
        return _create(variant, pretrained=pretrained, **kwargs)

    fn.__name__ = fn.__qualname__ = variant
    fn.__module__ = __name__
    fn.__doc__ = f"TransNeXt {variant.removeprefix('transnext_')} (published weights: " + ", ".join(
        w.name for w in _ordered_weights() if w.variant == variant
    ) + ")."
    return fn


register_with_timm()  # modules timm's FX feature extraction keeps whole

MODEL_NAMES = sorted(VARIANTS)
_module = sys.modules[__name__]
for _name in MODEL_NAMES:
    setattr(_module, _name, register_model(_entrypoint(_name)))
