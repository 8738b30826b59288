"""Variant definitions, published-weights metadata, and the ``create_model`` entry point.

Model code carries no config framework: each variant is a dict of constructor arguments, and
each published checkpoint is a :class:`Weights` record that code (``create_model``, timm
registration, ``transnext info``) and docs all read.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..preprocessing import DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, eval_crop
from ..recipes import ROBUSTNESS_FIGURES, from_scratch_drop_path_rates, recipe_for_weights
from .transnext import TransNeXt

__all__ = [
    "VARIANTS", "WEIGHTS", "Weights", "build_variant", "create_model", "eval_crop", "get_weights", "list_models",
    "list_pretrained", "variant_kwargs",
]


_COMMON = dict(mlp_ratios=(8, 8, 4, 4), qkv_bias=True)

VARIANTS: dict[str, dict[str, Any]] = {
    "transnext_micro": dict(
        embed_dims=(48, 96, 192, 384), num_heads=(2, 4, 8, 16), depths=(2, 2, 15, 2),
        sr_ratios=(8, 4, 2, 1), window_size=(3, 3, 3, None), **_COMMON,
    ),
    "transnext_tiny": dict(
        embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24), depths=(2, 2, 15, 2),
        sr_ratios=(8, 4, 2, 1), window_size=(3, 3, 3, None), **_COMMON,
    ),
    "transnext_small": dict(
        embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24), depths=(5, 5, 22, 5),
        sr_ratios=(8, 4, 2, 1), window_size=(3, 3, 3, None), **_COMMON,
    ),
    "transnext_base": dict(
        embed_dims=(96, 192, 384, 768), num_heads=(4, 8, 16, 32), depths=(5, 5, 23, 5),
        sr_ratios=(8, 4, 2, 1), window_size=(3, 3, 3, None), **_COMMON,
    ),
    "transnext_micro_aaaa": dict(
        embed_dims=(48, 96, 192, 384), num_heads=(2, 4, 8, 16), depths=(2, 2, 15, 2),
        sr_ratios=(16, 8, 4, 2), window_size=(3, 3, 3, 3), **_COMMON,
    ),
}

# Published stochastic-depth rates of the ImageNet-1K recipe (docs/model.md section 7): a view of the
# from-scratch classification recipes of the registry (transnext.recipes).
DROP_PATH_RATES: dict[str, float] = from_scratch_drop_path_rates()


def final_grid(size: int) -> int:
    """Side of the last stage's feature map for an input side ``size`` (stride 32).

    The stem convolution (kernel 7, stride 4, padding 3) gives ceil(size / 4); each later patch
    embedding (kernel 3, stride 2, padding 1) halves it, rounding up (docs/model.md section 1).
    """
    grid = -(-size // 4)
    for _ in range(3):
        grid = -(-grid // 2)
    return grid


@dataclass(frozen=True)
class Weights:
    """One published checkpoint and everything needed to use it."""

    variant: str
    tag: str
    hf_hub_id: str
    filename: str
    img_size: int
    pretrain_size: int
    top1: float
    params_m: float
    gflops: float
    crop_pct: float = DEFAULT_CROP_PCT
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_classes: int = 1000
    robustness: dict[str, float] = field(default_factory=dict)
    recipe: str | None = None  # the registry recipe that trained it (transnext.recipes.RECIPES)

    @property
    def name(self) -> str:
        return f"{self.variant}.{self.tag}"

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.hf_hub_id}/resolve/main/{self.filename}"

    @property
    def meta(self) -> dict[str, Any]:
        """torchvision-style metadata: ``recipe`` (the registry name of the recipe that trained
        these weights), ``_metrics`` (its published figures, ``{"ImageNet-1K": {"top1": 84.0}, ...}``,
        read from the registry), ``_ops`` (published GFLOPs at ``img_size``) and ``num_params_m``."""
        from ..recipes import get_recipe

        metrics = get_recipe(self.recipe).published_dict() if self.recipe else {}
        return {"recipe": self.recipe, "_metrics": metrics, "_ops": self.gflops, "num_params_m": self.params_m}

    def as_pretrained_cfg(self) -> dict[str, Any]:
        """The same record as a timm-style pretrained config (a plain dict; timm not needed).

        ``pool_size`` is the last stage's (unpooled) feature grid at ``input_size``, as timm's model
        contract expects; any input size runs (``fixed_input_size`` False).
        """
        size = (3, self.img_size, self.img_size)
        return dict(
            architecture=self.variant,
            tag=self.tag,
            hf_hub_id=self.hf_hub_id,
            hf_hub_filename=self.filename,
            url=self.url,
            num_classes=self.num_classes,
            input_size=size,
            test_input_size=size,  # evaluated at the training size (no larger test size)
            pool_size=(final_grid(self.img_size), final_grid(self.img_size)),
            crop_pct=self.crop_pct,
            crop_mode=self.crop_mode,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            first_conv="patch_embed1.proj",
            classifier="head",
            fixed_input_size=False,
            license="apache-2.0",
            origin_url=f"https://huggingface.co/{self.hf_hub_id}",
            notes=(f"ImageNet-1K top-1 {self.top1}", f"pretrain_size {self.pretrain_size}"),
        )

    def transforms(self) -> Callable[[Any], Any]:
        """The evaluation transform of these weights (PIL image -> normalised tensor), as torchvision's
        ``weights.transforms()``: below 384 resize the short side to size/crop_pct and centre-crop,
        at 384 and above resize straight to size x size (docs/model.md section 7)."""
        import importlib.util

        if importlib.util.find_spec("timm") is None:
            raise ImportError("Weights.transforms() builds the transform with timm: pip install 'transnext-pytorch[timm]'")
        return build_eval_transform(
            self.img_size, crop_pct=self.crop_pct, interpolation=self.interpolation, mean=self.mean, std=self.std,
            crop_mode=self.crop_mode,
        )


def _w(variant: str, tag: str, hub: str, fname: str, size: int, pre: int, params: float, gflops: float) -> Weights:
    """A published record; its top-1 and robustness figures are those of the recipe that trained it."""
    recipe = recipe_for_weights(f"{variant}.{tag}")
    if recipe is None:
        raise ValueError(f"published weights {variant}.{tag} name no recipe of transnext.recipes.RECIPES")
    published = recipe.published
    robustness = {key: published[d][m] for key, (d, m) in ROBUSTNESS_FIGURES.items() if m in published.get(d, {})}
    crop_pct, crop_mode = eval_crop(size)
    return Weights(variant, tag, f"DaiShiResearch/{hub}", fname, size, pre, published["ImageNet-1K"]["top1"], params, gflops,
                   crop_pct, crop_mode, robustness=robustness, recipe=recipe.name)


WEIGHTS: dict[str, Weights] = {
    w.name: w
    for w in (
        # top-1 and robustness: the published figures of each record's recipe (transnext.recipes)
        _w("transnext_micro", "in1k", "transnext-micro-224-1k", "transnext_micro_224_1k.pth", 224, 224, 12.8, 2.7),
        _w("transnext_tiny", "in1k", "transnext-tiny-224-1k", "transnext_tiny_224_1k.pth", 224, 224, 28.2, 5.7),
        _w("transnext_small", "in1k", "transnext-small-224-1k", "transnext_small_224_1k.pth", 224, 224, 49.7, 10.3),
        _w("transnext_base", "in1k", "transnext-base-224-1k", "transnext_base_224_1k.pth", 224, 224, 89.7, 18.4),
        _w("transnext_small", "in1k_384", "transnext-small-384-1k-ft-1k", "transnext_small_384_1k_ft_1k.pth", 384, 224, 49.7, 32.1),
        _w("transnext_base", "in1k_384", "transnext-base-384-1k-ft-1k", "transnext_base_384_1k_ft_1k.pth", 384, 224, 89.7, 56.3),
        _w("transnext_micro_aaaa", "in1k", "transnext-micro-AAAA-256-1k", "transnext_micro_AAAA_256_1k.pth", 256, 256, 13.1, 3.3),
    )
}

DEFAULT_TAG = {v: "in1k" for v in VARIANTS}


def _canonical(name: str) -> str:
    prefix = "transnext_micro_aaaa"  # the published name spells it transnext_micro_AAAA
    if name.lower().startswith(prefix):
        return prefix + name[len(prefix):]
    return name


def _unknown(name: str, choices: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"unknown model {name!r}{hint} Available: {', '.join(choices)}")


def split_name(name: str) -> tuple[str, str | None]:
    """'transnext_small.in1k_384' -> ('transnext_small', 'in1k_384'); aliases resolved."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    name = _canonical(name)
    variant, _, tag = name.partition(".")
    if variant.endswith("_384") and variant[:-4] in VARIANTS and not tag:
        variant, tag = variant[:-4], "in1k_384"
    if variant not in VARIANTS:
        raise _unknown(name, list_models() + list_pretrained())
    if tag and f"{variant}.{tag}" not in WEIGHTS:
        raise _unknown(name, list_pretrained())
    return variant, tag or None


def get_weights(name: str) -> Weights:
    """Weights record of ``variant`` or ``variant.tag`` (default tag: the 224/256 ImageNet-1K run)."""
    variant, tag = split_name(name)
    return WEIGHTS[f"{variant}.{tag or DEFAULT_TAG[variant]}"]


def list_models() -> list[str]:
    return sorted(VARIANTS)


def list_pretrained() -> list[str]:
    return sorted(WEIGHTS)


def variant_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """``TransNeXt`` constructor arguments of a variant or ``variant.tag``.

    The one place where a name becomes an architecture: the variant's config, the input and
    pretraining sizes of its weights record (the 384 fine-tunes: 384 with a 224 pretraining grid),
    then ``overrides``; ``img_size`` / ``pretrain_size`` of None mean "the record's". Used by
    :func:`create_model`, the timm registration and the torch.hub entry points.
    """
    variant, _ = split_name(name)
    weights = get_weights(name)
    kwargs: dict[str, Any] = dict(VARIANTS[variant], img_size=weights.img_size, pretrain_size=weights.pretrain_size)
    kwargs.update({k: v for k, v in overrides.items() if v is not None or k not in ("img_size", "pretrain_size")})
    return kwargs


def build_variant(name: str, **overrides: Any) -> TransNeXt:
    """A variant (or ``variant.tag``) with freshly initialised weights; see :func:`variant_kwargs`."""
    return TransNeXt(**variant_kwargs(name, **overrides))


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    num_classes: int = 1000,
    img_size: int | tuple[int, int] | None = None,
    pretrain_size: int | tuple[int, int] | None = None,
    pos_bias: str = "extrapolate",
    fixed_pool_size: int | None = None,
    drop_path_rate: float = 0.0,
    **kwargs: Any,
) -> TransNeXt:
    """Build a TransNeXt model, optionally with published or local weights.

    Args:
        name: a variant (``transnext_tiny``) or a variant with a weights tag
            (``transnext_small.in1k_384``); ``transnext_micro_AAAA`` is accepted as an alias.
        pretrained: download the published checkpoint (Hugging Face hub) and load it.
        checkpoint_path: load this local file instead (``.pth``/``.pt``/``.bin``/``.safetensors``).
        num_classes: classifier size; a checkpoint head of another size is dropped with a warning.
        img_size / pretrain_size: default from the weights record (224; micro_aaaa 256; the 384
            fine-tunes 384 / 224). Inputs of any size are accepted regardless.
        pos_bias: ``"extrapolate"`` (default) or ``"interpolate"``.
        fixed_pool_size: linear inference mode with a fixed PxP pooled key grid.
        drop_path_rate: stochastic depth (0 for inference; see ``DROP_PATH_RATES`` for training).
        **kwargs: further ``TransNeXt`` arguments (``attn_backend``, ``in_chans``, ...).
    """
    weights = get_weights(name)
    model = build_variant(
        name, num_classes=num_classes, img_size=img_size, pretrain_size=pretrain_size, pos_bias=pos_bias,
        fixed_pool_size=fixed_pool_size, drop_path_rate=drop_path_rate, **kwargs,
    )
    model.weights = weights
    model.pretrained_cfg = model.default_cfg = weights.as_pretrained_cfg()  # timm data helpers read it
    if pretrained and checkpoint_path is None:
        from ..checkpoints import download_weights

        checkpoint_path = download_weights(weights)
    if checkpoint_path is not None:
        from ..checkpoints import load_checkpoint

        load_checkpoint(model, checkpoint_path)
    return model
