"""timm integration: registration, pretrained configs and loading, features_only, optimizer helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import fill_deterministic, seeded_randn
from hub_cache import make_offline_hub, populate_hub_cache

timm = pytest.importorskip("timm")
pytest.importorskip("timm.optim")

import transnext  # noqa: E402  (registers the variants)
from transnext.models import TransNeXt  # noqa: E402

SMALL = dict(embed_dims=(8, 16, 32, 64), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1))


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return make_offline_hub(tmp_path, monkeypatch)


def test_variants_and_weights_registered() -> None:
    assert timm.list_models("transnext*") == sorted(transnext.list_models())
    assert timm.list_pretrained("transnext*") == sorted(transnext.list_pretrained())
    for name in transnext.list_pretrained():
        cfg = timm.models.get_pretrained_cfg(name)
        w = transnext.get_weights(name)
        assert (cfg.hf_hub_id, cfg.hf_hub_filename) == (w.hf_hub_id, w.filename)
        assert cfg.input_size == (3, w.img_size, w.img_size) and cfg.num_classes == 1000
        assert cfg.first_conv == "patch_embed1.proj" and cfg.classifier == "head"


def test_create_model_defaults_and_tags() -> None:
    m = timm.create_model("transnext_micro", num_classes=7, drop_path_rate=0.1, **SMALL)
    assert isinstance(m, TransNeXt) and m.head.out_features == 7 and m.img_size == (224, 224)
    assert m.pretrained_cfg["tag"] == "in1k"
    assert m.block4[-1].drop_path.drop_prob == pytest.approx(0.1)
    ft = timm.create_model("transnext_micro.in1k", **SMALL)
    assert ft.pretrained_cfg["input_size"] == (3, 224, 224)
    cfg = timm.models.get_pretrained_cfg("transnext_small.in1k_384")
    assert cfg.crop_pct == 1.0 and cfg.crop_mode == "squash"  # resize straight to 384 (docs/model.md section 7)
    data = timm.data.resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg("transnext_tiny").to_dict())
    assert data["crop_pct"] == 0.875 and data["interpolation"] == "bicubic" and data["input_size"] == (3, 224, 224)


def test_384_tag_builds_at_384_with_224_pretrain_grid() -> None:
    # Small widths keep this quick; the tag still selects the 384 / 224 geometry.
    m = timm.create_model("transnext_small.in1k_384", **SMALL, num_classes=0)
    assert m.img_size == (384, 384) and m.pretrain_size == (224, 224)


def test_features_only_matches_forward_intermediates() -> None:
    feats = timm.create_model("transnext_micro", features_only=True, out_indices=(1, 2, 3), **SMALL).eval()
    assert feats.feature_info.channels() == [16, 32, 64]
    assert feats.feature_info.reduction() == [8, 16, 32]
    full = timm.create_model("transnext_micro", **SMALL).eval()
    fill_deterministic(full)
    missing = feats.model.load_state_dict(full.state_dict(), strict=False)
    assert set(missing.unexpected_keys) <= {"head.weight", "head.bias"} and not missing.missing_keys
    x = seeded_randn((2, 3, 96, 128), 0).float()
    with torch.no_grad():
        got = feats(x)
        ref = full.forward_intermediates(x, indices=(1, 2, 3), intermediates_only=True)
    assert [tuple(f.shape) for f in got] == [(2, 16, 12, 16), (2, 32, 6, 8), (2, 64, 3, 4)]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_features_only_prunes_unused_stages() -> None:
    feats = timm.create_model("transnext_micro", features_only=True, out_indices=(0, 1), **SMALL)
    assert not hasattr(feats.model, "block3") and not hasattr(feats.model, "patch_embed4")
    with torch.no_grad():
        out = feats(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in out] == [8, 16]


def test_pretrained_from_hub_cache_with_new_head(offline_hub: Path) -> None:
    # The hub file of transnext_micro holds weights of a narrow model built with the same
    # overrides: the real download and loading path at a fraction of the cost.
    src = timm.create_model("transnext_micro", **SMALL)
    fill_deterministic(src)
    w = transnext.get_weights("transnext_micro")
    # Reference layout: wrapped, with DataParallel prefixes.
    populate_hub_cache(offline_hub, w.hf_hub_id, w.filename,
                       {"model": {"module." + k: v for k, v in src.state_dict().items()}})
    same = timm.create_model("transnext_micro", pretrained=True, **SMALL)
    for k, v in src.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k
    with pytest.warns(UserWarning, match="classifier has 1000 classes, the model 10"):
        new_head = timm.create_model("transnext_micro", pretrained=True, num_classes=10, **SMALL)
    assert new_head.head.out_features == 10
    assert torch.equal(new_head.block3[0].attn.q.weight, src.block3[0].attn.q.weight)
    # timm adapts the stem for other channel counts.
    gray = timm.create_model("transnext_micro", pretrained=True, in_chans=1, num_classes=0, **SMALL)
    assert gray.patch_embed1.proj.weight.shape[1] == 1
    torch.testing.assert_close(gray.patch_embed1.proj.weight[:, 0], src.patch_embed1.proj.weight.sum(1))
    feats = timm.create_model("transnext_micro", pretrained=True, features_only=True, **SMALL)
    assert torch.equal(feats.model.norm4.weight, src.norm4.weight)


def test_pretrained_cfg_overlay_file_uses_filter(tmp_path: Path) -> None:
    src = TransNeXt(**SMALL, mlp_ratios=(8, 8, 4, 4), num_classes=4)
    fill_deterministic(src)
    path = tmp_path / "ref.pth"
    torch.save({"model": src.state_dict(), "epoch": 5}, path)
    m = timm.create_model("transnext_micro", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=4),
                          num_classes=4, **SMALL)
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_unknown_name_in_timm() -> None:
    with pytest.raises(RuntimeError, match="Unknown model"):
        timm.create_model("transnext_tinny")


def test_optimizer_weight_decay_and_layer_decay_groups() -> None:
    model = TransNeXt(**dict(SMALL, depths=(1, 2, 1, 1)), num_classes=3)
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert {"block1.0.attn.query_embedding", "block1.0.attn.temperature", "block1.0.attn.cpb_fc1.weight",
            "block1.0.attn.relative_pos_bias_local", "block4.0.attn.query_embedding"} <= names
    assert "block1.0.attn.learnable_tokens" not in names and "block2.1.mlp.fc1.weight" not in names

    from timm.models import group_parameters

    fine = group_parameters(model, model.group_matcher(coarse=False))
    order = [sorted({n.rsplit(".", 1)[0].split(".attn")[0].split(".mlp")[0].split(".norm")[0].split(".proj")[0]
                     for n in names}) for names in fine.values()]
    flat = [g[0] for g in order]
    assert flat[0] == "patch_embed1" and flat[-1] == "head"
    assert flat.index("patch_embed2") < flat.index("block2.0") < flat.index("block2.1") < flat.index("patch_embed3")
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == 6  # stem, four stages, head
    stage2 = next(v for v in coarse.values() if "block2.0.attn.q.weight" in v)
    assert {"patch_embed2.proj.weight", "block2.1.mlp.fc2.weight", "norm2.weight"} <= set(stage2)
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert scales[-1] == pytest.approx(1.0) and len(scales) > 4


# ---------------------------------------------------------------- timm's model contract
# The substance of timm's own model tests (tests/test_models.py of pytorch-image-models:
# test_model_default_cfgs[_non_std], test_model_forward_features, test_model_forward_intermediates),
# run on narrow models so that the default input sizes stay cheap.

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Default input side -> last-stage grid: ceil(side / 4), then halved three times, rounding up.
FINAL_GRID = {224: (7, 7), 256: (8, 8), 384: (12, 12)}
DEFAULT_SIDE = {
    "transnext_micro.in1k": 224, "transnext_tiny.in1k": 224, "transnext_small.in1k": 224, "transnext_base.in1k": 224,
    "transnext_micro_aaaa.in1k": 256, "transnext_small.in1k_384": 384, "transnext_base.in1k_384": 384,
}


def test_pretrained_cfgs_carry_every_field_timm_reads() -> None:
    assert sorted(DEFAULT_SIDE) == timm.list_pretrained("transnext*")
    for name, side in DEFAULT_SIDE.items():
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.input_size == cfg.test_input_size == (3, side, side), name
        assert cfg.pool_size == FINAL_GRID[side], name
        assert (cfg.crop_pct, cfg.crop_mode) == ((1.0, "squash") if side == 384 else (0.875, "center")), name
        assert (cfg.mean, cfg.std, cfg.interpolation) == (IMAGENET_MEAN, IMAGENET_STD, "bicubic"), name
        assert (cfg.num_classes, cfg.first_conv, cfg.classifier, cfg.fixed_input_size) == (1000, "patch_embed1.proj", "head", False)
        # timm's data helpers resolve the same evaluation settings from the model itself.
        model = timm.create_model(name, **SMALL)
        data = timm.data.resolve_model_data_config(model)
        assert data["input_size"] == (3, side, side) and data["crop_pct"] == cfg.crop_pct, name
        assert data["crop_mode"] == cfg.crop_mode and data["mean"] == IMAGENET_MEAN, name
        assert model.pretrained_cfg["pool_size"] == FINAL_GRID[side]


@pytest.mark.parametrize("name", sorted(DEFAULT_SIDE))
def test_default_cfg_matches_the_model(name: str) -> None:
    """test_model_default_cfgs: pool_size, num_features, head_hidden_size, classifier and first conv."""
    model = timm.create_model(name, **SMALL).eval()
    cfg, state = model.default_cfg, model.state_dict()
    assert model.num_classes == 1000 and model.num_features == model.head_hidden_size == 64
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    x = torch.randn(1, *cfg["input_size"])
    with torch.no_grad():
        tokens, (last,) = model.forward_intermediates(x, indices=1)
        torch.testing.assert_close(tokens, model.forward_features(x))
        pre = model.forward_head(tokens, pre_logits=True)
        assert tuple(last.shape[-2:]) == cfg["pool_size"]  # the unpooled final grid
        assert tokens.shape == (1, model.num_features, *cfg["pool_size"])  # unpooled NCHW map
        assert pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        torch.testing.assert_close(model(x), pre)
    headless = timm.create_model(name, num_classes=0, **SMALL)
    assert isinstance(headless.head, torch.nn.Identity) and headless.num_features == 64


def test_forward_features_is_a_spatial_map_as_timm_expects() -> None:
    model = timm.create_model("transnext_micro", **SMALL).eval()
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, 224, 224))
        model.reset_classifier(0, "")
        unpooled = model(torch.randn(1, 3, 224, 224))
    fmt = getattr(model, "output_fmt", "NCHW")
    spatial = timm.layers.get_spatial_dim(fmt)
    assert out.ndim == unpooled.ndim == 4 and len(spatial) == 2
    assert tuple(out.shape[i] for i in spatial) == model.default_cfg["pool_size"]


@pytest.mark.parametrize("name", sorted(transnext.list_models()))
def test_features_only_contract(name: str) -> None:
    """test_model_forward_features / _intermediates_features at timm's feature test size (96)."""
    feats = timm.create_model(name, features_only=True, **SMALL).eval()
    assert feats.feature_info.channels() == [8, 16, 32, 64] and feats.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        out = feats(torch.randn(1, 3, 96, 96))
    assert [tuple(o.shape) for o in out] == [(1, 8, 24, 24), (1, 16, 12, 12), (1, 32, 6, 6), (1, 64, 3, 3)]
    assert not any(torch.isnan(o).any() for o in out)


# ---------------------------------------------------------------- FX feature extraction


def test_fx_leaf_modules_registered_with_timm() -> None:
    from timm.models import get_notrace_modules, is_notrace_module

    from transnext.models.transnext import AggregatedAttention, ConvGLU, FullAttention

    assert all(is_notrace_module(m) for m in (AggregatedAttention, FullAttention, ConvGLU))
    assert {AggregatedAttention, FullAttention, ConvGLU} <= set(get_notrace_modules())


def test_timm_fx_features_equal_forward_intermediates() -> None:
    """timm.create_model(..., features_only=True, feature_cls='fx'): the stage maps, NCHW."""
    feats = timm.create_model("transnext_micro", features_only=True, feature_cls="fx", **SMALL).eval()
    full = timm.create_model("transnext_micro", **SMALL).eval()
    loaded = full.load_state_dict({k.removeprefix("graph_module."): v for k, v in feats.state_dict().items()}, strict=False)
    assert set(loaded.missing_keys) == {"head.weight", "head.bias"} and not loaded.unexpected_keys
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        got, ref = feats(x), full.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape) for f in got] == [tuple(f.shape) for f in ref]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
