"""Public API: complexity versus docs/model.md section 1, timm-style methods, torch.hub entry points."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import transnext
from conftest import fill_deterministic, seeded_randn
from transnext.integrations.flops import measure
from transnext.models import TransNeXt

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(img_size=64, embed_dims=(8, 16, 32, 64), num_heads=(1, 2, 4, 8), mlp_ratios=(8, 8, 4, 4), depths=(1, 1, 1, 1))

# docs/model.md section 1 (224; micro_AAAA 256) and the 384 fine-tunes: (params M, GFLOPs).
PUBLISHED = {
    "transnext_micro.in1k": (12.8, 2.7),
    "transnext_tiny.in1k": (28.2, 5.7),
    "transnext_small.in1k": (49.7, 10.3),
    "transnext_base.in1k": (89.7, 18.4),
    "transnext_micro_aaaa.in1k": (13.1, 3.3),
    "transnext_small.in1k_384": (49.7, 32.1),
    "transnext_base.in1k_384": (89.7, 56.3),
}


@pytest.mark.parametrize(
    "name",
    [n if "384" not in n else pytest.param(n, marks=pytest.mark.slow) for n in PUBLISHED],
)
def test_params_and_gflops_match_spec(name: str) -> None:
    """Multiply-adds counted with torch.utils.flop_counter (2 FLOPs per multiply-add, halved).

    The published numbers include the position-bias MLP (evaluated in every forward pass of the
    reference) and the local window attention as matrix products; element-wise work is not
    counted. Without the bias MLP the count is 2.5-6 % lower (micro: 2.53 vs 2.7).
    """
    params_m, gflops = PUBLISHED[name]
    w = transnext.get_weights(name)
    assert (w.params_m, w.gflops) == (params_m, gflops)  # the records the CLI and docs show
    c = measure(w.variant, img_size=w.img_size, pretrain_size=w.pretrain_size)
    assert c.input_size == (w.img_size, w.img_size)
    assert c.params_m == pytest.approx(params_m, rel=0.02)
    assert c.gflops == pytest.approx(gflops, rel=0.02)


def test_measure_cached_inference_excludes_bias_mlp() -> None:
    model = TransNeXt(**SMALL, num_classes=3)
    with_bias = measure(model, 64)
    cached = measure(model, 64, include_position_bias=False)
    assert cached.macs < with_bias.macs and cached.params == with_bias.params == sum(p.numel() for p in model.parameters())
    # The model itself is untouched by measuring (a meta copy is counted).
    assert next(model.parameters()).device.type == "cpu" and model.block1[0].attn.attn_backend is None


def test_reset_classifier_and_get_classifier() -> None:
    model = TransNeXt(**SMALL, num_classes=3).double().eval()
    fill_deterministic(model)
    x = seeded_randn((2, 3, 64, 64), 0)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(7)
    head = model.get_classifier()
    assert isinstance(head, torch.nn.Linear) and (head.in_features, head.out_features) == (64, 7)
    assert head.weight.dtype == torch.float64 and model.num_classes == 7 and model.global_pool == "avg"
    with torch.no_grad():
        torch.testing.assert_close(model(x), head(pooled))
    model.reset_classifier(0, global_pool="")
    with torch.no_grad():
        assert model(x).shape == (2, 64, 2, 2)  # the unpooled last-stage map (timm convention)
    with pytest.raises(ValueError, match="global_pool must be 'avg' or ''"):
        model.reset_classifier(3, global_pool="max")


def test_forward_intermediates_stop_early_and_prune() -> None:
    model = TransNeXt(**SMALL, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x, indices=(0, 1), stop_early=True)
        assert final.shape == (1, 16, 8, 12) and [f.shape[1] for f in feats] == [8, 16]
        assert model.prune_intermediate_layers(indices=2) == [2, 3]  # the last two: nothing to prune
        assert hasattr(model, "block4") and isinstance(model.head, torch.nn.Identity)
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    assert [i["module"] for i in model.feature_info] == ["out1", "out2", "out3", "out4"]  # the NCHW stage maps


def test_no_weight_decay_keywords_follow_spec() -> None:
    model = TransNeXt(**SMALL, num_classes=3)
    assert model.no_weight_decay_keywords() == {"query_embedding", "relative_pos_bias_local", "cpb", "temperature"}
    names = model.no_weight_decay()
    assert all(any(k in n for k in model.no_weight_decay_keywords()) for n in names)
    assert "block4.0.attn.cpb_fc2.bias" in names and "block4.0.attn.qkv.weight" not in names


def test_grad_checkpointing_flag() -> None:
    model = TransNeXt(**SMALL, num_classes=3).train()
    model.set_grad_checkpointing()
    assert model.grad_checkpointing
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and model.block1[0].attn.cpb_fc1.weight.grad is not None
    model.set_grad_checkpointing(False)
    assert not model.grad_checkpointing


def test_torch_hub_entry_points() -> None:
    model = torch.hub.load(str(REPO), "transnext_small_384", source="local", num_classes=5,
                           embed_dims=(8, 16, 32, 64), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1))
    assert isinstance(model, torch.nn.Module) and type(model).__name__ == "TransNeXt"
    assert model.img_size == (384, 384) and model.pretrain_size == (224, 224) and model.head.out_features == 5
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = sorted(n for n in dir(hubconf) if n.startswith("transnext_") and callable(getattr(hubconf, n)))
    assert entries == sorted(transnext.list_models() + ["transnext_base_384", "transnext_small_384"])
    assert hubconf.dependencies == ["torch"]


def test_variant_kwargs_is_the_one_name_to_architecture_rule() -> None:
    from transnext.models import variant_kwargs

    # Published table (docs/model.md section 1) and the 384 fine-tune geometry, written out by hand.
    assert variant_kwargs("transnext_small_384") == dict(
        embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24), depths=(5, 5, 22, 5), sr_ratios=(8, 4, 2, 1),
        window_size=(3, 3, 3, None), mlp_ratios=(8, 8, 4, 4), qkv_bias=True, img_size=384, pretrain_size=224,
    )
    aaaa = variant_kwargs("transnext_micro_AAAA", img_size=None, pretrain_size=None, num_classes=3, fixed_pool_size=None)
    assert (aaaa["img_size"], aaaa["pretrain_size"], aaaa["sr_ratios"]) == (256, 256, (16, 8, 4, 2))
    assert aaaa["num_classes"] == 3 and aaaa["fixed_pool_size"] is None  # other Nones are real values
    assert variant_kwargs("transnext_tiny", img_size=320, depths=(1, 1, 1, 1))["depths"] == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="unknown model 'transnext_tiny.in22k'"):
        variant_kwargs("transnext_tiny.in22k")


def test_create_model_timm_and_hub_build_the_same_model() -> None:
    pytest.importorskip("timm")
    import timm

    from transnext.models import build_variant

    narrow = dict(embed_dims=(8, 16, 32, 64), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1))
    ours = transnext.create_model("transnext_base.in1k_384", num_classes=4, **narrow)
    via_timm = timm.create_model("transnext_base.in1k_384", num_classes=4, **narrow)
    via_hub = torch.hub.load(str(REPO), "transnext_base_384", source="local", num_classes=4, **narrow)
    bare = build_variant("transnext_base.in1k_384", num_classes=4, **narrow)
    for m in (via_timm, via_hub, bare):
        assert (m.img_size, m.pretrain_size, m.sr_ratios) == ((384, 384), (224, 224), (8, 4, 2, 1))
        assert [(k, v.shape) for k, v in m.state_dict().items()] == [(k, v.shape) for k, v in ours.state_dict().items()]


def test_weights_transforms_is_the_published_eval_transform() -> None:
    pytest.importorskip("timm")
    from PIL import Image

    def image(h: int, w: int) -> tuple[Image.Image, torch.Tensor]:
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rgb = torch.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).to(torch.uint8)
        return Image.fromarray(rgb.numpy()), rgb.permute(2, 0, 1).float() / 255

    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    # 224 weights: short side to 224 / 0.875 = 256 (a 256 x 300 image keeps its size), centre crop 224.
    img, px = image(256, 300)
    out = transnext.get_weights("transnext_tiny").transforms()(img)
    expected = (px[:, 16:240, 38:262] - mean) / std
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # 384 fine-tunes: straight to 384 x 384, nothing cropped (a 384 x 384 image is untouched).
    img, px = image(384, 384)
    out = transnext.get_weights("transnext_small.in1k_384").transforms()(img)
    torch.testing.assert_close(out, (px - mean) / std, atol=1e-5, rtol=0)
    assert transnext.get_weights("transnext_base.in1k_384").transforms()(image(200, 500)[0]).shape == (3, 384, 384)


def test_fx_tracer_kwargs_name_the_leaf_modules() -> None:
    from transnext.integrations.fx import FX_LEAF_MODULES, fx_tracer_kwargs
    from transnext.models.geometry import GeometryTables
    from transnext.models.transnext import AggregatedAttention, ConvGLU, FullAttention

    assert set(FX_LEAF_MODULES) == {AggregatedAttention, FullAttention, ConvGLU, GeometryTables}
    assert fx_tracer_kwargs() == {"leaf_modules": [AggregatedAttention, FullAttention, ConvGLU, GeometryTables]}


def test_torchvision_fx_feature_extractor_traces_any_size() -> None:
    pytest.importorskip("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    from transnext.integrations.fx import fx_tracer_kwargs

    model = TransNeXt(**SMALL, num_classes=3).eval()
    _, nodes = get_graph_node_names(model, tracer_kwargs=fx_tracer_kwargs())
    extractor = create_feature_extractor(model, return_nodes={nodes[-1]: "logits"}, tracer_kwargs=fx_tracer_kwargs())
    for size in ((64, 64), (96, 80)):  # the traced graph serves other sizes too
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert torch.equal(extractor(x)["logits"], model(x))
