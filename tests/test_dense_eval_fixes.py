"""Dense evaluation on imperfect data: unreadable images, out-of-range label maps, sliding-window
settings, the checkpoint's ignore index, empty evaluations, and --strict-data errors from workers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools", reason="pycocotools is not installed (extra: dense)")
pytest.importorskip("timm")

from train_helpers import DENSE_TRUNK, make_image_folder, one_thread, run_cli, save_tiny_checkpoint, write_corrupt  # noqa: E402,F401
from transnext.data import DataError  # noqa: E402
from transnext.data.segmentation import SegmentationDataset, SegmentationEvalTransform, collate_segmentation  # noqa: E402
from transnext.dense.inference import segment_image, slide_windows  # noqa: E402
from transnext.dense.workflow import evaluate_detection, evaluate_segmentation  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is fastest and steadiest

def _one_line_error(stderr: str, *names: str) -> None:
    """The error is the last line of stderr, alone (progress notes may come before it), naming ``names``."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    assert errors == lines[-1:] and "Traceback" not in stderr and "DataLoader worker" not in stderr, stderr
    for name in names:
        assert name in lines[-1], stderr


# ---------------------------------------------------------------------- detection with an oracle detector
# Each image has its own size, so the oracle can tell them apart; its boxes are the ground truth plus a
# higher-scored false positive on image 1 (an AP strictly between 0 and 100).
SIZES = {1: (30, 40), 2: (34, 44), 3: (38, 48)}  # image id -> (H, W)
GT = {1: [(1, [2, 3, 10, 8])], 2: [(2, [20, 5, 15, 10]), (1, [1, 1, 6, 6])], 3: [(2, [5, 5, 20, 20]), (1, [25, 2, 10, 10])]}


def _coco_split(root: Path, unreadable: tuple[int, ...] = (), drop: tuple[int, ...] = ()) -> Path:
    """``root/images/val`` + ``root/annotations/instances_val.json``; ``unreadable`` ids get a truncated JPEG."""
    from PIL import Image

    img_dir = root / "images" / "val"
    img_dir.mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for iid, (h, w) in SIZES.items():
        if iid in drop:
            continue
        path = img_dir / f"{iid}.jpg"
        Image.fromarray(np.random.default_rng(iid).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=95)
        if iid in unreadable:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        images.append(dict(id=iid, file_name=path.name, width=w, height=h))
        for cat, box in GT[iid]:
            anns.append(dict(id=len(anns) + 1, image_id=iid, category_id=cat, bbox=box, area=box[2] * box[3], iscrowd=0))
    (root / "annotations" / "instances_val.json").write_text(json.dumps(
        dict(images=images, annotations=anns, categories=[dict(id=1, name="cat"), dict(id=2, name="dog")])))
    return root


class _Oracle(torch.nn.Module):
    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        by_size = {v: k for k, v in SIZES.items()}
        out = []
        for im in images:
            iid = by_size[tuple(im.shape[-2:])]
            dets = [(cat, [x, y, x + w, y + h], 0.8 - 0.1 * k) for k, (cat, (x, y, w, h)) in enumerate(GT[iid])]
            if iid == 1:
                dets.append((2, [25.0, 15, 38, 28], 0.95))
            out.append(dict(boxes=torch.tensor([d[1] for d in dets], dtype=torch.float32),
                            labels=torch.tensor([d[0] for d in dets]), scores=torch.tensor([d[2] for d in dets])))
        return out


@pytest.fixture
def oracle(monkeypatch):
    info = {"arch": {"task": "detect", "detector": "retinanet"}, "classes": ["__background__", "cat", "dog"], "data_cfg": {}}
    monkeypatch.setattr("transnext.dense.modeling.dense_model_from_checkpoint", lambda path, task=None: (_Oracle(), info))


def test_detect_eval_leaves_an_unreadable_image_out_with_its_ground_truth(oracle, tmp_path: Path) -> None:
    data = _coco_split(tmp_path / "data", unreadable=(3,))
    with pytest.warns(UserWarning, match=r"cannot read image .*3\.jpg"):
        res = evaluate_detection("oracle.pth", data, "val", num_workers=0, output=tmp_path / "ev", progress=False)
    ref = evaluate_detection("oracle.pth", _coco_split(tmp_path / "ref", drop=(3,)), "val", num_workers=0, progress=False)
    ap = res["metrics"]["bbox_AP"]
    assert 0 < ap < 100 and ap == pytest.approx(ref["metrics"]["bbox_AP"])
    assert res["coco"]["bbox"]["per_class"] == pytest.approx(ref["coco"]["bbox"]["per_class"])
    assert res["metrics"]["n"] == 2 and res["metrics"]["skipped"] == 1 and sorted(im["id"] for im in res["gt"]["images"]) == [1, 2]
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["skipped_images"] == 1 and saved["metrics"]["skipped"] == 1
    assert "skipped images: 1" in (tmp_path / "ev" / "eval.md").read_text()
    r = run_cli("detect", "eval", "--checkpoint", "oracle.pth", "--data-dir", str(data), "--split", "val", "--num-workers", "0",
                "--no-progress", check=True)
    assert "skipped images: 1" in r.stdout and "2 images evaluated" in r.stdout


def test_detect_eval_over_no_image_is_an_error(oracle, tmp_path: Path) -> None:
    data = _coco_split(tmp_path / "data", unreadable=(1, 2, 3))
    with pytest.warns(UserWarning, match="cannot read image"), pytest.raises(DataError, match="all 3 image.s. were skipped"):
        evaluate_detection("oracle.pth", data, "val", num_workers=0, progress=False)


def test_detect_eval_strict_worker_error_is_one_line(oracle, tmp_path: Path) -> None:
    data = _coco_split(tmp_path / "data", unreadable=(2,))
    r = run_cli("detect", "eval", "--checkpoint", "oracle.pth", "--data-dir", str(data), "--split", "val", "--num-workers", "2",
                "--strict-data", "--no-progress")
    assert r.returncode == 1
    _one_line_error(r.stderr, "2.jpg", "cannot read image", "--strict-data")


# ---------------------------------------------------------------------- segmentation with a tiny UPerNet checkpoint
def _seg_checkpoint(path: Path, num_classes: int = 3, ignore_index: int = 255, data_format: str = "masks",
                    foreground_only: bool = False) -> Path:
    """A segmentation checkpoint as training writes it (arch and data_cfg from a config), with random weights."""
    from transnext.dense.config import SegmentationConfig, resolve_dense_config
    from transnext.dense.modeling import build_dense_model, dense_arch
    from transnext.dense.tasks import SegmentationTask

    cfg = resolve_dense_config(SegmentationConfig, "segment_demo", None, dict(
        model_kwargs=DENSE_TRUNK, img_size=64, pretrain_size=64, channels=16, aux_channels=8, num_classes=num_classes, crop_size=32,
        resize_scale=(48, 32), data_format=data_format, ignore_index=ignore_index, foreground_only=foreground_only))
    torch.manual_seed(0)
    task = SegmentationTask()
    task.cfg, task.arch, task.classes = cfg, dense_arch(cfg, num_classes, "segment"), [f"c{i}" for i in range(num_classes)]
    model = build_dense_model(task.arch)
    torch.save({"model": model.state_dict(), **task.checkpoint_extras(model)}, path)
    return path


def _seg_split(root: Path, labels: list[np.ndarray], split: str = "val") -> Path:
    from PIL import Image

    (root / "images" / split).mkdir(parents=True)
    (root / "annotations" / split).mkdir(parents=True)
    for i, lab in enumerate(labels):
        h, w = lab.shape
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / split / f"{i}.png")
        Image.fromarray(lab).save(root / "annotations" / split / f"{i}.png")
    return root


def _labels(ignore: int, offset: int = 0, n: int = 2) -> list[np.ndarray]:
    out = []
    for i in range(n):
        lab = np.full((32, 48), offset, np.uint8)
        lab[:, 16:] = offset + 1
        lab[:, 32:] = offset + 2
        lab[: 6 + 4 * i] = ignore  # unlabelled rows
        out.append(lab)
    return out


@pytest.mark.parametrize("data_format", ["masks", "ade20k"])
def test_segment_eval_uses_the_checkpoint_ignore_index(data_format: str, tmp_path: Path) -> None:
    ck = _seg_checkpoint(tmp_path / "ck.pth", ignore_index=254, data_format=data_format)
    # masks: classes 0..2 and 254 = ignore; ADE20K: classes 1..3 and 0 = ignore (mapped to the checkpoint's 254)
    labels = _labels(254) if data_format == "masks" else _labels(0, offset=1)
    data = _seg_split(tmp_path / "data", labels)
    res = evaluate_segmentation(ck, data, "val", num_workers=0, progress=False)["metrics"]
    labelled = sum(int((lab != (254 if data_format == "masks" else 0)).sum()) for lab in labels)
    assert res["n"] == 2 and "skipped" not in res
    assert sum(map(sum, res["confusion"])) == labelled and np.isfinite(res["aAcc"])


def test_segment_eval_over_no_image_is_an_error(tmp_path: Path) -> None:
    ck = _seg_checkpoint(tmp_path / "ck.pth")
    data = _seg_split(tmp_path / "data", [np.full((32, 48), 7, np.uint8)] * 2)  # every value outside the 3 classes
    with pytest.warns(UserWarning, match="outside the 3 classes"), pytest.raises(DataError, match="all 2 image.s. were skipped"):
        evaluate_segmentation(ck, data, "val", num_workers=0, progress=False)
    r = run_cli("segment", "eval", "--checkpoint", str(ck), "--data-dir", str(data), "--split", "val", "--num-workers", "0",
                "--no-progress")
    assert r.returncode == 1 and "no image could be evaluated" in r.stderr and "Traceback" not in r.stderr


def test_foreground_only_refuses_out_of_range_label_values(tmp_path: Path) -> None:
    from PIL import Image

    img_dir, lab_dir = tmp_path / "images", tmp_path / "labels"
    img_dir.mkdir()
    lab_dir.mkdir()
    ok = np.zeros((24, 32), np.uint16)
    ok[:, 16:] = 3
    wide = ok * 257  # an 8-bit map rescaled to 16 bits: 3 -> 771
    for name, lab in (("ok", ok), ("wide", wide)):
        Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(img_dir / f"{name}.png")
        Image.fromarray(lab).save(lab_dir / f"{name}.png")
    ds = SegmentationDataset.from_folders(img_dir, lab_dir, 2, foreground_only=True, transform=SegmentationEvalTransform(None))
    assert ds.pairs[1][1].endswith("wide.png")
    _, label = ds[0]
    assert (label[:, :16] == 0).all() and (label[:, 16:] == 1).all()
    with pytest.warns(UserWarning, match=r"wide\.png has values \[771\] outside 0..255 \(foreground-only"):
        item = ds[1]
    assert item is None and collate_segmentation([ds[0], item])[2] == 1
    strict = SegmentationDataset.from_folders(img_dir, lab_dir, 2, foreground_only=True, strict=True)
    with pytest.raises(DataError, match=r"wide\.png has values \[771\] outside 0..255 .*--strict-data"):
        strict[1]
    # ADE20K layout: the same rule on the source values
    ade = SegmentationDataset.from_folders(img_dir, lab_dir, 2, foreground_only=True, reduce_zero_label=True)
    with pytest.warns(UserWarning, match=r"values \[771\] outside 0..255 .*0 = ignore, 1 = background"):
        assert ade[1] is None


def test_slide_refuses_a_stride_larger_than_the_crop(tmp_path: Path) -> None:
    conv = torch.nn.Conv2d(3, 4, 1)
    conv.num_classes = 4
    x = torch.randn(1, 3, 100, 100)
    with pytest.raises(ValueError, match="stride 50 is larger than the crop 40"):
        slide_windows(100, 100, 40, 50)
    with pytest.raises(ValueError, match="stride 50 is larger than the crop 40"):
        segment_image(conv, x, mode="slide", crop=40, stride=50)
    # stride == crop tiles the image exactly (no gap, nothing NaN)
    assert torch.isfinite(segment_image(conv, x, mode="slide", crop=40, stride=40)).all()
    ck = _seg_checkpoint(tmp_path / "ck.pth")
    data = _seg_split(tmp_path / "data", _labels(255))
    with pytest.raises(ValueError, match="stride 50 is larger than the crop 40"):
        evaluate_segmentation(ck, data, "val", mode="slide", crop=40, stride=50, num_workers=0, progress=False)
    r = run_cli("segment", "eval", "--checkpoint", str(ck), "--data-dir", str(data), "--split", "val", "--mode", "slide",
                "--crop", "40", "--stride", "50", "--num-workers", "0", "--no-progress")
    assert r.returncode == 1
    _one_line_error(r.stderr, "stride 50 is larger than the crop 40")


def test_nan_scores_are_never_turned_into_classes() -> None:
    class NaNModel(torch.nn.Module):
        num_classes = 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(x.shape[0], 3, *x.shape[-2:])
            out[..., 0, 0] = float("nan")
            return out

    x = torch.randn(1, 3, 20, 30)
    for kwargs in (dict(mode="whole"), dict(mode="slide", crop=16, stride=8), dict(scales=(0.5, 1.0), flip=True)):
        with pytest.raises(RuntimeError, match="non-finite"):
            segment_image(NaNModel(), x, **kwargs)


def test_segment_eval_strict_worker_error_is_one_line(tmp_path: Path) -> None:
    ck = _seg_checkpoint(tmp_path / "ck.pth")
    data = _seg_split(tmp_path / "data", _labels(255, n=3))
    write_corrupt(data / "images" / "val" / "1.png", "truncated")
    r = run_cli("segment", "eval", "--checkpoint", str(ck), "--data-dir", str(data), "--split", "val", "--num-workers", "2",
                "--strict-data", "--no-progress")
    assert r.returncode == 1
    _one_line_error(r.stderr, str(data / "images" / "val" / "1.png"), "cannot read image", "--strict-data")


# ---------------------------------------------------------------------- classification eval
def test_classification_eval_strict_worker_error_is_one_line(tmp_path: Path) -> None:
    save_tiny_checkpoint(tmp_path / "tiny.pth", num_classes=3, classes=["class_0", "class_1", "class_2"])
    data = make_image_folder(tmp_path / "data", classes=3, per_class=2, splits=("val",))
    write_corrupt(data / "val" / "class_1" / "bad.jpg")
    r = run_cli("eval", str(data), "--checkpoint", str(tmp_path / "tiny.pth"), "--strict-data", "--num-workers", "2", "--no-progress")
    assert r.returncode == 1
    _one_line_error(r.stderr, "bad.jpg", "cannot read image")


def test_metrics_over_nothing_are_errors() -> None:
    from transnext.dense.metrics import SegmentationMetric, coco_evaluate

    m = SegmentationMetric(3, ignore_index=254)
    with pytest.raises(ValueError, match="no labelled pixel"):
        m.compute()
    m.update(torch.zeros(2, 2), torch.full((2, 2), 254))  # only ignored pixels
    with pytest.raises(ValueError, match="ignore index 254"):
        m.compute()
    with pytest.raises(ValueError, match="no image"):
        coco_evaluate(dict(images=[], annotations=[], categories=[dict(id=1, name="cat")]), [])


def test_segmentation_config_refuses_a_slide_stride_past_the_crop() -> None:
    """Training's validation settings are checked when the config is built, not at the first evaluation."""
    from transnext.dense.config import SegmentationConfig

    with pytest.raises(ValueError, match=r"eval_stride must be between 1 and crop_size \(40\).*got 50"):
        SegmentationConfig.from_dict(dict(crop_size=40, eval_mode="slide", eval_stride=50), require_data=False)
    SegmentationConfig.from_dict(dict(crop_size=40, eval_mode="slide", eval_stride=40), require_data=False)
    SegmentationConfig.from_dict(dict(crop_size=40, eval_mode="whole", eval_stride=50), require_data=False)  # unused
