"""Published ImageNet-1K recipe (SPEC section 7) as presets, plus the embedded-demo preset.

Each preset is a dict of :class:`~transnext.engine.config.TrainConfig` fields; anything in it
can be overridden by a config file or a flag.
"""

from __future__ import annotations

from typing import Any

from ..models.registry import DROP_PATH_RATES

__all__ = ["DEMO_ARCH", "PRESETS", "get_preset", "list_presets", "preset_for_model"]

# 300-epoch ImageNet-1K training from scratch (SPEC section 7).
_IMAGENET: dict[str, Any] = dict(
    dataset="folder", img_size=224, batch_size=128, total_batch_size=1024, epochs=300,
    opt="adamw", lr=1e-3, opt_eps=1e-8, weight_decay=0.05, sched="cosine", warmup_epochs=5, warmup_lr=1e-6,
    min_lr=1e-5, clip_grad=1.0, aa="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", scale=(0.08, 1.0),
    interpolation="bicubic", mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch",
    smoothing=0.1, repeated_aug=3, amp="auto", compile=True, crop_pct=None,
)

# 5-epoch fine-tune at 384 from the 224 weights: constant lr 1e-5, no warm-up, Mixup kept, no CutMix.
_FINETUNE_384: dict[str, Any] = dict(
    _IMAGENET, img_size=384, pretrain_size=224, pretrained=True, epochs=5, lr=1e-5, sched="constant",
    warmup_epochs=0, cutmix=0.0,
)

# A small TransNeXt (same blocks, fewer and narrower) for the 28x28 demo images upsampled to 32.
DEMO_ARCH: dict[str, Any] = dict(
    embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), depths=(1, 1, 2, 1), mlp_ratios=(4, 4, 4, 4),
    sr_ratios=(8, 4, 2, 1), window_size=(3, 3, 3, None),
)

PRESETS: dict[str, dict[str, Any]] = {
    # stochastic-depth rates of the 224/256 runs: the registry's table (one source)
    **{v: dict(_IMAGENET, model=f"transnext_{v}", drop_path=DROP_PATH_RATES[f"transnext_{v}"]) for v in ("micro", "tiny", "small", "base")},
    "micro_aaaa": dict(_IMAGENET, model="transnext_micro_aaaa", img_size=256, drop_path=DROP_PATH_RATES["transnext_micro_aaaa"]),
    "small_384": dict(_FINETUNE_384, model="transnext_small", drop_path=0.7),
    "base_384": dict(_FINETUNE_384, model="transnext_base", drop_path=0.8),
    "demo": dict(
        model="transnext_micro", model_kwargs=DEMO_ARCH, dataset="demo", img_size=32, pretrain_size=64,
        drop_path=0.05, batch_size=64, total_batch_size=None, epochs=20, opt="adamw", lr=2e-3, opt_eps=1e-8,
        weight_decay=0.05, sched="cosine", warmup_epochs=2, warmup_lr=1e-5, min_lr=1e-5, clip_grad=1.0,
        aa=None, reprob=0.0, scale=(0.6, 1.0), ratio=(0.8, 1.25), hflip=0.5, color_jitter=0.0,
        interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), mixup=0.0, cutmix=0.0,
        smoothing=0.1, repeated_aug=1, crop_pct=1.0, amp="none", compile=False, num_workers=1, threads=1,
        output="runs/demo", eval_every=1, log_every=20,
    ),
}


def list_presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> dict[str, Any]:
    key = name.lower().removeprefix("transnext_")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return dict(PRESETS[key])


def preset_for_model(model: str) -> str | None:
    """The training preset of a variant name (``transnext_small.in1k_384`` -> ``small_384``)."""
    variant, _, tag = model.lower().partition(".")
    key = variant.removeprefix("transnext_")
    if tag.endswith("384") or key.endswith("_384"):
        key = key.removesuffix("_384") + "_384"
    return key if key in PRESETS else None
