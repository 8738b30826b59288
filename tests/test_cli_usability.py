"""Documented commands behave as documented: dense defaults and help, --print-config, demo and benchmark help,
``visualize cam`` / ``erf``, and ``detect|segment predict`` (threshold, overlays, batching, unreadable files)."""

from __future__ import annotations

import itertools
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from train_helpers import make_image_folder, one_thread, run_cli, save_tiny_checkpoint, write_corrupt  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

TRUNK = dict(embed_dims=(8, 16, 32, 64), num_heads=(1, 1, 2, 4), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2))
DET_CLASSES = ["__background__", "bear", "cat", "dog"]


# ---------------------------------------------------------------------- 1, 2. dense train defaults and --print-config
@pytest.mark.parametrize("task", ["detect", "segment"])
def test_dense_train_without_preset_has_dense_defaults(task: str) -> None:
    r = run_cli(task, "train", "--print-config", check=True)  # no data needed to print
    cfg = json.loads(r.stdout)
    assert cfg["batch_size"] == 2 and cfg["total_batch_size"] == 16
    assert cfg["mixup"] == 0 and cfg["cutmix"] == 0 and cfg["aa"] is None and cfg["smoothing"] == 0 and cfg["reprob"] == 0
    assert cfg["repeated_aug"] == 1 and cfg["pos_bias"] == "interpolate"
    if task == "detect":
        assert cfg["epochs"] == 12 and cfg["sched"] == "step" and cfg["lr"] == 1e-4 and cfg["img_size"] == 800
    else:
        assert cfg["sched"] == "poly" and cfg["lr"] == 6e-5 and cfg["img_size"] == 512
    # explicit flags still win over the dense defaults
    assert json.loads(run_cli(task, "train", "--print-config", "--batch-size", "8", "--mixup", "0.2", check=True).stdout)["batch_size"] == 8


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_dense_train_help_shows_dense_defaults_only(task: str) -> None:
    r = run_cli(task, "train", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "--batch-size INT (default: 2)" in text and "--batch-size INT (default: 128)" not in text
    for flag in ("--mixup", "--cutmix", "--smoothing", "--aa", "--reprob", "--color-jitter", "--crop-pct"):
        assert not re.search(rf"{flag}\b", text), flag
    assert "ImageFolder" not in text
    # the hidden classification options are still accepted (config files of older runs)
    assert json.loads(run_cli(task, "train", "--print-config", "--mixup", "0.3", check=True).stdout)["mixup"] == 0.3


def test_classification_train_help_keeps_its_defaults() -> None:
    text = " ".join(run_cli("train", "--help").stdout.split())
    assert "--mixup FLOAT (default: 0.8)" in text and "--batch-size INT (default: 128)" in text


@pytest.mark.parametrize("task,recipe,layout", [("detect", "mask_rcnn_1x_tiny", "COCO layout"),
                                                ("segment", "upernet_160k_tiny", "ADE20K layout")])
def test_print_config_needs_no_data_and_missing_data_names_the_dense_layout(task: str, recipe: str, layout: str) -> None:
    r = run_cli(task, "train", "--preset", recipe, "--print-config")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["model"] == "transnext_tiny" and cfg["preset"] == recipe and cfg["data_dir"] is None
    r = run_cli(task, "train", "--preset", recipe, "--epochs", "1")
    assert r.returncode == 1
    assert f"no training data: pass --data-dir DIR ({layout}" in r.stderr and "ImageFolder" not in r.stderr
    r = run_cli("train", "--epochs", "1")  # classification keeps its own layout
    assert r.returncode == 1 and "an ImageFolder tree with train/ and val/" in r.stderr


# ---------------------------------------------------------------------- 3. demo help quotes the demo recipes
@pytest.mark.parametrize("task", ["detect", "segment"])
def test_demo_help_epochs_are_the_recipes(task: str) -> None:
    from transnext.dense.config import DENSE_RECIPES

    recipe = DENSE_RECIPES[f"{task}_demo"]
    help_text = " ".join(run_cli(task, "demo", "--help").stdout.split())
    assert int(re.search(r"\((\d+) epochs", help_text).group(1)) == recipe["epochs"]
    assert int(re.search(rf"recipe {task}_demo: (\d+)\)", help_text).group(1)) == recipe["epochs"]
    assert f"batch {recipe['batch_size']}" in help_text
    listing = " ".join(run_cli(task, "--help").stdout.split())
    assert f"({recipe['epochs']} epochs" in listing


# ---------------------------------------------------------------------- 4. benchmark --help shows defaults
def test_benchmark_help_shows_defaults(capsys) -> None:
    r = run_cli("benchmark", "--help")
    text = " ".join(r.stdout.split())
    for expected in ("(default: transnext_tiny)", "(default: 224x224)", "(default: 8)", "(default: cpu)", "(default: fp32)",
                     "(default: 5)", "(default: benchmark.json)", "(default: infer train)"):
        assert expected in text, expected
    assert "(default: None)" not in text and "(default: False)" not in text
    from transnext.benchmark.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "(default: 224x224)" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------------- 5. visualize cam / erf
@pytest.fixture(scope="module")
def cls_setup(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cam")
    # a 32 px model with a centre crop: labels at 224 px or without the crop would differ
    save_tiny_checkpoint(d / "tiny.pth", num_classes=10, classes=[f"c{i}" for i in range(10)], seed=1, crop_pct=0.6)
    make_image_folder(d / "imgs", classes=3, per_class=2, splits=("a",), size=48)
    return d


def _top_labels(lines: list[str]) -> list[str]:
    return [line.split(": ", 1)[1].split(" ")[0] for line in lines if ": " in line and not line.startswith("wrote")]


def test_cam_takes_positional_images_and_the_checkpoints_model_and_transform(cls_setup: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("pytorch_grad_cam")
    d = cls_setup
    out = tmp_path / "cam.png"
    r = run_cli("visualize", "cam", "--checkpoint", str(d / "tiny.pth"), str(d / "imgs"), "--num-images", "6",
                "--methods", "eigencam", "--topk", "1", "--out", str(out), check=True)
    cam = _top_labels(r.stdout.splitlines())
    assert len(cam) == 6 and out.stat().st_size > 1000 and "class_0/img_0" in r.stdout
    p = run_cli("predict", str(d / "imgs"), "--checkpoint", str(d / "tiny.pth"), "--topk", "1", check=True)
    assert cam == _top_labels(p.stdout.splitlines())
    # --images keeps working, alone or beside positional paths
    r2 = run_cli("visualize", "cam", "--checkpoint", str(d / "tiny.pth"), "--images", str(d / "imgs"), "--num-images", "6",
                 "--methods", "eigencam", "--topk", "1", "--out", str(out), check=True)
    assert _top_labels(r2.stdout.splitlines()) == cam


def test_attention_uses_the_model_the_checkpoint_records(cls_setup: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "attn.png"
    r = run_cli("visualize", "attention", "--checkpoint", str(cls_setup / "tiny.pth"), "--img-size", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "fovea weight" in r.stdout and out.is_file() and "randomly initialised" not in r.stderr


def test_cam_rows_do_not_overlap(monkeypatch, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from transnext.visualize import plot
    from transnext.visualize.cam import CamResult

    figs = []
    monkeypatch.setattr(plot, "_save", lambda fig, path, dpi: figs.append(fig) or Path(path))
    # tall images and five labels: the old fixed-size grid ran each row's title into the row above
    results = [CamResult({"gradcam": torch.rand(32, 20), "eigencam": torch.rand(32, 20)}, 1, [(k, 0.2) for k in range(5)])
               for _ in range(3)]
    plot.plot_cam(torch.rand(3, 3, 32, 20), results, ["great white shark", "b", "c", "d", "e"], tmp_path / "x.png", ["n0", "n1", "n2"])
    fig = figs[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = np.array(fig.axes).reshape(3, 3)
    for i in range(1, 3):
        title = axes[i, 0].title.get_window_extent(renderer)
        above = axes[i - 1, 0].get_window_extent(renderer)
        assert title.y1 <= above.y0, (i, title, above)  # display y grows upwards


def test_erf_random_init_note_names_its_own_option(capsys) -> None:
    pytest.importorskip("matplotlib")
    from transnext.cli import visualize
    from transnext.cli.main import build_parser

    args = build_parser().parse_args(["visualize", "erf", "--models", "transnext_micro"])
    visualize._weights_note(args, args.models)
    err = capsys.readouterr().err
    assert "--models NAME=PATH" in err and "--checkpoint" not in err
    args = build_parser().parse_args(["visualize", "attention"])
    visualize._weights_note(args, ["transnext_tiny"])
    assert "--checkpoint PATH" in capsys.readouterr().err


# ---------------------------------------------------------------------- 6, 7. dense predict
def test_palette_colours_are_well_separated() -> None:
    from transnext.dense.visualize import palette

    colours = palette(10)
    assert len(set(colours)) == 10
    assert min(math.dist(a, b) for a, b in itertools.combinations(colours, 2)) > 100
    assert palette(3) == colours[:3]  # indexed by class, whatever the number of classes


def test_label_boxes_stay_inside_the_image() -> None:
    from transnext.dense.visualize import label_boxes

    W, H = 128, 96
    boxes = [(0, 0, 40, 30), (100, 2, 128, 40), (120, 50, 140, 100), (-5, 80, 30, 96), (60, 40, 80, 60), (60, 40, 80, 60)]
    sizes = [(70, 10)] * len(boxes)
    rects = label_boxes(boxes, sizes, (W, H))
    shown = [r for r in rects if r is not None]
    assert len(shown) >= 4
    for x1, y1, x2, y2 in shown:
        assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
    for a, b in itertools.combinations(shown, 2):  # no label covers another
        assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
    assert rects[0][1] == 0  # at the top edge: inside, below the box top
    assert rects[2][2] == W  # at the right edge: moved left, inside
    a, b = label_boxes([(60, 40, 80, 60)] * 2, [(70, 10)] * 2, (W, H))
    assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])  # a second label on the same box: elsewhere
    assert label_boxes([(0, 0, 10, 10)], [(400, 10)], (W, H))[0] == (0, 0, W, 12)  # wider than the image: cut, not moved out


@pytest.fixture(scope="module")
def det_checkpoint(tmp_path_factory) -> Path:
    from transnext.dense.config import DetectionConfig, resolve_dense_config
    from transnext.dense.modeling import build_dense_model, dense_arch
    from transnext.engine.state import save_training_checkpoint

    cfg = resolve_dense_config(DetectionConfig, None, None, dict(
        dataset="demo", model_kwargs=TRUNK, img_size=64, pretrain_size=64, drop_path=0.0, fpn_channels=16, representation_size=32,
        mask_layers=(8,), min_size=(64,), max_size=64, box_score_thresh=0.0, detections_per_img=20))
    arch = dense_arch(cfg, len(DET_CLASSES), "detect")
    torch.manual_seed(0)
    model = build_dense_model(arch)
    path = tmp_path_factory.mktemp("det") / "det.pth"
    save_training_checkpoint(path, {"model": model.state_dict(), "arch": arch, "classes": DET_CLASSES, "data_cfg": {"format": "coco"},
                                    "optimizer": {}, "epoch": 0, "step_in_epoch": 0, "global_step": 0, "config": {}})
    return path


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory) -> Path:
    from transnext.dense.config import SegmentationConfig, resolve_dense_config
    from transnext.dense.modeling import build_dense_model, dense_arch
    from transnext.engine.state import save_training_checkpoint

    cfg = resolve_dense_config(SegmentationConfig, None, None, dict(
        dataset="demo", model_kwargs=TRUNK, img_size=64, pretrain_size=64, drop_path=0.0, channels=16, aux_channels=8))
    arch = dense_arch(cfg, 3, "segment")
    torch.manual_seed(0)
    model = build_dense_model(arch)
    path = tmp_path_factory.mktemp("seg") / "seg.pth"
    save_training_checkpoint(path, {"model": model.state_dict(), "arch": arch, "classes": ["sky", "tree", "road"],
                                    "data_cfg": {"format": "masks", "resize_scale": [64, 64], "crop_size": 64, "eval_mode": "whole"},
                                    "optimizer": {}, "epoch": 0, "step_in_epoch": 0, "global_step": 0, "config": {}})
    return path


def _images(root: Path, n: int = 3, size: tuple[int, int] = (64, 48)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"im{i}.png")
    return root


def test_detect_predict_default_threshold_is_the_demos() -> None:
    from transnext.dense.config import DEFAULT_SCORE_THRESH

    args = __import__("transnext.cli.main", fromlist=["build_parser"]).build_parser().parse_args(
        ["detect", "predict", "x.png", "--checkpoint", "c.pth"])
    assert args.score_thresh is None and DEFAULT_SCORE_THRESH == 0.15
    assert "(default: 0.15" in " ".join(run_cli("detect", "predict", "--help").stdout.split())


def test_detect_predict_batch_size_gives_the_same_predictions(det_checkpoint: Path, tmp_path: Path) -> None:
    from transnext.dense import workflow

    imgs = _images(tmp_path / "imgs", n=3)
    _images(tmp_path / "imgs" / "other", n=1, size=(48, 64))  # another size: its own batch
    one = workflow.predict_detection(det_checkpoint, [imgs], tmp_path / "p1", score_thresh=0.0, device="cpu", batch_size=1)
    two = workflow.predict_detection(det_checkpoint, [imgs], tmp_path / "p2", score_thresh=0.0, device="cpu", batch_size=2)
    assert [r["path"] for r in one] == [r["path"] for r in two] and len(one) == 4
    assert sum(len(r["detections"]) for r in one) > 0
    for a, b in zip(one, two):
        assert [d["label"] for d in a["detections"]] == [d["label"] for d in b["detections"]]
        for da, db in zip(a["detections"], b["detections"]):
            assert da["score"] == pytest.approx(db["score"], abs=2e-3)
            assert da["box_xyxy"] == pytest.approx(db["box_xyxy"], abs=0.5)


def test_segment_predict_batch_size_gives_the_same_predictions(seg_checkpoint: Path, tmp_path: Path) -> None:
    from PIL import Image

    from transnext.dense import workflow

    imgs = _images(tmp_path / "imgs", n=3)
    one = workflow.predict_segmentation(seg_checkpoint, [imgs], tmp_path / "p1", device="cpu", batch_size=1)
    two = workflow.predict_segmentation(seg_checkpoint, [imgs], tmp_path / "p2", device="cpu", batch_size=2)
    for a, b in zip(one, two):
        la, lb = (np.asarray(Image.open(r["label_map"])) for r in (a, b))
        assert (la == lb).mean() > 0.999


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_dense_predict_skips_and_counts_unreadable_files(task: str, det_checkpoint: Path, seg_checkpoint: Path, tmp_path: Path) -> None:
    imgs = _images(tmp_path / "imgs", n=2)
    (imgs / "notes.jpg").write_text("these are notes, not a picture\n")
    write_corrupt(imgs / "cut.jpg", "truncated")
    ck = det_checkpoint if task == "detect" else seg_checkpoint
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = run_cli(task, "predict", str(imgs), "--checkpoint", str(ck), "--output", str(tmp_path / "out"), "--device", "cpu",
                    "--no-progress")
    assert r.returncode == 0, r.stderr
    said = " ".join(str(w.message) for w in caught) + r.stderr
    assert "notes.jpg" in said and "cut.jpg" in said
    assert "2 of 4 file(s) could not be read as images" in r.stderr
    recs = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert sorted(Path(x["path"]).name for x in recs if "error" not in x) == ["im0.png", "im1.png"]
    assert sorted(Path(x["path"]).name for x in recs if "error" in x) == ["cut.jpg", "notes.jpg"]
    r = run_cli(task, "predict", str(imgs / "notes.jpg"), "--checkpoint", str(ck), "--output", str(tmp_path / "o2"), "--device", "cpu")
    assert r.returncode == 1 and "1 of 1 file(s)" in r.stderr


def test_detection_overlay_labels_inside(det_checkpoint: Path, tmp_path: Path) -> None:
    from PIL import Image

    from transnext.dense import workflow

    imgs = _images(tmp_path / "imgs", n=1, size=(96, 64))
    recs = workflow.predict_detection(det_checkpoint, [imgs], tmp_path / "p", score_thresh=0.0, device="cpu")
    assert recs[0]["detections"] and Image.open(recs[0]["overlay"]).size == (96, 64)


def test_classification_print_config_needs_no_data(capsys):
    from transnext.cli.main import main

    assert main(["train", "--preset", "tiny", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"] == "transnext_tiny" and cfg["data_dir"] in (None, "")


def test_mask_rcnn_keeps_the_recorded_detections_per_image():
    pytest.importorskip("torchvision")
    from transnext.dense.config import DetectionConfig, resolve_dense_config
    from transnext.dense.modeling import build_dense_model, dense_arch

    cfg = resolve_dense_config(DetectionConfig, "detect_demo", None, {"detections_per_img": 12, "backbone_weights": None},
                               require_data=False)
    model = build_dense_model(dense_arch(cfg, 11, "detect"))
    assert model.roi_heads.detections_per_img == 12  # was torchvision's 100: the keyword vanished
