"""Published mmdet Mask R-CNN checkpoints in ``maskrcnn_transnext(reference=True)``: conversion, strict load, parity.

The data (tests/data/reference_maskrcnn, see its README.md) is a tiny mmdet 3.3 ``MaskRCNN`` with the
reference TransNeXt backbone and seeded random weights, and mmdet's outputs on two inputs: backbone
and FPN maps, RPN proposals, detections and masks. Stages are compared in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from transnext.checkpoints import CheckpointError  # noqa: E402
from transnext.dense.detection import maskrcnn_transnext  # noqa: E402
from transnext.dense.reference_mmdet import (  # noqa: E402
    MMDetAnchorGenerator,
    MMDetRoIAlign,
    MMDetRoIHeads,
    MMDetTransform,
    convert_mmdet_maskrcnn,
    load_mmdet_checkpoint,
    paste_masks_mmdet,
)

DATA = Path(__file__).parent / "data" / "reference_maskrcnn"
CKPT = DATA / "mmdet_maskrcnn_tiny.safetensors"
OUTPUTS = DATA / "mmdet_outputs.safetensors"


def _meta() -> dict[str, str]:
    with safe_open(str(OUTPUTS), "pt") as f:
        return dict(f.metadata())


def _build(reference: bool = True) -> torch.nn.Module:
    bb = json.loads(_meta()["backbone"])
    kw = {k: tuple(bb[k]) for k in ("embed_dims", "num_heads", "depths", "mlp_ratios", "sr_ratios", "window_size")}
    kw.update(img_size=bb["img_size"], pretrain_size=bb["pretrain_size"])
    # mmdet's normalisation is outside the network: the stored images are already normalised.
    return maskrcnn_transnext("transnext_tiny", num_classes=81, fpn_channels=int(_meta()["fpn_channels"]), representation_size=32,
                              mask_layers=(32,) * 4, backbone_kwargs=kw, reference=reference,
                              image_mean=[0.0] * 3, image_std=[1.0] * 3).eval()


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(OUTPUTS))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    m = _build()
    load_mmdet_checkpoint(m, CKPT)
    return m


@pytest.fixture(scope="module")
def stages(model, ref) -> dict[int, dict[str, object]]:
    """Every stage of the converted model on both inputs, computed once for the parity tests."""
    return {n: _run(model, ref, n) for n in (0, 1)}


def _run(model: torch.nn.Module, ref: dict[str, torch.Tensor], n: int) -> dict[str, object]:
    """Every stage of our model on input ``n`` (no resizing: the transform's scale is exactly 1)."""
    img = ref[f"input{n}.image"].float()[0]
    h, w = img.shape[-2:]
    model.transform.min_size, model.transform.max_size = (min(h, w),), max(h, w)
    with torch.no_grad():
        images, _ = model.transform([img])
        body = list(model.backbone.body(images.tensors).values())
        fpn = model.backbone(images.tensors)
        feats = list(fpn.values())
        from torchvision.models.detection.rpn import concat_box_prediction_layers

        objectness, deltas = model.rpn.head(feats)
        anchors = model.rpn.anchor_generator(images, feats)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = model.rpn.box_coder.decode(deltas, anchors).view(1, -1, 4)
        boxes, scores = model.rpn.filter_proposals(proposals, objectness, images.image_sizes, per_level)
        dets, _ = model.roi_heads(fpn, boxes, images.image_sizes)
        final = model([img])[0]
    return {"images": images, "backbone": body, "fpn": feats, "rpn_boxes": boxes[0], "rpn_scores": scores[0], "dets": dets[0],
            "final": final}


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


# ------------------------------------------------------------------------------------------ conversion and loading
def test_conversion_names_every_key_and_moves_background() -> None:
    sd = load_file(str(CKPT))
    converted = convert_mmdet_maskrcnn(sd)
    own = _build().state_dict()
    assert set(converted) == set(own)
    assert all(converted[k].shape == own[k].shape for k in own)
    w = converted["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(w[0], sd["roi_head.bbox_head.fc_cls.weight"][80])  # mmdet: background last
    assert torch.equal(w[1:], sd["roi_head.bbox_head.fc_cls.weight"][:80])
    reg = converted["roi_heads.box_predictor.bbox_pred.weight"]
    assert torch.equal(reg[4:], sd["roi_head.bbox_head.fc_reg.weight"]) and not reg[:4].any()
    logits = converted["roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert torch.equal(logits[1:], sd["roi_head.mask_head.conv_logits.weight"]) and not logits[0].any()
    assert torch.equal(converted["backbone.fpn.inner_blocks.2.0.weight"], sd["neck.lateral_convs.2.conv.weight"])
    assert torch.equal(converted["rpn.head.conv.0.0.weight"], sd["rpn_head.rpn_conv.weight"])


def test_pth_with_meta_loads_strictly(tmp_path: Path) -> None:
    sd = {k: v.float() for k, v in load_file(str(CKPT)).items()}
    sd["backbone.relative_pos_index1"] = torch.zeros(3, dtype=torch.long)  # a size table some exports carry: dropped
    path = tmp_path / "mask_rcnn.pth"
    torch.save({"meta": {"mmdet_version": "2.28.2", "CLASSES": ("person", "bicycle"), "epoch": 12, "config": "model = dict()"},
                "state_dict": sd}, path)
    m = _build()
    report = load_mmdet_checkpoint(m, path)
    assert report == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert torch.equal(m.state_dict()["backbone.body.model.patch_embed1.proj.weight"], sd["backbone.patch_embed1.proj.weight"])


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"meta": {"obj": Path("x")}, "state_dict": load_file(str(CKPT))}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_mmdet_checkpoint(_build(), path)


def test_strict_report_names_missing_unexpected_and_misshaped_keys(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = load_file(str(CKPT))
    del sd["neck.fpn_convs.1.conv.bias"]
    sd["roi_head.extra.weight"] = torch.zeros(1)
    sd["rpn_head.rpn_conv.weight"] = torch.zeros(8, 32, 3, 3, dtype=torch.float16)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as e:
        load_mmdet_checkpoint(_build(), path)
    text = str(e.value)
    assert "missing keys (1): backbone.fpn.layer_blocks.1.0.bias" in text
    assert "unexpected keys (1): roi_head.extra.weight" in text
    assert "rpn.head.conv.0.0.weight (checkpoint (8, 32, 3, 3), model (32, 32, 3, 3))" in text


def test_class_count_mismatch_says_which_num_classes() -> None:
    bb = json.loads(_meta()["backbone"])
    m = maskrcnn_transnext("transnext_tiny", num_classes=5, fpn_channels=32, representation_size=32, mask_layers=(32,) * 4,
                           reference=True, backbone_kwargs={k: (tuple(v) if isinstance(v, list) else v) for k, v in bb.items()
                                                            if k not in ("patch_size", "drop_rate", "qkv_bias")})
    with pytest.raises(CheckpointError, match=r"shape mismatches .*The checkpoint has 80 classes, the model 4 .*num_classes=81"):
        load_mmdet_checkpoint(m, CKPT)


def test_class_agnostic_or_headless_state_dicts_are_explained() -> None:
    sd = load_file(str(CKPT))
    agnostic = dict(sd, **{"roi_head.bbox_head.fc_reg.weight": torch.zeros(4, 32), "roi_head.bbox_head.fc_reg.bias": torch.zeros(4)})
    with pytest.raises(CheckpointError, match="fc_reg.weight has 4 rows; expected 320 .80 classes"):
        convert_mmdet_maskrcnn(agnostic)
    with pytest.raises(CheckpointError, match="fc_cls.weight / .bias are missing"):
        convert_mmdet_maskrcnn({k: v for k, v in sd.items() if "fc_cls" not in k})


def test_reference_mode_refuses_its_own_components_as_arguments() -> None:
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    with pytest.raises(ValueError, match="do not pass anchor_generator"):
        maskrcnn_transnext("transnext_tiny", num_classes=3, fpn_channels=16, reference=True,
                           anchor_generator=AnchorGenerator(((32,),) * 5, ((1.0,),) * 5),
                           backbone_kwargs=dict(embed_dims=(16, 32, 64, 96), num_heads=(1, 2, 4, 6), depths=(1, 1, 1, 1)))


# ------------------------------------------------------------------------------------------ parity with mmdet
@pytest.mark.parametrize("n", [0, 1])
def test_backbone_and_fpn_match_mmdet(stages, ref, n: int) -> None:
    out = stages[n]
    h, w = ref[f"input{n}.image"].shape[-2:]
    assert _err(out["images"].tensors[0, :, :h, :w], ref[f"input{n}.image"][0]) == 0.0  # no resizing happened
    errs = {f"backbone.{i}": _err(f, ref[f"input{n}.backbone.{i}"]) for i, f in enumerate(out["backbone"])}
    errs.update({f"fpn.{i}": _err(f, ref[f"input{n}.fpn.{i}"]) for i, f in enumerate(out["fpn"])})
    assert [f.shape for f in out["fpn"]] == [ref[f"input{n}.fpn.{i}"].shape for i in range(5)]
    assert max(errs.values()) < 1e-4, f"fp32 max abs error per stage: {errs}"


@pytest.mark.parametrize("n", [0, 1])
def test_rpn_proposals_match_mmdet(stages, ref, n: int) -> None:
    out = stages[n]
    boxes, scores = ref[f"input{n}.rpn.boxes"], ref[f"input{n}.rpn.scores"]
    assert out["rpn_boxes"].shape == boxes.shape, f"{len(out['rpn_boxes'])} proposals, mmdet {len(boxes)}"
    errs = {"boxes": _err(out["rpn_boxes"], boxes), "scores": _err(out["rpn_scores"], scores)}
    assert errs["boxes"] < 1e-3 and errs["scores"] < 1e-5, f"fp32 max abs error: {errs}"


@pytest.mark.parametrize("n", [0, 1])
def test_detections_match_mmdet(stages, ref, n: int) -> None:
    final = stages[n]["final"]
    boxes, scores, labels = ref[f"input{n}.boxes"], ref[f"input{n}.scores"], ref[f"input{n}.labels"]
    assert len(final["boxes"]) == len(boxes) == 100
    assert torch.equal(final["labels"], labels + 1)  # mmdet's labels count from 0 without background
    errs = {"boxes": _err(final["boxes"], boxes), "scores": _err(final["scores"], scores)}
    assert errs["boxes"] < 1e-3 and errs["scores"] < 1e-5, f"fp32 max abs error: {errs}"


@pytest.mark.parametrize("n", [0, 1])
def test_masks_match_mmdet(stages, ref, n: int) -> None:
    out = stages[n]
    probs = ref[f"input{n}.mask_probs"]
    k = len(probs)
    assert _err(out["dets"]["masks"][:k, 0], probs) < 1e-5, f"28x28 mask probability error {_err(out['dets']['masks'][:k, 0], probs)}"
    h, w = ref[f"input{n}.image"].shape[-2:]
    want = torch.from_numpy(np.unpackbits(ref[f"input{n}.masks_packed"].numpy(), axis=-1)[..., :w].astype(bool))
    got = out["final"]["masks"][:k, 0] >= 0.5  # mmdet's mask_thr_binary
    assert got.shape == want.shape == (k, h, w)
    assert want.any() and int((got != want).sum()) == 0, f"{int((got != want).sum())} of {want.numel()} mask pixels differ"


def test_torchvision_defaults_do_not_match_mmdet(ref) -> None:
    """Without reference=True the same weights give other proposals: the differences handled above are real."""
    m = _build(reference=False)
    load_mmdet_checkpoint(m, CKPT)
    out = _run(m, ref, 1)
    boxes = ref["input1.rpn.boxes"]
    assert out["rpn_boxes"].shape != boxes.shape or _err(out["rpn_boxes"], boxes) > 1e-2


# ------------------------------------------------------------------------------------------ components against their formulas
def test_anchors_follow_mmdet_formula() -> None:
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    gen = MMDetAnchorGenerator()
    images = ImageList(torch.zeros(1, 3, 160, 96), [(150, 90)])
    maps = [torch.zeros(1, 1, -(-160 // s), -(-96 // s)) for s in (4, 8, 16, 32)]
    maps.append(torch.zeros(1, 1, 3, 2))  # max-pooled P6 of a 5x3 P5: torchvision infers stride 160 // 3 = 53
    anchors = gen(images, maps)[0]
    expected = []
    for s, f in zip((4, 8, 16, 32, 64), maps):
        hh, ww = f.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(hh) * s, torch.arange(ww) * s, indexing="ij")
        for y, x in zip(ys.reshape(-1).tolist(), xs.reshape(-1).tolist()):
            for r in (0.5, 1.0, 2.0):
                aw, ah = 8 * s / r ** 0.5, 8 * s * r ** 0.5
                expected.append([x - aw / 2, y - ah / 2, x + aw / 2, y + ah / 2])
    assert torch.allclose(anchors, torch.tensor(expected), atol=1e-4)
    tv = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)(images, maps)[0]
    assert not torch.allclose(tv, anchors, atol=1e-2)  # rounded base anchors and the inferred stride 53


def test_roi_levels_and_aligned_sampling_follow_mmdet() -> None:
    from torchvision.ops import MultiScaleRoIAlign, roi_align

    pool = MMDetRoIAlign(["0", "1", "2", "3"], 7)
    sides = torch.tensor([20.0, 111.9, 112.0, 223.0, 224.0, 447.0, 448.0, 900.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)
    assert pool.map_levels_mmdet(boxes).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # finest_scale 56
    gen = torch.Generator().manual_seed(0)
    feats = {str(i): torch.randn(1, 4, 64 // 2 ** i, 64 // 2 ** i, generator=gen) for i in range(4)}
    box = torch.tensor([[3.3, 5.1, 120.7, 90.2]])  # side ~94 px: level 0 in mmdet
    got = pool(feats, [box], [(256, 256)])
    want = roi_align(feats["0"], torch.cat([torch.zeros(1, 1), box], 1), 7, spatial_scale=0.25, sampling_ratio=0, aligned=True)
    assert torch.allclose(got, want, atol=1e-6)
    tv = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(feats, [box], [(256, 256)])
    assert not torch.allclose(tv, got, atol=1e-3)


def test_box_postprocessing_keeps_small_boxes_like_mmdet() -> None:
    from torchvision.models.detection.roi_heads import RoIHeads

    args = (None, None, None, 0.5, 0.5, 512, 0.25, (10.0, 10.0, 5.0, 5.0), 0.05, 0.5, 100)
    logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0]])
    proposals = [torch.tensor([[10.0, 10.0, 10.005, 20.0], [30.0, 30.0, 50.0, 60.0]])]
    ours = MMDetRoIHeads(*args).postprocess_detections(logits, torch.zeros(2, 12), proposals, [(100, 100)])
    theirs = RoIHeads(*args).postprocess_detections(logits, torch.zeros(2, 12), proposals, [(100, 100)])
    assert len(ours[0][0]) == 2 and len(theirs[0][0]) == 1  # the 0.005 px wide box: mmdet keeps it
    assert ours[2][0].tolist() == [1, 1]


def test_resizing_rounds_the_size_like_mmcv() -> None:
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    image = torch.rand(3, 300, 500, generator=torch.Generator().manual_seed(0))
    args = (800, 1333, [0.0] * 3, [1.0] * 3)
    ours = MMDetTransform(*args).eval()
    images, _ = ours([image])
    assert images.image_sizes == [(800, 1333)]  # mmcv: int(300 * 2.666 + 0.5); torchvision floors to 799
    assert GeneralizedRCNNTransform(*args).eval()([image])[0].image_sizes == [(799, 1333)]
    want = torch.nn.functional.interpolate(image[None], size=(800, 1333), mode="bilinear", align_corners=False)[0]
    assert torch.equal(images.tensors[0, :, :800, :1333], want)
    boxes = ours.postprocess([{"boxes": torch.tensor([[0.0, 0.0, 1333.0, 800.0]])}], images.image_sizes, [(300, 500)])[0]["boxes"]
    assert torch.allclose(boxes, torch.tensor([[0.0, 0.0, 500.0, 300.0]]))


def test_mask_pasting_follows_mmdet_formula() -> None:
    box = torch.tensor([[10.3, 20.2, 30.7, 40.1]])
    pasted = paste_masks_mmdet(torch.ones(1, 1, 28, 28), box, (64, 48))[0, 0]
    ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(48) + 0.5, indexing="ij")
    inside = (xs >= 10.3) & (xs <= 30.7) & (ys >= 20.2) & (ys <= 40.1)  # pixel centres in the box
    assert torch.equal(pasted >= 0.5, inside)
    assert float(pasted[~inside].max()) < 0.5 and float(pasted[inside].min()) >= 0.5
    assert not pasted[:, :9].any() and not pasted[:, 32:].any()  # nothing beyond the box +- 1 px


# ------------------------------------------------------------------------------------------ the reference-checkpoint table
def _reference_checkpoints():
    try:
        from transnext.dense import reference_checkpoints
    except ImportError:  # the shared loader of reference checkpoints is not part of this tree
        pytest.skip("transnext.dense.reference_checkpoints is not available")
    return reference_checkpoints


def test_load_reference_checkpoint_dispatches_mmdet_maskrcnn(tmp_path: Path, ref) -> None:
    rc = _reference_checkpoints()
    path = tmp_path / "mask_rcnn.pth"
    torch.save({"meta": {"CLASSES": ("person", "bicycle")}, "state_dict": load_file(str(CKPT))}, path)
    m = _build()
    report = rc.load_reference_checkpoint(m, path)
    assert report["kind"] == "mmdet_maskrcnn" and report["classes"] == ["person", "bicycle"]
    assert not report["missing_keys"] and not report["unexpected_keys"] and not report["mismatched_keys"]
    out = _run(m, ref, 0)
    assert _err(out["final"]["boxes"], ref["input0.boxes"]) < 1e-3


def test_load_reference_checkpoint_names_mmdet_keys_in_errors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    rc = _reference_checkpoints()
    sd = load_file(str(CKPT))
    sd["rpn_head.rpn_conv.weight"] = torch.zeros(8, 32, 3, 3, dtype=torch.float16)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"rpn\.head\.conv\.0\.0\.weight = rpn_head\.rpn_conv\.weight"):
        rc.load_reference_checkpoint(_build(), path)
    with pytest.raises(CheckpointError, match="an mmdet Mask R-CNN checkpoint; it loads into a Mask R-CNN"):
        rc.load_reference_checkpoint(torch.nn.Linear(2, 2), CKPT)


def test_published_transnext_tiny_layout_converts_to_the_default_model() -> None:
    """Every key and shape of the published Mask R-CNN 1x TransNeXt-Tiny layout (mmdet, 47.86M parameters) has its place."""
    shapes = json.loads((DATA / "mmdet_maskrcnn_transnext_tiny_shapes.json").read_text())
    converted = convert_mmdet_maskrcnn({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    with torch.device("meta"):
        own = maskrcnn_transnext("transnext_tiny", num_classes=81, reference=True).state_dict()
    assert sorted(converted) == sorted(own)
    bad = [(k, tuple(converted[k].shape), tuple(own[k].shape)) for k in own if converted[k].shape != own[k].shape]
    assert not bad, f"shape mismatches: {bad[:5]}"
    # the background rows added for torchvision: 1024 * 4 + 4 box regression values, 256 + 1 mask logits
    assert sum(v.numel() for v in own.values()) - sum(torch.Size(s).numel() for s in shapes.values()) == 4100 + 257


def test_reference_mode_trains() -> None:
    """Fine-tuning a converted checkpoint: the reference components also serve torchvision's training losses."""
    m = _build()
    load_mmdet_checkpoint(m, CKPT)
    m.train()
    m.transform.min_size, m.transform.max_size = (96,), 128
    masks = torch.zeros(1, 96, 128, dtype=torch.uint8)
    masks[0, 20:60, 30:90] = 1
    target = {"boxes": torch.tensor([[30.0, 20.0, 90.0, 60.0]]), "labels": torch.tensor([3]), "masks": masks}
    losses = m([torch.randn(3, 96, 128, generator=torch.Generator().manual_seed(0))], [target])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert m.roi_heads.box_predictor.cls_score.weight.grad is not None


def test_no_detection_gives_empty_outputs(model) -> None:
    model.roi_heads.score_thresh = 1.0  # no softmax score exceeds it
    model.transform.min_size, model.transform.max_size = (96,), 128
    try:
        with torch.no_grad():
            out = model([torch.randn(3, 96, 128, generator=torch.Generator().manual_seed(0))])[0]
    finally:
        model.roi_heads.score_thresh = 0.05
    assert {k: tuple(v.shape) for k, v in out.items()} == {"boxes": (0, 4), "labels": (0,), "scores": (0,), "masks": (0, 1, 96, 128)}
