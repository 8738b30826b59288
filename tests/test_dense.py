"""Dense-prediction integrations: backbone wrapper, presets, torchvision FPN / detectors, smp."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import transnext
from conftest import fill_deterministic, seeded_randn
from transnext.checkpoints import save_state_dict
from transnext.dense import DENSE_PRESETS, TransNeXtBackbone, TransNeXtFPN, create_backbone
from transnext.models import TransNeXt

SMALL = dict(embed_dims=(8, 16, 32, 64), num_heads=(1, 2, 4, 8), mlp_ratios=(8, 8, 4, 4), depths=(1, 1, 1, 1))


def small_model(**kw) -> TransNeXt:
    model = TransNeXt(img_size=64, num_classes=0, **SMALL, **kw)
    fill_deterministic(model)
    return model.eval()


def test_backbone_returns_stage_maps() -> None:
    ref = small_model()
    backbone = TransNeXtBackbone(small_model()).eval()
    assert backbone.out_channels == [8, 16, 32, 64] and backbone.strides == [4, 8, 16, 32]
    assert [f["num_chs"] for f in backbone.feature_info] == [8, 16, 32, 64]
    x = seeded_randn((2, 3, 96, 128), 0).float()
    with torch.no_grad():
        feats = backbone(x)
        expected = ref.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(2, 8, 24, 32), (2, 16, 12, 16), (2, 32, 6, 8), (2, 64, 3, 4)]
    for a, b in zip(feats, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backbone_subset_prunes_later_stages() -> None:
    backbone = TransNeXtBackbone(small_model(), out_indices=(0, 2), return_dict=True).eval()
    assert not hasattr(backbone.model, "block4") and backbone.out_channels == [8, 32]
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 64))
    assert list(out) == ["0", "1"] and out["1"].shape == (1, 32, 4, 4)


def test_frozen_stages_stay_frozen_and_in_eval_mode() -> None:
    backbone = TransNeXtBackbone(small_model(drop_path_rate=0.2), frozen_stages=1).train()
    assert not any(p.requires_grad for p in backbone.model.block2.parameters())
    assert not any(p.requires_grad for p in backbone.model.patch_embed1.parameters())
    assert all(p.requires_grad for p in backbone.model.block3.parameters())
    assert not backbone.model.block2[0].training and backbone.model.block3[0].training
    sum(f.sum() for f in backbone(torch.randn(1, 3, 64, 64))).backward()
    assert backbone.model.block2[0].attn.q.weight.grad is None and backbone.model.block3[0].attn.q.weight.grad is not None


@pytest.mark.parametrize("task", ["upernet", "mask2former", "mask_rcnn", "dino_4scale", "upernet_extrapolation"])
def test_presets_follow_spec_section_8(task: str) -> None:
    backbone = create_backbone("transnext_tiny", task=task, embed_dims=(24, 48, 96, 192), depths=(1, 1, 2, 1))
    preset = DENSE_PRESETS[task]
    model = backbone.model
    assert model.img_size == (preset.img_size,) * 2 and model.pretrain_size == (224, 224)
    assert model.pos_bias == ("extrapolate" if task == "upernet_extrapolation" else "interpolate")
    expected = {"upernet": 0.4, "upernet_extrapolation": 0.4, "mask_rcnn": 0.4, "mask2former": 0.3, "dino_4scale": 0.3}[task]
    assert model.block4[-1].drop_path.drop_prob == pytest.approx(expected)
    assert backbone.out_indices == ((1, 2, 3) if task == "dino_4scale" else (0, 1, 2, 3))
    assert isinstance(model.head, torch.nn.Identity)
    assert {k: v for k, v in DENSE_PRESETS["dino"].drop_path_rates.items()} == {
        "transnext_tiny": 0.3, "transnext_small": 0.5, "transnext_base": 0.6}
    assert DENSE_PRESETS["mask_rcnn"].drop_path_rates["transnext_base"] == 0.7


def test_create_backbone_loads_classification_checkpoint(tmp_path: Path) -> None:
    cls = transnext.create_model("transnext_micro", num_classes=1000, **SMALL)
    fill_deterministic(cls)
    path = save_state_dict(cls.state_dict(), tmp_path / "cls.safetensors")
    backbone = create_backbone("transnext_micro", task="upernet", drop_path_rate=0.1, checkpoint_path=path, **SMALL)
    assert torch.equal(backbone.model.block3[0].attn.kv.weight, cls.block3[0].attn.kv.weight)
    # Overrides win over the preset.
    assert create_backbone("transnext_micro", task="mask_rcnn", drop_path_rate=0.0, img_size=640, **SMALL).model.img_size == (640, 640)


def test_torchvision_fpn_and_detector() -> None:
    pytest.importorskip("torchvision")
    from torchvision.models.detection import FasterRCNN
    from torchvision.ops import FeaturePyramidNetwork

    backbone = TransNeXtBackbone(small_model(), return_dict=True).eval()
    fpn = FeaturePyramidNetwork(backbone.out_channels, 32).eval()
    with torch.no_grad():
        maps = fpn(backbone(torch.randn(1, 3, 64, 96)))
    assert [tuple(m.shape) for m in maps.values()] == [(1, 32, 16, 24), (1, 32, 8, 12), (1, 32, 4, 6), (1, 32, 2, 3)]

    with_fpn = TransNeXtFPN(TransNeXtBackbone(small_model()), out_channels=32)
    assert with_fpn.out_channels == 32
    detector = FasterRCNN(with_fpn, num_classes=3, min_size=96, max_size=128).eval()
    with torch.no_grad():
        (result,) = detector([torch.rand(3, 90, 120)])
    assert set(result) == {"boxes", "labels", "scores"}


def _smp():
    return pytest.importorskip("segmentation_models_pytorch", reason="segmentation_models_pytorch is not installed (extra: dense)")


def test_smp_through_timm_universal_encoder() -> None:
    smp_ = _smp()
    model = smp_.UPerNet("tu-transnext_micro", encoder_weights=None, classes=4, decoder_channels=32,
                         img_size=512, pretrain_size=224, pos_bias="interpolate", **SMALL).eval()
    assert model.encoder.out_channels == [3, 0, 8, 16, 32, 64]
    assert model.encoder.model.model.pos_bias == "interpolate"
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 4, 64, 96)


def test_smp_native_encoders(tmp_path: Path) -> None:
    smp_ = _smp()
    from transnext.integrations.smp import TransNeXtEncoder, register_encoders

    names = register_encoders()
    assert names == transnext.list_models() and "transnext_tiny" in smp_.encoders.encoders
    encoder = TransNeXtEncoder("transnext_micro", task="upernet", drop_path_rate=0.0, **SMALL)
    assert encoder.out_channels == [3, 0, 8, 16, 32, 64] and encoder.output_stride == 32
    assert encoder.backbone.model.img_size == (512, 512)
    with torch.no_grad():
        feats = encoder(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 3, 64, 64), (2, 0, 32, 32), (2, 8, 16, 16), (2, 16, 8, 8),
                                               (2, 32, 4, 4), (2, 64, 2, 2)]
    # Loading a classification checkpoint into the encoder; one-channel input from pretrained stem.
    cls = transnext.create_model("transnext_micro", **SMALL)
    fill_deterministic(cls)
    encoder.load_checkpoint(str(save_state_dict(cls.state_dict(), tmp_path / "c.safetensors")))
    assert torch.equal(encoder.backbone.model.norm4.weight, cls.norm4.weight)
    encoder.set_in_channels(1, pretrained=True)
    torch.testing.assert_close(encoder.backbone.model.patch_embed1.proj.weight[:, 0], cls.patch_embed1.proj.weight.sum(1))
    assert encoder.out_channels[0] == 1 and encoder(torch.randn(1, 1, 64, 64))[2].shape == (1, 8, 16, 16)
    with pytest.raises(ValueError, match="output_stride=32 only"):
        TransNeXtEncoder("transnext_micro", output_stride=16, **SMALL)
    # Through smp's own factory (the full micro encoder, random weights; model-default settings).
    assert register_encoders(task=None, prefix="plain-")[0] == "plain-transnext_base"
    net = smp_.Unet("plain-transnext_micro", encoder_weights=None, classes=2, in_channels=1).eval()
    assert net.encoder.backbone.model.img_size == (224, 224)
    with torch.no_grad():
        assert net(torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)
