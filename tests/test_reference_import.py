"""``transnext convert`` on the published dense layouts: an mmdet / mmseg file becomes a checkpoint
that the dense commands read (model record, classes, mmdet test-time mode for Mask R-CNN)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")

from transnext.checkpoints import CheckpointError  # noqa: E402
from transnext.cli.main import main  # noqa: E402
from transnext.dense.modeling import dense_model_from_checkpoint  # noqa: E402
from transnext.dense.reference_import import import_reference_checkpoint, infer_reference_variant  # noqa: E402

DATA = Path(__file__).parent / "data"


def _published_layout(shapes: dict[str, list[int]], classes: list[str]) -> dict:
    """A file with the published checkpoint's keys and shapes, mmdet / mmseg style, distinct values per tensor."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in shapes.items():
        sd[k] = (torch.randint(0, 50, shape, generator=g) if k.endswith("num_batches_tracked")
                 else torch.randn(shape, generator=g) * 0.02)
    return {"meta": {"CLASSES": classes}, "state_dict": sd}


def test_mmseg_upernet_file_converts_into_a_segment_checkpoint(tmp_path, capsys):
    shapes = json.loads((DATA / "reference_upernet" / "upernet_keys.json").read_text())["transnext_tiny"]
    ck = _published_layout(shapes, [f"class{i}" for i in range(150)])
    assert infer_reference_variant(ck["state_dict"]) == "transnext_tiny"
    src = tmp_path / "upernet_transnext_tiny_160k_ade20k.pth"
    torch.save(ck, src)
    out = tmp_path / "upernet_tiny.pth"
    assert main(["convert", str(src), str(out)]) == 0
    msg = capsys.readouterr().out
    assert "mmseg_upernet" in msg and "transnext segment eval" in msg and "150 classes" in msg
    model, info = dense_model_from_checkpoint(out, task="segment")
    assert info["classes"][:2] == ["class0", "class1"] and info["data_cfg"]["ignore_index"] == 255
    ours = model.state_dict()
    # the values travelled with their keys (one renamed key of each part)
    assert torch.equal(ours["decode_head.classifier.1.weight"], ck["state_dict"]["decode_head.conv_seg.weight"])
    assert torch.equal(ours["backbone.model.patch_embed1.proj.weight"], ck["state_dict"]["backbone.patch_embed1.proj.weight"])
    assert info["arch"]["backbone"]["pos_bias"] == "interpolate" and info["arch"]["preset"] == "upernet"


def test_mmdet_maskrcnn_file_converts_into_a_reference_mode_detector(tmp_path, capsys):
    shapes = json.loads((DATA / "reference_maskrcnn" / "mmdet_maskrcnn_transnext_tiny_shapes.json").read_text())
    names = [f"thing{i}" for i in range(80)]
    ck = _published_layout(shapes, names)
    src = tmp_path / "mask_rcnn_transnext_tiny_fpn_1x_coco.pth"
    torch.save(ck, src)
    out = tmp_path / "maskrcnn_tiny.pth"
    assert main(["convert", str(src), str(out)]) == 0
    assert "transnext detect eval" in capsys.readouterr().out
    model, info = dense_model_from_checkpoint(out, task="detect")
    assert info["arch"]["reference"] is True and info["classes"] == ["__background__", *names]
    assert type(model.roi_heads).__name__ != "RoIHeads"  # mmdet's post-processing, not torchvision's
    # mmdet's background row is last, ours first
    theirs = ck["state_dict"]["roi_head.bbox_head.fc_cls.weight"]
    assert torch.equal(model.state_dict()["roi_heads.box_predictor.cls_score.weight"][0], theirs[-1])
    assert torch.equal(model.state_dict()["roi_heads.box_predictor.cls_score.weight"][1:], theirs[:-1])


def test_reference_import_refuses_what_it_cannot_write(tmp_path):
    shapes = json.loads((DATA / "reference_upernet" / "upernet_keys.json").read_text())["transnext_tiny"]
    ck = _published_layout(shapes, [])
    src = tmp_path / "ref.pth"
    torch.save(ck, src)
    with pytest.raises(ValueError, match=r"written as \.pth"):
        import_reference_checkpoint(src, tmp_path / "out.safetensors")
    del ck["state_dict"]["backbone.block3.14.norm1.weight"]
    ck["state_dict"] = {k: v for k, v in ck["state_dict"].items() if not k.startswith("backbone.block3.14.")}
    torch.save(ck, src)  # 14 blocks in stage 3: no published variant
    with pytest.raises(CheckpointError, match="none of the published variants"):
        import_reference_checkpoint(src, tmp_path / "out.pth")
