"""Dense data: COCO-format and ADE20K-format readers, their bad-input handling, transforms, demo scenes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from transnext.data import DataError

pytest.importorskip("pycocotools", reason="pycocotools is not installed (extra: dense)")
pytest.importorskip("torchvision")

from transnext.data.coco import CocoDetection, DetectionTransform, collate_detection  # noqa: E402
from transnext.data.segmentation import (  # noqa: E402
    SegmentationDataset,
    SegmentationEvalTransform,
    SegmentationTrainTransform,
    collate_segmentation,
)


def _image(path: Path, w: int = 40, h: int = 30) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(path)


def _coco(tmp_path: Path, **changes) -> tuple[Path, Path]:
    """Two 40x30 images; a polygon cat, an RLE dog, a crowd region; categories 5 and 9 (not contiguous)."""
    from pycocotools import mask as mu

    img_dir = tmp_path / "images"
    _image(img_dir / "a.png")
    _image(img_dir / "b.png")
    m = np.zeros((30, 40), np.uint8)
    m[5:15, 20:35] = 1
    rle = mu.encode(np.asfortranarray(m))
    data = dict(
        images=[dict(id=1, file_name="a.png", width=40, height=30), dict(id=2, file_name="b.png", width=40, height=30)],
        annotations=[
            dict(id=1, image_id=1, category_id=5, bbox=[2, 3, 10, 8], area=80, iscrowd=0, segmentation=[[2, 3, 12, 3, 12, 11, 2, 11]]),
            dict(id=2, image_id=1, category_id=9, bbox=[20, 5, 15, 10], area=150, iscrowd=0,
                 segmentation=dict(size=[30, 40], counts=rle["counts"].decode())),
            dict(id=3, image_id=2, category_id=5, bbox=[0, 0, 5, 5], area=25, iscrowd=1,
                 segmentation=dict(size=[30, 40], counts=[0, 1200])),
        ],
        categories=[dict(id=5, name="cat"), dict(id=9, name="dog")],
    )
    for k, v in changes.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v(data) if callable(v) else v
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(data))
    return img_dir, ann


def test_coco_reads_polygons_rle_and_maps_categories(tmp_path: Path) -> None:
    ds = CocoDetection(*_coco(tmp_path))
    assert ds.classes == ["cat", "dog"] and ds.label_to_cat_id == {1: 5, 2: 9}
    assert any("mapped in id order" in n for n in ds.notes)
    img, t = ds[0]
    assert img.shape == (3, 30, 40) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert t["labels"].tolist() == [1, 2]
    torch.testing.assert_close(t["boxes"], torch.tensor([[2.0, 3, 12, 11], [20, 5, 35, 15]]))
    assert t["masks"].shape == (2, 30, 40) and int(t["masks"][1].sum()) == 150 and t["masks"][1, 5:15, 20:35].all()
    assert int(t["masks"][0].sum()) > 0 and t["masks"][0, 3:11, 2:12].float().mean() > 0.9
    # the crowd region is kept for evaluation, left out of the training target; train=True drops image 2
    assert ds[1][1]["boxes"].shape == (0, 4) and len(ds.coco_gt()["annotations"]) == 3
    assert len(CocoDetection(*_coco(tmp_path), train=True)) == 1


def test_detection_flip_moves_boxes_and_masks(tmp_path: Path) -> None:
    ds = CocoDetection(*_coco(tmp_path))
    img, t = ds[0]
    f_img, f_t = DetectionTransform(flip=1.0)(img, t)
    torch.testing.assert_close(f_t["boxes"][0], torch.tensor([40 - 12.0, 3, 40 - 2, 11]))
    assert torch.equal(f_t["masks"], t["masks"].flip(-1)) and torch.equal(f_img, img.flip(-1))
    images, targets, skipped = collate_detection([(img, t), None, (f_img, f_t)])
    assert len(images) == 2 and skipped == 1


@pytest.mark.parametrize("case, message", [
    ("missing_key", "lacks the key(s) annotations"),
    ("empty_file", "is empty"),
    ("not_json", "not valid JSON"),
    ("image_keys", "image #0 (id 1) lacks file_name"),
    ("ann_keys", "annotation #0 (id 1) lacks bbox"),
    ("dup_cat", "duplicate category ids [5]"),
    ("no_images", "'images' list is empty"),
])
def test_coco_malformed_files_give_clear_errors(tmp_path: Path, case: str, message: str) -> None:
    if case in ("empty_file", "not_json"):
        img_dir, ann = _coco(tmp_path)
        ann.write_text("" if case == "empty_file" else "{oops")
    else:
        change = {
            "missing_key": dict(annotations=None),
            "image_keys": dict(images=lambda d: [{k: v for k, v in d["images"][0].items() if k != "file_name"}]),
            "ann_keys": dict(annotations=lambda d: [{k: v for k, v in d["annotations"][0].items() if k != "bbox"}]),
            "dup_cat": dict(categories=[dict(id=5, name="cat"), dict(id=5, name="kitten")]),
            "no_images": dict(images=[]),
        }[case]
        img_dir, ann = _coco(tmp_path, **change)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        CocoDetection(img_dir, ann)


@pytest.mark.parametrize("fault, counted", [
    ("zero_area", "zero-area boxes"),
    ("outside", "boxes outside their image"),
    ("clipped", "boxes clipped to their image"),
    ("unknown_cat", "annotations of unknown categories"),
    ("unknown_image", "annotations of unknown images"),
    ("missing_file", "images missing on disk"),
    ("bad_segm", "malformed segmentations"),
])
def test_coco_unusable_entries_are_counted_or_strict_errors(tmp_path: Path, fault: str, counted: str) -> None:
    extra = dict(id=10, image_id=1, category_id=5, bbox=[1, 1, 4, 4], area=16, iscrowd=0, segmentation=[[1, 1, 5, 1, 5, 5, 1, 5]])
    extra.update({
        "zero_area": dict(bbox=[3, 3, 0, 5]), "outside": dict(bbox=[50, 40, 5, 5]), "clipped": dict(bbox=[35, 25, 10, 10]),
        "unknown_cat": dict(category_id=4), "unknown_image": dict(image_id=77), "bad_segm": dict(segmentation=[[1, 2, 3]]),
    }.get(fault, {}))
    changes: dict = dict(annotations=lambda d: d["annotations"] + [extra])
    if fault == "missing_file":
        changes = dict(images=lambda d: d["images"] + [dict(id=3, file_name="gone.png", width=40, height=30)])
    img_dir, ann = _coco(tmp_path, **changes)
    with pytest.warns(UserWarning, match=counted):
        ds = CocoDetection(img_dir, ann)
    assert ds.report["skipped"] == {counted: 1}
    if fault == "clipped":
        assert ds[0][1]["boxes"][-1].tolist() == [35.0, 25.0, 40.0, 30.0]
    with pytest.raises(DataError, match="--strict-data"):
        CocoDetection(img_dir, ann, strict=True)


def test_coco_image_size_mismatch_is_skipped_or_strict(tmp_path: Path) -> None:
    img_dir, ann = _coco(tmp_path)
    _image(img_dir / "a.png", w=41)
    ds = CocoDetection(img_dir, ann)
    with pytest.warns(UserWarning, match="is 41x30 but the annotation file says 40x30"):
        assert ds[0] is None
    with pytest.raises(DataError, match="41x30"):
        CocoDetection(img_dir, ann, strict=True)[0]


# ---------------------------------------------------------------------- segmentation
def _seg_folder(tmp_path: Path, labels: list[np.ndarray], size=(24, 32)) -> tuple[Path, Path]:
    from PIL import Image

    img_dir, lab_dir = tmp_path / "images" / "training", tmp_path / "annotations" / "training"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    for i, lab in enumerate(labels):
        Image.fromarray(np.full((*size, 3), 30 * i, np.uint8)).save(img_dir / f"{i}.jpg")
        Image.fromarray(lab.astype(np.uint8)).save(lab_dir / f"{i}.png")
    return img_dir, lab_dir


def test_ade20k_reduce_zero_label(tmp_path: Path) -> None:
    lab = np.zeros((24, 32), np.uint8)
    lab[:, 8:] = 1
    lab[:, 16:] = 3
    _seg_folder(tmp_path, [lab])
    ds = SegmentationDataset.ade20k(tmp_path, "training", num_classes=3)
    img, label = ds[0]
    assert set(np.unique(label).tolist()) == {255, 0, 2}  # 0 -> ignore, 1 -> 0, 3 -> 2
    assert (label[:, :8] == 255).all() and (label[:, 16:] == 2).all()


def test_segmentation_bad_labels_are_counted_or_strict(tmp_path: Path) -> None:
    ok = np.ones((24, 32), np.uint8)
    bad = ok.copy()
    bad[0, 0] = 9  # class 8 after the reduction, outside 3 classes
    _seg_folder(tmp_path, [ok, bad])
    ds = SegmentationDataset.ade20k(tmp_path, "training", num_classes=3, transform=SegmentationEvalTransform(None))
    with pytest.warns(UserWarning, match=r"values \[9\] outside the 3 classes \(expected 1..3, 0 = ignore\)"):
        assert ds[1] is None
    images, labels, skipped = collate_segmentation([ds[0], None])
    assert skipped == 1 and images.shape == (1, 3, 24, 32) and labels.shape == (1, 24, 32)
    with pytest.raises(DataError, match="outside the 3 classes"):
        SegmentationDataset.ade20k(tmp_path, "training", num_classes=3, strict=True)[1]


def test_segmentation_size_mismatch_and_missing_pairs(tmp_path: Path) -> None:
    from PIL import Image

    img_dir, lab_dir = _seg_folder(tmp_path, [np.ones((24, 32)), np.ones((24, 32))])
    Image.fromarray(np.ones((20, 32), np.uint8)).save(lab_dir / "1.png")
    ds = SegmentationDataset.from_folders(img_dir, lab_dir, 3)
    with pytest.warns(UserWarning, match="is 32x24 but its label map .* is 32x20"):
        assert ds[1] is None
    (lab_dir / "0.png").unlink()
    with pytest.warns(UserWarning, match="1 images without a label map"):
        assert len(SegmentationDataset.from_folders(img_dir, lab_dir, 3)) == 1
    with pytest.raises(DataError, match="images without a label map .*--strict-data"):
        SegmentationDataset.from_folders(img_dir, lab_dir, 3, strict=True)
    with pytest.raises(DataError, match="label folder not found"):
        SegmentationDataset.from_folders(img_dir, tmp_path / "nowhere", 3)
    (img_dir / "1.jpg").unlink()
    (img_dir / "0.jpg").unlink()
    with pytest.raises(DataError, match="holds no images"):
        SegmentationDataset.from_folders(img_dir, lab_dir, 3)


def test_segmentation_train_transform_reference_pipeline() -> None:
    import random

    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    label = np.zeros((60, 80), np.uint8)
    label[:, 40:] = 1
    random.seed(0)
    tf = SegmentationTrainTransform(crop_size=64, scale=(80, 60), ratio_range=(0.5, 0.5))
    x, y = tf(img, label)
    # ratio 0.5: resized to 40x30, smaller than the crop -> padded to 64x64 (0 image, 255 label)
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)
    assert (y[30:] == 255).all() and (y[:, 40:] == 255).all() and (x[:, 30:] == 0).all()
    assert set(torch.unique(y[:30, :40]).tolist()) == {0, 1}
    ex, ey = SegmentationEvalTransform((40, 30))(img, label)
    assert ex.shape == (3, 30, 40) and ey.shape == (60, 80)  # labels stay at the original size


def test_cat_max_ratio_prefers_mixed_crops() -> None:
    import random

    label = np.zeros((100, 100), np.uint8)
    label[:, 90:] = 1  # only crops touching the right edge hold two classes
    tf = SegmentationTrainTransform(crop_size=20, cat_max_ratio=0.75)
    random.seed(3)
    hits = sum(tf._crop_box(label)[1] >= 71 for _ in range(40))
    tf_off = SegmentationTrainTransform(crop_size=20, cat_max_ratio=1.0)
    random.seed(3)
    hits_off = sum(tf_off._crop_box(label)[1] >= 71 for _ in range(40))
    assert hits > hits_off


def test_demo_scenes_are_deterministic_and_consistent(tmp_path: Path) -> None:
    from transnext.data.dense_demo import write_dense_demo

    counts = {"train": 3, "val": 2, "test": 2}
    a = write_dense_demo(tmp_path / "a", size=64, counts=counts)
    b = write_dense_demo(tmp_path / "b", size=64, counts=counts)
    for rel in ("images/train/000002.png", "annotations/test/000001.png", "annotations/instances_val.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    ds = CocoDetection(a / "images" / "train", a / "annotations" / "instances_train.json")
    seg = SegmentationDataset.ade20k(a, "train", num_classes=11)
    assert ds.classes[0] == "bear" and len(ds) == 3
    for i in range(3):
        _, t = ds[i]
        _, label = seg[i]
        for m, lab in zip(t["masks"], t["labels"]):  # every instance pixel has its class in the label map
            assert (label[m.numpy().astype(bool)] == int(lab)).all()  # detection label k = segment class k (0 = background)
    # a rewrite with the same settings is skipped (manifest); other settings regenerate
    stamp = (a / "demo_manifest.json").stat().st_mtime_ns
    write_dense_demo(tmp_path / "a", size=64, counts=counts)
    assert (a / "demo_manifest.json").stat().st_mtime_ns == stamp


def test_foreground_only_merges_classes(tmp_path: Path) -> None:
    lab = np.zeros((24, 32), np.uint8)
    lab[:, 8:] = 1
    lab[:, 16:] = 3
    lab[:, 24:] = 4
    _seg_folder(tmp_path, [lab])
    ds = SegmentationDataset.ade20k(tmp_path, "training", num_classes=2, foreground_only=True)
    _, label = ds[0]
    assert (label[:, :8] == 255).all() and (label[:, 8:16] == 0).all() and (label[:, 16:] == 1).all()
    with pytest.raises(DataError, match="2 classes"):
        SegmentationDataset.ade20k(tmp_path, "training", num_classes=3, foreground_only=True)
