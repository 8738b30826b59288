"""transnext.visualize and ``transnext visualize``: attention weights, ERF, CAM, figures, bad input."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from transnext.cli.main import main
from transnext.data import DataError
from transnext.models.transnext import TransNeXt
from transnext.visualize import (
    area_ratio,
    attention_layer,
    attention_maps,
    effective_receptive_field,
    load_images,
    load_model,
    query_grid,
)

TINY = dict(img_size=64, embed_dims=(8, 16, 32, 64), num_heads=(1, 2, 4, 8), mlp_ratios=(8, 8, 4, 4), depths=(1, 2, 1, 1))


def tiny_model(dtype=torch.float32, **kwargs) -> TransNeXt:
    torch.manual_seed(0)
    model = TransNeXt(**TINY, **kwargs).to(dtype).eval()
    with torch.no_grad():  # move the small learned terms away from their near-zero initialisation
        for name, p in model.named_parameters():
            if any(k in name for k in ("learnable", "relative_pos_bias_local", "query_embedding")):
                p.add_(0.3 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------------------ attention weights
@pytest.mark.parametrize(
    "size,kwargs,stage,block",
    [
        ((64, 64), {}, 0, 0), ((64, 64), {}, 1, 1), ((64, 64), {}, 2, 0), ((72, 100), {}, 1, 1),
        ((72, 100), {"fixed_pool_size": 3}, 0, 0), ((72, 100), {"fixed_pool_size": 3}, 2, 0),
        ((80, 64), {"pos_bias": "interpolate"}, 1, 0),
    ],
    ids=["square-s0", "square-s1b1", "square-s2", "non-square-s1b1", "linear-s0", "linear-s2", "interpolate-s1"],
)
def test_attention_weights_rebuild_layer_output(size, kwargs, stage, block):
    """Layer output = proj(sum (local softmax + learnable term) v_local + sum pooled softmax v_pool), float64."""
    model = tiny_model(torch.float64, **kwargs)
    image = torch.randn(1, 3, *size, dtype=torch.float64)
    attn, _, _ = attention_layer(model, stage, block)
    seen = {}
    handle = attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0][0], out=out[0]))
    model(image)
    handle.remove()

    queries = query_grid(size, 3) + [(0, 0), (size[0] - 1, size[1] - 1), (0, size[1] - 1)]  # corners: padded slots
    maps = attention_maps(model, image, queries, stage, block)
    H, W = model.stage_grids(size)[stage]
    assert maps.grid == (H, W)
    # Values computed here, independently, from the layer's modules and its captured input.
    x = seen["x"]
    N, C = x.shape
    h, d = attn.num_heads, C // attn.num_heads
    v = attn.kv(x).reshape(N, 2, h, d)[:, 1]
    pooled = F.adaptive_avg_pool2d(attn.act(attn.sr(x.t().reshape(1, C, H, W))), maps.pool).flatten(2)[0].t()
    v_pool = attn.kv(attn.norm(pooled)).reshape(-1, 2, h, d)[:, 1]
    for q, (ty, tx) in enumerate(maps.tokens.tolist()):
        weights = maps.local[q] + maps.local_learnable[q]
        mixed = torch.einsum("hp,phd->hd", maps.pooled[q].reshape(h, -1), v_pool)
        for dy in range(3):
            for dx in range(3):
                y, xx = ty + dy - 1, tx + dx - 1
                if 0 <= y < H and 0 <= xx < W:
                    mixed += weights[:, dy, dx, None] * v[y * W + xx]
                else:  # slots outside the map take no weight at all
                    assert maps.local[q, :, dy, dx].abs().max() == 0 and maps.local_learnable[q, :, dy, dx].abs().max() == 0
        torch.testing.assert_close(attn.proj(mixed.reshape(C)), seen["out"][ty * W + tx], rtol=1e-10, atol=1e-12)
    total = maps.local.sum((-2, -1)) + maps.pooled.sum((-2, -1))
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)


def test_attention_maps_project_onto_the_image():
    model = tiny_model(fixed_pool_size=3)
    maps = attention_maps(model, torch.randn(3, 72, 104), [(40, 50)], stage=1)
    assert maps.stride == 8 and maps.grid == (9, 13) and maps.pool == (3, 3)
    assert maps.tokens.tolist() == [[5, 6]]
    fovea, periphery = maps.to_image(maps.fovea_grid()), maps.to_image(maps.periphery_grid())
    assert fovea.shape == periphery.shape == (72, 104)
    # Projection keeps the mass: the image maps sum to the head-mean weights of each part.
    torch.testing.assert_close(fovea.sum().double(), maps.local[0].mean(0).sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(periphery.sum().double(), maps.pooled[0].mean(0).sum(), rtol=1e-6, atol=0)
    # The fovea covers exactly the 3x3 tokens around the query: input pixels [32, 56) x [40, 64).
    nonzero = fovea.nonzero()
    assert (nonzero.min(0).values.tolist(), nonzero.max(0).values.tolist()) == ([32, 40], [55, 63])
    # Adaptive pooling of 9x13 tokens into 3x3 cells: rows [0, 3) [3, 6) [6, 9), columns [0, 5) [4, 9)
    # [8, 13) (overlapping). Tokens [3, 6) x [8, 13) = pixels [24, 48) x [64, 104) hold all of cell
    # (1, 2) and the one shared column (of five) of cell (1, 1).
    w = maps.pooled[0].mean(0)
    torch.testing.assert_close(periphery[24:48, 64:104].sum().double(), w[1, 2] + w[1, 1] / 5, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------ ERF
def test_erf_of_one_3x3_convolution_is_exactly_3x3():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    result = effective_receptive_field(conv, torch.randn(2, 3, 17, 17), stage=None, name="conv3x3")
    support = result.raw.nonzero()
    assert support.shape[0] == 9
    assert (support.min(0).values.tolist(), support.max(0).values.tolist()) == ([7, 7], [9, 9])  # centred at (8, 8)
    assert result.area_ratios[0.99] == pytest.approx(9 / 17**2)


def test_erf_of_a_global_average_covers_the_image():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1))
    result = effective_receptive_field(model, torch.randn(3, 3, 16, 16), stage=None)
    assert (result.raw > 0).all()
    torch.testing.assert_close(result.heat, torch.ones(16, 16, dtype=torch.float64))  # uniform
    # Uniform mass: the smallest centred square with half of it is 13x13 (11x11 = 121 < 128 pixels).
    assert result.area_ratios[0.5] == pytest.approx(169 / 256)
    assert result.area_ratios[0.99] == 1.0


def test_area_ratio_hand_computed():
    heat = torch.zeros(9, 9)
    heat[4, 4] = 1.0
    assert area_ratio(heat, 0.99) == pytest.approx(1 / 81)
    heat[4, 6] = 1.0  # half the mass two columns off the centre: a 5x5 square holds it all
    assert area_ratio(heat, 0.5) == pytest.approx(1 / 81)
    assert area_ratio(heat, 0.8) == pytest.approx(25 / 81)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        area_ratio(heat, 0)


def test_erf_of_transnext_and_timm_models():
    images = load_images(None, 64, 2)
    assert images.pixels.shape == (2, 3, 64, 64) and images.names[0].startswith("demo_00_")
    result = effective_receptive_field(tiny_model(), images, stage=1)
    assert result.stage == 1 and result.heat.max() == 1 and result.raw.sum() > 0
    ratios = list(result.area_ratios.values())
    assert ratios == sorted(ratios) and 0 < ratios[0] and ratios[-1] <= 1
    pytest.importorskip("timm")
    lm = load_model("resnet10t")
    r = effective_receptive_field(lm.model, images, stage=-1, name=lm.name, mean=lm.mean, std=lm.std)
    assert r.name == "resnet10t" and r.raw.sum() > 0


# ------------------------------------------------------------------------------------ bad input
def test_bad_layer_index_names_the_valid_range():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"stage 4 is out of range: the model has 4 stages, valid: 0\.\.3"):
        attention_maps(model, torch.randn(3, 64, 64), [(0, 0)], stage=4)
    with pytest.raises(ValueError, match=r"stage 3 uses full attention .* aggregated attention is in stages 0\.\.2"):
        attention_maps(model, torch.randn(3, 64, 64), [(0, 0)], stage=3)
    with pytest.raises(ValueError, match=r"block 2 is out of range for stage 1: it has 2 blocks, valid: 0\.\.1"):
        attention_maps(model, torch.randn(3, 64, 64), [(0, 0)], stage=1, block=2)
    with pytest.raises(ValueError, match=r"stage -5 is out of range for TransNeXt: it has 4 stages, valid: 0\.\.3"):
        effective_receptive_field(model, torch.randn(1, 3, 64, 64), stage=-5)


def test_query_outside_the_image_names_the_valid_range():
    with pytest.raises(ValueError, match=r"query pixel \(y=64, x=3\) is outside the 64x80 image: y must be in 0\.\.63, x in 0\.\.79"):
        attention_maps(tiny_model(), torch.randn(3, 64, 80), [(10, 10), (64, 3)])


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'transnext_tinyy'.*transnext_tiny"):
        load_model("transnext_tinyy")


def test_empty_image_folder(tmp_path):
    with pytest.raises(DataError, match="no image files in folder"):
        load_images(tmp_path, 64)


def test_image_folder_is_read_and_resized(tmp_path):
    from transnext.data import write_demo_images

    write_demo_images(tmp_path, n=3)
    images = load_images(tmp_path, (40, 48), limit=2)
    assert images.pixels.shape == (2, 3, 40, 48) and images.names == ["00_bear", "01_bird"]
    assert 0 <= images.pixels.min() and images.pixels.max() <= 1 and images.pixels.max() > 0.9  # white silhouettes


# ------------------------------------------------------------------------------------------ CAM
def test_cam_reshape_and_grad_cam_by_hand():
    pytest.importorskip("pytorch_grad_cam")
    from transnext.visualize.cam import class_activation_maps, token_reshape

    model = tiny_model(num_classes=5)
    x = torch.randn(2, 3, 64, 96)
    # The reshape lays tokens out as the model's own NCHW stage maps.
    seen = {}
    handle = model.norm3.register_forward_hook(lambda m, a, out: seen.update(tokens=out))
    fmap = model.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
    handle.remove()
    torch.testing.assert_close(token_reshape(model.stage_grids((64, 96))[2])(seen["tokens"]), fmap)

    results = class_activation_maps(model, x, ["gradcam", "eigencam"], stage=2, targets=[1, 3], topk=2)
    # Grad-CAM by hand: ReLU(sum_c mean(dy/dA_c) A_c), min-max scaled, resized bilinearly to the input.
    fmap = model.forward_intermediates(x, indices=[2], intermediates_only=True)[0].detach().requires_grad_(True)
    logits = model.forward_head(_run_from_stage(model, fmap, 3))
    grads = torch.autograd.grad(logits[0, 1] + logits[1, 3], fmap)[0]
    cam = F.relu((grads.mean((2, 3), keepdim=True) * fmap).sum(1, keepdim=True)).detach()
    cam = cam - cam.amin((2, 3), keepdim=True)
    cam = cam / (1e-7 + cam.amax((2, 3), keepdim=True))
    cam = F.interpolate(cam, size=(64, 96), mode="bilinear", align_corners=False)[:, 0]
    cam = cam - cam.amin((1, 2), keepdim=True)
    cam = cam / (1e-7 + cam.amax((1, 2), keepdim=True))
    for i, target in enumerate((1, 3)):
        assert results[i].target == target and len(results[i].topk) == 2
        torch.testing.assert_close(results[i].maps["gradcam"], cam[i], rtol=0, atol=2e-3)
        assert results[i].maps["eigencam"].shape == (64, 96)
    probs = model(x).softmax(-1)
    assert results[0].topk[0][0] == int(probs[0].argmax())
    with pytest.raises(ValueError, match=r"target class\(es\) \[5\] out of range: valid 0\.\.4"):
        class_activation_maps(model, x, ["gradcam"], targets=[0, 5])
    with pytest.raises(ValueError, match=r"stage 4 is out of range for the model: it has 4 stages, valid: 0\.\.3"):
        class_activation_maps(model, x, ["gradcam"], stage=4)


def _run_from_stage(model: TransNeXt, fmap: torch.Tensor, start: int) -> torch.Tensor:
    """Stages ``start``.. of the model on a (B, C, H, W) map: the last stage's map."""
    x = fmap
    for i in range(start, model.num_stages):
        x, _, _ = model._run_stage(i, x)
    return x


# ------------------------------------------------------------------------------- figures and CLI
def test_figures_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from transnext.visualize.plot import plot_attention, plot_erf

    model = tiny_model()
    images = load_images(None, 64, 2)
    r = effective_receptive_field(model, images, stage=-1, name="tiny")
    assert plot_erf([r, r], tmp_path / "erf.png").stat().st_size > 1000
    maps = attention_maps(model, images.normalized()[0], [(30, 30)], stage=1)
    assert plot_attention(images.pixels[0], maps, tmp_path / "one.png").stat().st_size > 1000
    maps = attention_maps(model, images.normalized()[0], query_grid((64, 64), 2), stage=0)
    assert plot_attention(images.pixels[0], maps, tmp_path / "grid.png").stat().st_size > 1000


def test_cli_attention_and_its_errors(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "att.png"
    argv = ["visualize", "attention", "--model", "transnext_micro", "--img-size", "64", "--out", str(out)]
    assert main(argv + ["--query", "10", "20", "--fixed-pool-size", "2", "--stage", "1"]) == 0
    assert out.stat().st_size > 1000
    assert "query (10, 20) -> token (1, 2)" in capsys.readouterr().out
    assert main(argv + ["--query", "64", "0"]) == 1
    assert "y must be in 0..63, x in 0..63" in capsys.readouterr().err
    assert main(argv + ["--block", "9"]) == 1
    assert "valid: 0..1" in capsys.readouterr().err


def test_cli_erf_two_models_one_figure(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("timm")
    out = tmp_path / "erf.png"
    argv = ["visualize", "erf", "--models", "transnext_micro", "resnet10t", "--img-size", "64", "--num-images", "2", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "transnext_micro" in text and "resnet10t" in text and out.stat().st_size > 1000
    assert main(argv[:3] + ["not_a_model"] + argv[4:]) == 1
    assert "unknown model 'not_a_model'" in capsys.readouterr().err
    assert main(argv + ["--images", str(tmp_path / "empty")]) == 1  # a missing folder
    (tmp_path / "empty").mkdir()
    assert main(argv + ["--images", str(tmp_path / "empty")]) == 1
    assert "no image files in folder" in capsys.readouterr().err


def test_without_the_extra_the_command_names_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["visualize", "erf"]) == 1
    assert "pip install 'transnext-pytorch[visualize]'" in capsys.readouterr().err


def test_cli_cam(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("pytorch_grad_cam")
    out = tmp_path / "cam.png"
    argv = ["visualize", "cam", "--model", "transnext_micro", "--num-classes", "4", "--img-size", "64", "--num-images", "1",
            "--methods", "gradcam", "eigencam", "--topk", "2", "--out", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("demo_00_bear: class_") and lines[1] == f"wrote {out}"
    assert out.stat().st_size > 1000
    assert main(argv + ["--methods", "nope"]) == 1
    assert "unknown CAM method(s) ['nope']" in capsys.readouterr().err
