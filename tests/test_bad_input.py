"""Bad input gets a specific error: what was wrong and what is expected."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import transnext
from transnext.checkpoints import CheckpointError, load_checkpoint, save_state_dict
from transnext.models import TransNeXt

SMALL = dict(img_size=64, embed_dims=(8, 16, 32, 64), num_heads=(1, 2, 4, 8), mlp_ratios=(8, 8, 4, 4),
             depths=(1, 1, 1, 1), num_classes=3)


@pytest.fixture(scope="module")
def model() -> TransNeXt:
    return TransNeXt(**SMALL).eval()


def test_wrong_channel_count(model: TransNeXt) -> None:
    with pytest.raises(ValueError, match=r"expected 3 input channels \(B, 3, H, W\), got 1 \(shape \(2, 1, 64, 64\)\)"):
        model(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"got 64 .*channels-last images need x\.permute\(0, 3, 1, 2\)"):
        model(torch.randn(2, 64, 64, 3))


def test_not_an_image_batch(model: TransNeXt) -> None:
    with pytest.raises(ValueError, match=r"expected a 4-D \(B, C, H, W\) image batch, got shape \(3, 64, 64\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(TypeError, match="expected a torch.Tensor image batch, got ndarray"):
        model(torch.randn(1, 3, 64, 64).numpy())


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_dtype(model: TransNeXt, dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match=rf"expected a floating-point image tensor, got {dtype}; convert with x\.float\(\)"):
        model(torch.zeros(1, 3, 64, 64, dtype=dtype))


def test_image_below_minimum_size(model: TransNeXt) -> None:
    assert model.min_input_size() == 29
    with pytest.raises(ValueError, match=r"input 28x40 is too small: stage 1 feature map 7x10 is smaller than its "
                                         r"sr_ratio 8, so the pooled key grid would be empty; the minimum input is 29x29"):
        model(torch.randn(1, 3, 28, 40))
    with pytest.raises(ValueError, match="input 3x3 is too small"):
        model.forward_intermediates(torch.randn(1, 3, 3, 3))
    model(torch.randn(1, 3, 29, 29))  # the minimum itself runs


def test_fixed_pool_size_larger_than_a_stage_grid() -> None:
    model = TransNeXt(**SMALL, fixed_pool_size=7).eval()
    with pytest.raises(ValueError, match=r"fixed_pool_size=7 is larger than the stage 3 feature map 4x4 \(input 64x64\); "
                                         r"use fixed_pool_size <= 4 or a larger input"):
        model(torch.randn(1, 3, 64, 64))
    model(torch.randn(1, 3, 112, 112))  # stage-3 grid 7x7: fits
    with pytest.raises(ValueError, match="fixed_pool_size must be a positive int or None, got 0"):
        TransNeXt(**SMALL, fixed_pool_size=0)


def test_unknown_variant_suggests_close_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'transnext_tinny'; did you mean 'transnext_tiny'"):
        transnext.create_model("transnext_tinny")
    with pytest.raises(ValueError, match=r"unknown model 'transnext_small\.in22k'.*did you mean 'transnext_small\.in1k'"):
        transnext.create_model("transnext_small.in22k")
    with pytest.raises(ValueError, match="did you mean 'transnext_base'"):
        transnext.get_weights("transnet_base")
    with pytest.raises(TypeError, match="model name must be a str, got int"):
        transnext.create_model(3)


def test_nan_weights_on_load(tmp_path: Path) -> None:
    model = TransNeXt(**SMALL)
    sd = model.state_dict()
    sd["block1.0.attn.temperature"].fill_(float("nan"))
    path = save_state_dict(sd, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=r"nan\.safetensors: non-finite weights \(NaN/Inf\) in 1 tensor\(s\): "
                                              r"block1\.0\.attn\.temperature \[block1\.0\.attn\.temperature: 1 NaN, 0 Inf of 1\]"):
        load_checkpoint(TransNeXt(**SMALL), path)


def test_checkpoint_of_another_variant(tmp_path: Path) -> None:
    other = TransNeXt(**dict(SMALL, embed_dims=(16, 32, 64, 128), num_classes=0))
    path = save_state_dict(other.state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match=r"wide\.safetensors does not fit TransNeXt \(is it a checkpoint of another "
                                              r"variant\?\):.*shape mismatches"):
        load_checkpoint(TransNeXt(**SMALL), path)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match=r"pretrain_size \(32, 32\) gives a \(1, 1\) grid at stage 4; .*pretrain_size >= 64"):
        TransNeXt(**dict(SMALL, img_size=32))
    with pytest.raises(ValueError, match="pos_bias must be one of .*got 'bilinear'"):
        TransNeXt(**SMALL, pos_bias="bilinear")
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        TransNeXt(**SMALL, attn_backend="cuda")
    with pytest.raises(ValueError, match="dim 8 is not divisible by num_heads 3"):
        TransNeXt(**dict(SMALL, num_heads=(3, 2, 4, 8)))


def test_bad_dense_task() -> None:
    from transnext.dense import create_backbone

    with pytest.raises(ValueError, match="unknown dense task 'segformer'; expected one of upernet, "):
        create_backbone("transnext_tiny", task="segformer")
    with pytest.raises(ValueError, match=r"publishes stochastic-depth rates for transnext_tiny, transnext_small, "
                                         r"transnext_base only; pass drop_path_rate= for transnext_micro"):
        create_backbone("transnext_micro", task="upernet")
