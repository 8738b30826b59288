"""Model behaviour beyond the golden cases: any input size, bias modes, caches, timm-style API."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import transnext
from conftest import fill_deterministic, seeded_randn
from transnext import ops
from transnext.models import TransNeXt


def tiny_config(**kw) -> TransNeXt:
    cfg = dict(
        img_size=64, embed_dims=(8, 16, 32, 64), num_heads=(1, 2, 4, 8), mlp_ratios=(8, 8, 4, 4),
        depths=(1, 1, 1, 1), sr_ratios=(8, 4, 2, 1), num_classes=5,
    )
    cfg.update(kw)
    model = TransNeXt(**cfg)
    fill_deterministic(model)
    return model.double().eval()


@pytest.mark.parametrize("size", [(64, 64), (61, 97), (33, 29), (128, 45), (29, 29)])
@pytest.mark.parametrize("pos_bias", ["extrapolate", "interpolate"])
def test_any_input_size(size, pos_bias) -> None:
    model = tiny_config(pos_bias=pos_bias)
    x = seeded_randn((2, 3, *size), 0)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert [tuple(f.shape[-2:]) for f in feats] == model.stage_grids(size)
    # Batch elements are independent (no cross-talk through cached tables).
    with torch.no_grad():
        assert torch.allclose(model(x[1:]), logits[1:], rtol=1e-10, atol=1e-12)


def test_modes_agree_at_construction_size() -> None:
    """At img_size the interpolation is the identity, so both modes agree (up to the float32 rounding
    of ln(N) that the interpolating dense reference applies in the full-attention stage)."""
    a = tiny_config(pos_bias="extrapolate")
    b = tiny_config(pos_bias="interpolate")
    x = seeded_randn((1, 3, 64, 64), 1)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-8, atol=1e-10)
        # ... and differ elsewhere.
        y = seeded_randn((1, 3, 96, 128), 2)
        assert not torch.allclose(a(y), b(y))


def test_interpolated_bias_is_bilinear_resize_of_trained_grid() -> None:
    model = tiny_config(pos_bias="interpolate")
    attn = model.block1[0].attn
    geom = model.stage_geometry(0, (24, 32))
    with torch.no_grad():
        bias = attn.position_bias(geom, torch.float64, torch.device("cpu"))
        trained = model.stage_geometry(0, (16, 16))  # img_size 64 -> stage-1 grid 16x16, pool 2x2
        full = attn.position_bias(trained, torch.float64, torch.device("cpu"))  # (h, 256, 4)
        h = full.shape[0]
        step1 = F.interpolate(full.reshape(h, 256, 2, 2), size=(3, 4), mode="bilinear", align_corners=False)
        step2 = F.interpolate(step1.reshape(h, 16, 16, 12).permute(0, 3, 1, 2), size=(24, 32), mode="bilinear")
        expected = step2.reshape(h, 12, 24 * 32).transpose(1, 2)
    torch.testing.assert_close(bias, expected, rtol=0, atol=1e-14)


def test_linear_mode_fixed_pool() -> None:
    model = tiny_config(fixed_pool_size=2)
    geom = model.stage_geometry(0, (16, 24))
    assert geom.pool == (2, 2)
    assert geom.length_scale(torch.float64, torch.device("cpu")).max().item() == pytest.approx(torch.log(torch.tensor(9.0 + 4)).item())
    assert model.stage_geometry(3, (2, 3)).pool is None  # full attention ignores the pool size
    x = seeded_randn((1, 3, 64, 96), 3)
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all()
    model.set_pos_bias(fixed_pool_size=3)
    assert torch.isfinite(model(x)).all()
    with pytest.raises(ValueError, match=r"fixed_pool_size=3 is larger than the stage 3 feature map 2x2 \(input 29x29\)"):
        model(seeded_randn((1, 3, 29, 29), 3))


def test_linear_mode_key_count_independent_of_size() -> None:
    model = tiny_config(fixed_pool_size=2)
    for size in [(64, 64), (96, 160), (200, 120)]:
        g = model.stage_geometry(0, model.stage_grids(size)[0])
        assert g.num_keys == 4


def test_bias_cache_never_stale_in_training() -> None:
    model = tiny_config().float().train()
    x = torch.randn(2, 3, 64, 64)
    attn = model.block1[0].attn
    geom = model.stage_geometry(0, (16, 16))
    before = attn.position_bias(geom, torch.float32, torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).logsumexp(-1).sum().backward()
    assert attn.cpb_fc1.weight.grad is not None and attn.cpb_fc1.weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        after = attn.position_bias(geom, torch.float32, torch.device("cpu"))
    assert not torch.allclose(before, after)


def test_bias_cache_follows_weight_updates_at_inference() -> None:
    model = tiny_config()
    x = seeded_randn((1, 3, 64, 64), 4)
    with torch.no_grad():
        first = model(x)
        again = model(x)
        assert torch.equal(first, again)
        for m in model.modules():
            if hasattr(m, "cpb_fc2"):
                m.cpb_fc2.bias.add_(torch.linspace(0, 1, m.cpb_fc2.bias.numel(), dtype=torch.float64))
        changed = model(x)
    assert not torch.allclose(first, changed)
    fresh = tiny_config()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), changed, rtol=0, atol=0)


def test_float32_and_float64_agree() -> None:
    model = tiny_config()
    x = seeded_randn((1, 3, 61, 77), 5)
    with torch.no_grad():
        ref = model(x)
        out = model.float()(x.float())
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_forward_intermediates_indices_and_formats() -> None:
    model = tiny_config()
    x = seeded_randn((1, 3, 64, 64), 6)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        assert len(feats) == 4 and final.shape == (1, 64, 2, 2)  # the unpooled last map, as forward_features
        torch.testing.assert_close(final, model.forward_features(x))
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [f.shape[1] for f in last2] == [32, 64]
        sel = model.forward_intermediates(x, indices=(0, -1), intermediates_only=True, output_fmt="NHWC")
        assert sel[0].shape == (1, 16, 16, 8) and sel[1].shape == (1, 2, 2, 64)
        torch.testing.assert_close(sel[0].permute(0, 3, 1, 2), feats[0])
        # The head on the final map equals forward; tokens (B, N, C) are pooled the same way.
        torch.testing.assert_close(model.forward_head(final), model(x))
        torch.testing.assert_close(model.forward_head(final.flatten(2).transpose(1, 2)), model(x))
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=(4,))


def test_prune_and_reset_classifier() -> None:
    model = tiny_config()
    x = seeded_randn((1, 3, 64, 64), 7)
    with torch.no_grad():
        feats = model.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
    kept = model.prune_intermediate_layers((0, 1))
    assert kept == [0, 1] and not hasattr(model, "block3") and isinstance(model.head, torch.nn.Identity)
    with torch.no_grad():
        again = model.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
    for a, b in zip(feats, again):
        torch.testing.assert_close(a, b)

    model.reset_classifier(3, "avg")  # head on the width of the last kept stage
    assert model(x).shape == (1, 3) and model.num_features == 16

    model = tiny_config()
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model.get_classifier().weight.dtype == torch.float64
    assert model(x).shape == (1, 3)
    model.reset_classifier(0)
    assert model(x).shape == (1, 64)


def test_pre_logits_and_no_weight_decay() -> None:
    model = tiny_config()
    x = seeded_randn((2, 3, 64, 64), 8)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 64)
    nwd = model.no_weight_decay()
    assert "block1.0.attn.query_embedding" in nwd and "block1.0.attn.temperature" in nwd
    assert "block1.0.attn.cpb_fc1.weight" in nwd and "block1.0.attn.relative_pos_bias_local" in nwd
    assert "block1.0.attn.learnable_tokens" not in nwd and "block1.0.attn.q.weight" not in nwd
    groups = transnext.models.param_groups_weight_decay(model, 0.05)
    no_decay = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert "block1.0.attn.learnable_bias" not in names  # 3-D: decayed (docs/model.md section 6)
    assert "block1.0.norm1.weight" in names and "head.bias" in names


def test_gradient_checkpointing_same_gradients() -> None:
    model = tiny_config().train()
    x = seeded_randn((1, 3, 64, 64), 9)
    model(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-10, atol=1e-14)


def test_initialisation_follows_spec() -> None:
    torch.manual_seed(0)
    model = transnext.create_model("transnext_micro", num_classes=10)
    attn = model.block1[0].attn
    assert torch.allclose(F.softplus(attn.temperature), torch.full_like(attn.temperature, 1 / 0.24))
    assert attn.learnable_bias.abs().max() == 0 and attn.q.bias.abs().max() == 0
    assert attn.relative_pos_bias_local.std().item() < 1e-3
    assert 0.015 < model.block3[0].mlp.fc1.weight.std().item() < 0.025
    conv = model.patch_embed1.proj
    assert conv.weight.std().item() == pytest.approx((2 / (7 * 7 * 48)) ** 0.5, rel=0.1)
    assert torch.equal(model.norm1.weight, torch.ones(48))


def test_drop_path_schedule() -> None:
    model = transnext.create_model("transnext_micro", drop_path_rate=0.15)
    rates = [b.drop_path.drop_prob for i in range(1, 5) for b in getattr(model, f"block{i}")]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.15) and rates == sorted(rates)


def test_constructs_on_meta_device() -> None:
    with torch.device("meta"):
        model = transnext.create_model("transnext_tiny", drop_path_rate=0.25)
    assert model.head.weight.is_meta and model.block4[1].drop_path.drop_prob == pytest.approx(0.25)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_training_forward_and_backward_on_meta_device(backend: str) -> None:
    # Shape-only passes (FLOP counters, memory planners) run the training path on meta tensors,
    # where autocast does not exist.
    with torch.device("meta"):
        model = transnext.create_model("transnext_micro", num_classes=7, attn_backend=backend)
        model.train()
        x = torch.randn(2, 3, 64, 96, requires_grad=True)
    out = model(x)
    assert out.is_meta and out.shape == (2, 7)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_pretrained_cfg_is_a_timm_style_dict() -> None:
    model = transnext.create_model("transnext_small.in1k_384")
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 384, 384) and cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic"
    assert cfg["hf_hub_id"] == "DaiShiResearch/transnext-small-384-1k-ft-1k"
    assert model.weights.top1 == 86.0 and model.pretrain_size == (224, 224) and model.img_size == (384, 384)


def _clear_bias_caches(model) -> None:
    for m in model.modules():
        if hasattr(m, "_bias_cache"):
            m._bias_cache.clear()


@pytest.mark.parametrize("pos_bias", ["extrapolate", "interpolate"])
def test_blockwise_full_attention_bias_rows_equal_materialised(pos_bias, monkeypatch) -> None:
    from transnext.models.position_bias import BlockwiseBias

    model = tiny_config(pos_bias=pos_bias)
    attn = model.block4[0].attn
    geom = model.stage_geometry(3, (7, 5))  # 35 queries, non-square
    cpu = torch.device("cpu")
    with torch.no_grad():
        full = attn.position_bias(geom, torch.float64, cpu)
        assert isinstance(full, torch.Tensor) and full.shape == (8, 35, 35)
        _clear_bias_caches(model)
        with ops.policy(full_bias_bytes=0):
            lazy = attn.position_bias(geom, torch.float64, cpu)
    assert isinstance(lazy, BlockwiseBias) and lazy.shape == full.shape
    assert lazy.table.numel() < full.numel() // 2
    torch.testing.assert_close(lazy.materialize(), full, rtol=1e-12, atol=1e-14)
    for start, stop in [(0, 5), (3, 12), (10, 11), (33, 40), (5, 15)]:  # whole rows, partial rows, past the end
        expected = full[:, start:stop]
        torch.testing.assert_close(lazy.rows(start, stop), expected, rtol=1e-12, atol=1e-14)
        buf = torch.full((8, 2, *expected.shape[1:]), float("nan"), dtype=torch.float64)
        lazy.rows(start, stop, out=buf[:, 1])  # written in place, rows of a strided buffer
        torch.testing.assert_close(buf[:, 1], expected, rtol=1e-12, atol=1e-14)
        assert buf[:, 0].isnan().all()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("pos_bias", ["extrapolate", "interpolate"])
def test_model_with_blockwise_bias_equals_materialised(backend, pos_bias, monkeypatch) -> None:
    """Large grids keep only the small bias tables; outputs and gradients do not change."""
    model = tiny_config(pos_bias=pos_bias, attn_backend=backend)
    x = seeded_randn((2, 3, 224, 160), 3)  # stage 4: 7 x 5 tokens

    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _clear_bias_caches(model)
        model.zero_grad()
        with torch.no_grad():
            out = model(x)
        model.train()
        (model(x) ** 2).sum().backward()
        model.eval()
        return out, model.block4[0].attn.cpb_fc1.weight.grad.clone(), model.block4[0].attn.temperature.grad.clone()

    expected = run()
    # Blocks of 12 query rows: two whole grid rows of 5 after rounding, then a partial last block.
    with ops.policy(full_bias_bytes=0, full_attention_block_bytes=8 * 2 * 8 * 35 * 12):
        got = run()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_resolution_plan_is_validated_and_one_source() -> None:
    """set_pos_bias rebuilds a validated plan (a bad fixed_pool_size is refused, as in the constructor)."""
    model = tiny_config()
    with pytest.raises(ValueError, match="fixed_pool_size must be a positive int"):
        model.set_pos_bias(fixed_pool_size=0)
    with pytest.raises(ValueError, match="pos_bias must be one of"):
        model.set_pos_bias("nearest")
    assert model.fixed_pool_size is None and model.pos_bias == "extrapolate"  # unchanged after the errors
    model.set_pos_bias("interpolate", fixed_pool_size=2)
    assert (model.pos_bias, model.fixed_pool_size) == ("interpolate", 2) == (model.plan.pos_bias, model.plan.fixed_pool_size)
    assert model.stage_geometry(0, (16, 16)).pool == (2, 2)
    with pytest.raises(ValueError, match=r"fixed_pool_size=2 is larger than the stage 3 feature map 1x1 \(input 16x16\)"):
        model.check_input_size((16, 16))
