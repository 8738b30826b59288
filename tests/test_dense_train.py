"""Dense models and training: builders on odd sizes, the UPerNet head, loss going down on the demo
scenes, recipes, checkpoint round trips, exact resume, and the detect / segment command lines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools", reason="pycocotools is not installed (extra: dense)")
pytest.importorskip("timm")

from train_helpers import run_cli  # noqa: E402
from transnext.dense import maskrcnn_transnext, retinanet_transnext, segmentation_loss, upernet_transnext  # noqa: E402
from transnext.dense.detection import fcos_transnext  # noqa: E402

TRUNK = dict(embed_dims=(8, 16, 32, 64), num_heads=(1, 1, 2, 4), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2), img_size=64,
             drop_path_rate=0.0)
DET_HEADS = dict(fpn_channels=16, representation_size=32, mask_layers=(8,), min_size=64, max_size=64, detections_per_img=10,
                 rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=30,
                 box_batch_size_per_image=32)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    from transnext.data.dense_demo import write_dense_demo

    return write_dense_demo(tmp_path_factory.mktemp("dense_demo"), size=64, counts={"train": 8, "val": 2, "test": 2})


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _targets(sizes):
    out = []
    for k, (h, w) in enumerate(sizes):
        masks = torch.zeros(1, h, w, dtype=torch.uint8)
        masks[0, 5:25, 8:30] = 1
        out.append(dict(boxes=torch.tensor([[8.0, 5, 30, 25]]), labels=torch.tensor([1 + k % 2]), masks=masks))
    return out


@pytest.mark.parametrize("builder", [maskrcnn_transnext, retinanet_transnext, fcos_transnext])
def test_detectors_on_odd_sizes_per_batch(builder, one_thread) -> None:
    torch.manual_seed(0)
    kwargs = dict(DET_HEADS) if builder is maskrcnn_transnext else dict(fpn_channels=32, min_size=64, max_size=96)  # GroupNorm(32) heads
    model = builder("transnext_micro", num_classes=3, backbone_kwargs=TRUNK, **kwargs)
    sizes = [(61, 77), (90, 47)]  # not multiples of 32, different per image
    images = [torch.rand(3, h, w) for h, w in sizes]
    losses = model.train()(images, _targets(sizes))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.body.model.patch_embed1.proj.weight.grad is not None
    with torch.no_grad():
        out = model.eval()(images)
    for o, (h, w) in zip(out, sizes):
        assert o["boxes"].shape[1] == 4 and (o["boxes"][:, 2] <= w + 1e-3).all() and (o["boxes"][:, 3] <= h + 1e-3).all()
        if builder is maskrcnn_transnext:
            assert o["masks"].shape[-2:] == (h, w)


def test_maskrcnn_matches_reference_layout() -> None:
    model = maskrcnn_transnext("transnext_micro", num_classes=81, backbone_kwargs=TRUNK)
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333
    assert model.backbone.out_channels == 256 and model.backbone.body.model.pos_bias == "interpolate"
    assert model.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert model.roi_heads.box_predictor.cls_score.out_features == 81
    retina = retinanet_transnext("transnext_micro", num_classes=81, backbone_kwargs=TRUNK, fpn_channels=32)
    assert retina.backbone.body.out_indices == (1, 2, 3)  # strides 8-32, P6/P7 from C5
    with torch.no_grad():
        maps = retina.backbone(torch.rand(1, 3, 128, 128))
    assert [m.shape[-1] for m in maps.values()] == [16, 8, 4, 2, 1]
    with pytest.raises(FileNotFoundError, match="backbone weights not found"):
        maskrcnn_transnext("transnext_micro", backbone_weights="no/such/file.pth", backbone_kwargs=TRUNK)


def test_upernet_head_structure_and_odd_sizes(one_thread) -> None:
    torch.manual_seed(0)
    model = upernet_transnext("transnext_micro", num_classes=5, channels=24, aux_channels=12, **{k: v for k, v in TRUNK.items()})
    head = model.decode_head
    assert [m[0].output_size for m in head.ppm] == [1, 2, 3, 6]
    assert head.ppm_bottleneck[0].in_channels == 64 + 4 * 24 and head.ppm_bottleneck[0].kernel_size == (3, 3)
    assert [c[0].in_channels for c in head.lateral_convs] == [8, 16, 32] and head.fpn_bottleneck[0].in_channels == 4 * 24
    assert isinstance(head.lateral_convs[0][1], torch.nn.BatchNorm2d) and head.lateral_convs[0][0].bias is None
    assert head.classifier[0].p == 0.1 and model.aux_head.convs[0][0].in_channels == 32  # aux head on stage 3
    x = torch.rand(2, 3, 67, 93)
    out = model.train()(x)
    assert out["out"].shape == out["aux"].shape == (2, 5, 67, 93)
    losses = segmentation_loss(out, torch.randint(0, 5, (2, 67, 93)))
    torch.testing.assert_close(losses["loss"], losses["loss_seg"] + losses["loss_aux"])
    with torch.no_grad():
        assert list(model.eval()(x)) == ["out"]  # the auxiliary head only runs in training
    # an all-ignored batch gives zero loss, not NaN
    assert segmentation_loss(model.train()(x), torch.full((2, 67, 93), 255))["loss"].item() == 0.0


def test_few_steps_reduce_loss_on_demo_scenes(demo_root: Path, one_thread) -> None:
    from transnext.data.coco import CocoDetection
    from transnext.data.segmentation import SegmentationDataset, SegmentationTrainTransform

    torch.manual_seed(0)
    ds = CocoDetection(demo_root / "images" / "train", demo_root / "annotations" / "instances_train.json")
    images, targets = zip(*(ds[i] for i in range(4)))
    det = maskrcnn_transnext("transnext_micro", num_classes=11, backbone_kwargs=TRUNK, **DET_HEADS).train()
    opt = torch.optim.AdamW(det.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        torch.manual_seed(1)  # the same RPN / RoI sampling every step: the loss of one fixed batch
        loss = sum(det(list(images), list(targets)).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses

    seg_ds = SegmentationDataset.ade20k(demo_root, "train", num_classes=11, transform=SegmentationTrainTransform(64, (64, 64), (1.0, 1.0)))
    x, y = (torch.stack(t) for t in zip(*(seg_ds[i] for i in range(4))))
    seg = upernet_transnext("transnext_micro", num_classes=11, channels=16, aux_channels=8, **TRUNK).train()
    opt = torch.optim.AdamW(seg.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = segmentation_loss(seg(x), y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_recipes_follow_the_reference() -> None:
    from transnext.dense.config import PUBLISHED, DetectionConfig, SegmentationConfig, resolve_dense_config

    m = resolve_dense_config(DetectionConfig, "mask_rcnn_1x_tiny", None, {"data_dir": "coco"})
    assert (m.lr, m.weight_decay, m.epochs, m.sched, m.decay_milestones, m.decay_rate) == (1e-4, 0.05, 12, "step", (8.0, 11.0), 0.1)
    assert (m.warmup_steps, m.warmup_lr, m.batch_size, m.total_batch_size, m.min_size, m.max_size) == (500, 1e-7, 2, 16, (800.0,), 1333)
    assert m.img_size == 800 and m.pretrain_size == 224 and m.pos_bias == "interpolate" and m.clip_grad is None
    u = resolve_dense_config(SegmentationConfig, "upernet_160k_small", None, {"data_dir": "ade"})
    assert (u.lr, u.sched, u.poly_power, u.min_lr, u.max_steps) == (6e-5, "poly", 1.0, 0.0, 160_000)
    assert (u.warmup_steps, u.warmup_lr, u.total_batch_size, u.batch_size) == (1500, 6e-5 * 1e-6, 16, 2)
    assert (u.crop_size, u.resize_scale, u.ratio_range, u.cat_max_ratio, u.num_classes) == (512, (2048.0, 512.0), (0.5, 2.0), 0.75, 150)
    assert PUBLISHED["upernet_160k_small"].endswith("52.2") and "49.9" in PUBLISHED["mask_rcnn_1x_tiny"]
    with pytest.raises(ValueError, match="unknown recipe"):
        resolve_dense_config(DetectionConfig, "mask_rcnn_3x", None, {})
    with pytest.raises(ValueError, match="detector must be"):
        resolve_dense_config(DetectionConfig, None, None, {"detector": "yolo", "dataset": "demo"})


def test_reference_no_decay_rule() -> None:
    from transnext.dense.tasks import reference_param_groups

    model = upernet_transnext("transnext_micro", num_classes=3, channels=8, aux_channels=8, **TRUNK)
    no_decay, decay = reference_param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert any("query_embedding" in n for n in nd) and any(".cpb" in n or "cpb" in n for n in nd)
    assert "backbone.model.norm1.weight" in nd and "backbone.model.block1.0.norm1.bias" in nd
    # as in the reference, head biases and BatchNorm weights keep their decay
    d = {names[id(p)] for p in decay["params"]}
    assert "decode_head.classifier.1.bias" in d and "decode_head.lateral_convs.0.1.weight" in d
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_step_schedule_of_mask_rcnn_recipe(demo_root: Path, tmp_path: Path, one_thread) -> None:
    from transnext.dense.config import DetectionConfig
    from transnext.dense.tasks import DetectionTask
    from transnext.engine.trainer import TrainRun

    cfg = DetectionConfig(dataset="folder", data_dir=str(demo_root), train_split="train", val_split="val", output=str(tmp_path),
                          model_kwargs={k: v for k, v in TRUNK.items() if k not in ("img_size", "drop_path_rate")}, img_size=64,
                          drop_path=0.0, batch_size=2, total_batch_size=None, epochs=4, lr=1e-3, sched="step",
                          decay_milestones=(2, 3), warmup_steps=2, warmup_lr=1e-6, num_workers=0, progress=False,
                          **{k: v for k, v in DET_HEADS.items() if k in ("fpn_channels", "representation_size", "max_size")},
                          min_size=(64,), mask_layers=(8,))
    cfg.validate()
    run = TrainRun(cfg, DetectionTask())
    run.setup()
    lrs = []
    for step in range(run.total_steps):
        run.scheduler.step_update(step)
        lrs.append(run.optimizer.param_groups[0]["lr"])
    spe = run.steps_per_epoch  # 8 images / batch 2
    assert spe == 4 and lrs[0] == pytest.approx(1e-6) and lrs[2] == pytest.approx(1e-3)
    assert lrs[2 * spe - 1] == pytest.approx(1e-3) and lrs[2 * spe] == pytest.approx(1e-4) and lrs[3 * spe] == pytest.approx(1e-5)


# ---------------------------------------------------------------------- command line
def _det_flags(root: Path, out: Path, **extra) -> list[str]:
    trunk = {k: v for k, v in TRUNK.items() if k not in ("img_size", "drop_path_rate")}
    flags = ["--dataset", "folder", "--data-dir", str(root), "--train-split", "train", "--val-split", "val",
             "--output", str(out), "--model-kwargs", json.dumps(trunk), "--img-size", "64", "--drop-path", "0",
             "--epochs", "1", "--batch-size", "4", "--num-workers", "0", "--no-progress", "--lr", "1e-3",
             "--min-size", "64", "--max-size", "64", "--fpn-channels", "16", "--representation-size", "32", "--mask-layers", "8",
             "--detections-per-img", "10", "--threads", "1", "--deterministic"]
    for k, v in extra.items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    return flags


def test_detect_cli_train_eval_predict(demo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_cli("detect", "train", "--preset", "detect_demo", *_det_flags(demo_root, out), check=True)
    assert "best val bbox_AP" in r.stdout
    for name in ("best.pth", "last.pth", "metrics.jsonl", "config.yaml"):
        assert (out / name).is_file(), name
    from transnext.engine.state import load_training_checkpoint

    ck = load_training_checkpoint(out / "best.pth")
    assert ck["arch"]["detector"] == "mask_rcnn" and ck["classes"][1] == "bear" and ck["label_to_cat_id"][1] == 1
    # round trip: eval of best.pth on the validation split reproduces the metrics recorded in training
    r = run_cli("detect", "eval", "--checkpoint", str(out / "best.pth"), "--data-dir", str(demo_root), "--split", "val",
                "--output", str(tmp_path / "ev"), "--no-progress", "--num-workers", "0", check=True)
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert res["metrics"]["bbox_AP"] == pytest.approx(ck["metrics"]["bbox_AP"], abs=1e-9)
    assert res["metrics"]["segm_AP"] == pytest.approx(ck["metrics"]["segm_AP"], abs=1e-9)
    assert "| bbox |" in r.stdout and "| bear |" in r.stdout and (tmp_path / "ev" / "eval.md").is_file()
    r = run_cli("detect", "predict", str(demo_root / "images" / "test"), "--checkpoint", str(out / "best.pth"),
                "--output", str(tmp_path / "pred"), "--score-thresh", "0.0", check=True)
    preds = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(preds) == 2 and Path(preds[0]["overlay"]).is_file()
    from PIL import Image

    assert Image.open(preds[0]["overlay"]).size == (64, 64)
    # a classification / foreign checkpoint is refused with a clear message
    r = run_cli("detect", "eval", "--checkpoint", str(tmp_path / "ev" / "eval.json"), "--data-dir", str(demo_root), "--split", "val")
    assert r.returncode == 1 and re.search(r"not a readable (PyTorch )?checkpoint", r.stderr), r.stderr


def test_detect_cli_bad_data_and_strict(demo_root: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    ann = data / "annotations" / "instances_train.json"
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["bbox"] = [3, 3, 0, 4]  # zero area
    ann.write_text(json.dumps(coco))
    r = run_cli("detect", "train", *_det_flags(data, tmp_path / "strict"), "--strict-data")
    assert r.returncode == 1 and "zero or negative width/height" in r.stderr and "--strict-data" in r.stderr
    ann.write_text("")
    r = run_cli("detect", "train", *_det_flags(data, tmp_path / "empty"))
    assert r.returncode == 1 and "is empty" in r.stderr
    r = run_cli("detect", "train", *_det_flags(tmp_path / "nowhere", tmp_path / "x"))
    assert r.returncode == 1 and "not found" in r.stderr


def _seg_flags(root: Path, out: Path, **extra) -> list[str]:
    trunk = {k: v for k, v in TRUNK.items() if k not in ("img_size", "drop_path_rate")}
    flags = ["--dataset", "folder", "--data-dir", str(root), "--train-split", "train", "--val-split", "val", "--num-classes", "11",
             "--output", str(out), "--model-kwargs", json.dumps(trunk), "--img-size", "64", "--drop-path", "0.1",
             "--epochs", "2", "--batch-size", "4", "--num-workers", "0", "--no-progress", "--lr", "1e-3", "--crop-size", "64",
             "--resize-scale", "64", "64", "--channels", "16", "--aux-channels", "8", "--threads", "1", "--deterministic",
             "--log-every", "1", "--no-foreground-only"]
    for k, v in extra.items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    return flags


def test_segment_cli_train_eval_predict(demo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_cli("segment", "train", "--preset", "segment_demo", *_seg_flags(demo_root, out), check=True)
    assert "best val mIoU" in r.stdout
    from transnext.engine.state import load_training_checkpoint

    ck = load_training_checkpoint(out / "best.pth")
    assert ck["classes"][0] == "background" and ck["arch"]["task"] == "segment"
    r = run_cli("segment", "eval", "--checkpoint", str(out / "best.pth"), "--data-dir", str(demo_root), "--split", "val",
                "--output", str(tmp_path / "ev"), "--no-progress", "--num-workers", "0", check=True)
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())["metrics"]
    assert res["mIoU"] == pytest.approx(ck["metrics"]["mIoU"], abs=1e-9) and res["aAcc"] == pytest.approx(ck["metrics"]["aAcc"], abs=1e-9)
    assert "| background |" in r.stdout
    r = run_cli("segment", "eval", "--checkpoint", str(out / "best.pth"), "--data-dir", str(demo_root), "--split", "val",
                "--mode", "slide", "--crop", "48", "--stride", "32", "--scales", "0.75", "1.0", "--flip", "--no-progress",
                "--num-workers", "0", check=True)
    assert "mIoU" in r.stdout
    r = run_cli("segment", "predict", str(demo_root / "images" / "test" / "000000.png"), "--checkpoint", str(out / "best.pth"),
                "--output", str(tmp_path / "pred"), check=True)
    preds = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    from PIL import Image

    assert Image.open(preds[0]["label_map"]).size == (64, 64) and Image.open(preds[0]["overlay"]).size[0] > 64
    assert abs(sum(preds[0]["classes"].values()) - 1) < 1e-3
    r = run_cli("detect", "eval", "--checkpoint", str(out / "best.pth"), "--data-dir", str(demo_root), "--split", "val")
    assert r.returncode == 1 and "holds a segment model, not a detect model" in r.stderr


def test_segment_resume_is_exact(demo_root: Path, tmp_path: Path, one_thread) -> None:
    from transnext.dense.config import SegmentationConfig, resolve_dense_config
    from transnext.dense.train import train_segmenter
    from transnext.engine.state import load_training_checkpoint
    from transnext.engine.trainer import Callback, TrainingInterrupted

    trunk = {k: v for k, v in TRUNK.items() if k not in ("img_size", "drop_path_rate")}
    opts = dict(dataset="folder", data_dir=str(demo_root), train_split="train", val_split="val", num_classes=11, model_kwargs=trunk,
                img_size=64, drop_path=0.1, epochs=2, batch_size=4, num_workers=0, progress=False, lr=1e-3, crop_size=64,
                resize_scale=(64, 64), channels=16, aux_channels=8, deterministic=True, seed=3, foreground_only=False)

    class StopAt(Callback):
        def on_step_end(self, run, loss):
            if run.global_step == 3:
                run.request_stop()

    ref = train_segmenter(resolve_dense_config(SegmentationConfig, "segment_demo", None, dict(opts, output=str(tmp_path / "a"))))
    cfg = resolve_dense_config(SegmentationConfig, "segment_demo", None, dict(opts, output=str(tmp_path / "b")))
    with pytest.raises(TrainingInterrupted):
        train_segmenter(cfg, [StopAt()])
    assert load_training_checkpoint(tmp_path / "b" / "last.pth")["global_step"] == 3  # mid-epoch 2 (2 steps per epoch)
    cfg = resolve_dense_config(SegmentationConfig, "segment_demo", None, dict(opts, output=str(tmp_path / "b"), resume="auto"))
    res = train_segmenter(cfg)
    a, b = (load_training_checkpoint(tmp_path / d / "last.pth") for d in ("a", "b"))
    assert a["global_step"] == b["global_step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resume"
    assert res["best_metrics"]["mIoU"] == pytest.approx(ref["best_metrics"]["mIoU"])


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_demo_cli_end_to_end_on_tiny_scenes(task: str, demo_root: Path, tmp_path: Path) -> None:
    import yaml

    trunk = {k: v for k, v in TRUNK.items() if k not in ("img_size", "drop_path_rate")}
    opts: dict = dict(data_dir=str(demo_root), model_kwargs=trunk, img_size=64, pretrain_size=64, epochs=1, batch_size=4,
                      num_workers=0, threads=1, log_every=1)
    if task == "detect":
        opts.update(min_size=[64], max_size=64, fpn_channels=16, representation_size=32, mask_layers=[8], detections_per_img=10)
    else:
        opts.update(crop_size=64, resize_scale=[64, 64], channels=16, aux_channels=8)
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(opts))
    out = tmp_path / "demo"
    r = run_cli(task, "demo", "--output", str(out), "--config", str(tmp_path / "small.yaml"), "--no-progress", "--num-predict", "2",
                check=True)
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["test_images"] == 2 and len(list((out / "predictions").glob("*.png"))) >= 2
    if task == "detect":
        assert "held-out test: box AP" in r.stdout and "trivial baseline box AP" in r.stdout
        assert 0 <= summary["baseline_bbox_AP"] <= 100 and "test_segm_AP" in summary
    else:
        assert "held-out test: mIoU" in r.stdout and "trivial baseline ('background' everywhere)" in r.stdout
        assert summary["baseline_class"] == "background" and summary["baseline_mIoU"] < 100
    assert (out / "best.pth").is_file() and (out / "test_eval" / "eval.md").is_file()


def test_layer_decay_and_backbone_lr_groups() -> None:
    from transnext.dense.config import SegmentationConfig
    from transnext.dense.tasks import dense_param_groups

    model = upernet_transnext("transnext_micro", num_classes=3, channels=8, aux_channels=8, **TRUNK)
    cfg = SegmentationConfig(dataset="demo", layer_decay=0.5, backbone_lr_mult=0.1)
    groups = dense_param_groups(model, cfg)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["decode_head.classifier.1.weight"])] == 1.0  # heads: full lr
    # trunk layers (timm group_matcher, fine): stem, then each block, the stage norm joining its last block
    stem = scale[id(named["backbone.model.patch_embed1.proj.weight"])]
    first = scale[id(named["backbone.model.block1.0.attn.q.weight"])]
    last = scale[id(named["backbone.model.norm4.weight"])]
    assert first == pytest.approx(2 * stem) and last == pytest.approx(0.1 * 0.5) and stem < first < last
    assert sum(len(g["params"]) for g in groups) == len(named)
    # no decay on the reference keys, in every lr group
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p is named["backbone.model.norm4.weight"] for p in g["params"]))


def test_anchor_sizes_reach_the_detectors() -> None:
    from transnext.dense.config import DetectionConfig, resolve_dense_config
    from transnext.dense.modeling import build_dense_model, dense_arch

    trunk = {k: v for k, v in TRUNK.items() if k not in ("img_size", "drop_path_rate")}
    opts = dict(dataset="demo", model_kwargs=trunk, img_size=64, fpn_channels=32, anchor_sizes=(8, 16, 32, 64, 128))
    cfg = resolve_dense_config(DetectionConfig, None, None, dict(opts, drop_path=0.0))
    assert build_dense_model(dense_arch(cfg, 4, "detect")).rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    cfg = resolve_dense_config(DetectionConfig, None, None, dict(opts, drop_path=0.0, detector="retinanet"))
    assert build_dense_model(dense_arch(cfg, 4, "detect")).anchor_generator.sizes[0] == (8, 10, 12)
