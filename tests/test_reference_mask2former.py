"""Our Mask2Former head gives mmdet 3.3's ``Mask2FormerHead`` outputs, losses and matches on the same weights.

The data (tests/data/reference_mask2former, see its README.md) was made by mmdet's own head (with
mmcv's pure-PyTorch deformable attention and point sampler) on a tiny configuration with seeded
random weights. Forward passes are compared in float64, the losses in float32 (the reference's
point sampler works in float32), with the reference's random points injected.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from transnext.checkpoints import CheckpointError
from transnext.dense import load_reference_checkpoint
from transnext.dense.mask2former import (
    Mask2FormerHead,
    Mask2FormerLoss,
    convert_mmdet_mask2former,
    mask2former_transnext,
    semantic_inference,
)

pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

DATA = Path(__file__).parent / "data" / "reference_mask2former"
HEAD_FILE = DATA / "mask2former_head.safetensors"
TINY = dict(feat_channels=32, out_channels=32, num_queries=6, encoder_layers=2, encoder_ffn_dims=64, decoder_layers=3,
            decoder_ffn_dims=64, num_heads=4, num_points=4, num_groups=8)
IN_CHANNELS = [16, 24, 32, 40]
F64_TOL = 1e-12  # observed: <= 1e-14 (operation order only)
F32_TOL = 2e-6  # losses of size ~4 in float32: a few ulp


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "outputs.safetensors"))


@pytest.fixture(scope="module")
def config() -> dict:
    with safe_open(str(DATA / "outputs.safetensors"), "pt") as f:
        return json.loads(f.metadata()["config"])


@pytest.fixture(scope="module")
def head() -> Mask2FormerHead:
    sd = {k[len("decode_head."):]: v.double() for k, v in load_file(str(HEAD_FILE)).items()}
    model = Mask2FormerHead(IN_CHANNELS, 4, **TINY)
    model.load_state_dict(sd, strict=True)
    return model.double().eval()


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != reference {tuple(b.shape)}"
    return (a.double() - b.double()).abs().max().item()


def _feats(ref: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [ref[f"feat{i}"] for i in range(4)]


def test_pixel_decoder_and_its_encoder_layer_match_mmdet_in_float64(head, ref) -> None:
    with torch.no_grad():
        mask_feature, memories = head.pixel_decoder(_feats(ref))
        layer = head.pixel_decoder.encoder.layers[0]
        enc = layer(ref["enc0_query"], ref["enc0_query_pos"], ref["enc0_reference_points"], [(2, 3), (4, 6), (8, 12)])
    errs = {"mask_feature": _err(mask_feature, ref["mask_feature"]), "encoder_layer0": _err(enc, ref["enc0_out"])}
    errs.update({f"memory{i}": _err(m, ref[f"memory{i}"]) for i, m in enumerate(memories)})
    assert max(errs.values()) < F64_TOL, errs
    # the memories are coarsest first: strides 32, 16, 8 of the 60 x 92 image
    assert [tuple(m.shape[-2:]) for m in memories] == [(2, 3), (4, 6), (8, 12)]


def test_decoder_layers_with_masked_attention_match_mmdet_in_float64(head, ref) -> None:
    errs = {}
    with torch.no_grad():
        for i in (0, 1):
            n = f"dec{i}"
            mask = ref[f"{n}_cross_attn_mask"].bool()
            out = head.transformer_decoder.layers[i](ref[f"{n}_query"], ref[f"{n}_key"], ref[f"{n}_query_pos"], ref[f"{n}_key_pos"], mask)
            errs[n] = _err(out, ref[f"{n}_out"])
    assert max(errs.values()) < F64_TOL, errs
    # the reference masks do mask something (else the masking would go untested)
    assert ref["dec1_cross_attn_mask"].bool().any() and not ref["dec1_cross_attn_mask"].bool().all()


def test_head_outputs_of_every_decoder_layer_and_semantic_inference_match(head, ref) -> None:
    with torch.no_grad():
        all_cls, all_masks = head(_feats(ref))
        seg = semantic_inference(all_cls[-1], all_masks[-1], (60, 92))
    assert len(all_cls) == len(all_masks) == TINY["decoder_layers"] + 1
    errs = {f"cls{i}": _err(c, ref[f"cls{i}"]) for i, c in enumerate(all_cls)}
    errs.update({f"masks{i}": _err(m, ref[f"masks{i}"]) for i, m in enumerate(all_masks)})
    errs["seg_logits"] = _err(seg, ref["seg_logits"])
    assert max(errs.values()) < F64_TOL, errs


class _Replay:
    """The reference's uniform draws, in the order it made them."""

    def __init__(self, ref: dict[str, torch.Tensor], n: int, start: int = 0) -> None:
        self.points = [ref[f"points{i}"] for i in range(n)]
        self.i = start

    def __call__(self, *shape: int, device: torch.device | None = None) -> torch.Tensor:
        t = self.points[self.i]
        assert tuple(t.shape) == tuple(shape), f"draw {self.i}: reference shape {tuple(t.shape)}, ours {shape}"
        self.i += 1
        return t


def test_losses_of_every_layer_match_mmdet_with_the_same_points(ref, config) -> None:
    crit = Mask2FormerLoss(4, num_points=config["loss_points"])
    cls = [ref[f"cls{i}"].float() for i in range(4)]
    masks = [ref[f"masks{i}"].float() for i in range(4)]
    replay = _Replay(ref, config["num_rand"])
    ours = crit(cls, masks, ref["labels"], replay)
    theirs = {k[len("loss/"):]: v for k, v in ref.items() if k.startswith("loss/")}
    assert sorted(ours) == sorted(theirs)
    errs = {k: _err(v, theirs[k]) for k, v in ours.items()}
    assert max(errs.values()) < F32_TOL, errs
    # all-ignore label maps: class loss only (every query is "no object"), mask and dice exactly 0
    empty = crit(cls, masks, torch.full_like(ref["labels"], 255), replay)
    assert replay.i == config["num_rand"], "every reference draw is used, in order"
    errs = {k: _err(v, ref["loss_empty/" + k]) for k, v in empty.items()}
    assert max(errs.values()) < F32_TOL, errs
    assert float(empty["loss_mask"]) == 0.0 and float(empty["loss_dice"]) == 0.0 and float(empty["loss_cls"]) > 0


def test_hungarian_matching_picks_the_reference_queries(ref, config) -> None:
    from transnext.dense.mask2former import semantic_to_instances

    crit = Mask2FormerLoss(4, num_points=config["loss_points"])
    targets = [semantic_to_instances(lab, 4) for lab in ref["labels"]]
    for layer in range(4):
        for b in range(2):
            # the matching draw of (layer, image): each layer draws one set per image, then two for the mask losses
            replay = _Replay(ref, config["num_rand"], start=layer * 4 + b)
            rows, cols = crit.match(ref[f"cls{layer}"][b].float(), ref[f"masks{layer}"][b].float(), *targets[b], replay)
            ours = torch.stack([rows, targets[b][0][cols]], 1)
            assert torch.equal(ours, ref[f"assign{layer * 2 + b}"]), f"layer {layer}, image {b}"


def test_full_size_head_has_the_published_checkpoints_keys_and_shapes() -> None:
    keys = json.loads((DATA / "mask2former_head_keys.json").read_text())
    ours = Mask2FormerHead([72, 144, 288, 576], 150).state_dict()
    assert {"decode_head." + k: list(v.shape) for k, v in ours.items()} == keys


def _tiny_model(num_classes: int = 4, **kw) -> torch.nn.Module:
    return mask2former_transnext(
        "transnext_micro", num_classes=num_classes, preset="mask2former", img_size=64, pretrain_size=224, drop_path_rate=0.0,
        embed_dims=tuple(IN_CHANNELS), num_heads=(1, 2, 2, 2), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2),
        num_queries=6, feat_channels=32, decoder_layers=3, encoder_layers=2,
        head_kwargs=dict(num_heads=4, num_points=4, encoder_ffn_dims=64, decoder_ffn_dims=64, num_groups=8), **kw).eval()


def _mmseg_checkpoint(model: torch.nn.Module) -> dict:
    sd = {"backbone." + k: v for k, v in model.backbone.model.state_dict().items()}
    sd.update(load_file(str(HEAD_FILE)))
    return {"meta": {"dataset_meta": {"classes": ("a", "b", "c", "d")}}, "state_dict": sd}


def test_mmseg_checkpoint_loads_strictly_and_the_head_gives_the_reference_outputs(ref) -> None:
    model = _tiny_model()
    ck = _mmseg_checkpoint(_tiny_model())
    report = load_reference_checkpoint(model, ck)
    assert report["kind"] == "mmseg_mask2former" and report["classes"] == ["a", "b", "c", "d"]
    assert report["missing_keys"] == report["unexpected_keys"] == report["mismatched_keys"] == []
    head = model.decode_head.double()
    with torch.no_grad():
        all_cls, _ = head(_feats(ref))
    assert _err(all_cls[-1], ref[f"cls{TINY['decoder_layers']}"]) < F64_TOL
    converted = convert_mmdet_mask2former(ck)
    assert sorted(converted) == sorted(model.state_dict())


def test_mmseg_checkpoint_of_another_class_count_is_refused_with_names() -> None:
    ck = _mmseg_checkpoint(_tiny_model())
    with pytest.raises(CheckpointError, match=r"decode_head\.cls_embed\.weight \(checkpoint \(5, 32\), model \(6, 32\)\).*num_classes=4"):
        load_reference_checkpoint(_tiny_model(num_classes=5), ck)
    with pytest.raises(CheckpointError, match=r"is an mmseg Mask2Former checkpoint; it loads into a Mask2Former"):
        load_reference_checkpoint(_tiny_model().backbone, ck)
