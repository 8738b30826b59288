"""Training quality of the dense tasks: the shared step schedule, the safe initial-checkpoint loader,
bf16 autocast, exact resume after SIGKILL, DDP replicas, determinism and images without objects."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools", reason="pycocotools is not installed (extra: dense)")
pytest.importorskip("timm")

from train_helpers import (  # noqa: E402
    DENSE_DET_OPTS,
    DENSE_SEG_OPTS,
    REPO,
    TINY_TRAIN,
    cli_env,
    dense_flags,
    make_image_folder,
    one_thread,  # noqa: F401  (a fixture)
    run_cli,
    signal_flag,
)
from transnext.checkpoints import CheckpointError  # noqa: E402
from transnext.dense.config import DetectionConfig, SegmentationConfig, resolve_dense_config  # noqa: E402
from transnext.dense.tasks import DetectionTask, SegmentationTask  # noqa: E402
from transnext.dense.train import train_detector, train_segmenter  # noqa: E402
from transnext.engine.config import TrainConfig, resolve_config  # noqa: E402
from transnext.engine.metrics import read_metrics  # noqa: E402
from transnext.engine.state import load_training_checkpoint  # noqa: E402
from transnext.engine.trainer import TrainRun, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    from transnext.data.dense_demo import write_dense_demo

    return write_dense_demo(tmp_path_factory.mktemp("dense_demo"), size=64, counts={"train": 8, "val": 2, "test": 2})


def det_cfg(root: Path, out: Path, **kw) -> DetectionConfig:
    """The detect_demo recipe on the tiny scenes with a tiny model (8 training images)."""
    return resolve_dense_config(DetectionConfig, "detect_demo", None, dict(DENSE_DET_OPTS, data_dir=str(root), output=str(out), **kw))


def seg_cfg(root: Path, out: Path, **kw) -> SegmentationConfig:
    """The segment_demo recipe on the tiny scenes with a tiny model (8 training images)."""
    return resolve_dense_config(SegmentationConfig, "segment_demo", None, dict(DENSE_SEG_OPTS, data_dir=str(root), output=str(out), **kw))


def step_lrs(out: Path) -> list[float]:
    return [r["lr"] for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"]


def multistep(t: int, base: float, warmup_t: int, warmup_lr: float, milestones: list[int], rate: float = 0.1) -> float:
    """The 1x schedule by hand: linear warm-up over ``warmup_t`` steps, then x ``rate`` from each milestone on."""
    factor = rate ** sum(t >= m for m in milestones)
    if t < warmup_t:
        return warmup_lr + t * (base * factor - warmup_lr) / warmup_t
    return base * factor


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# ---------------------------------------------------------------------- 1. the step schedule of the shared trainer
def test_step_schedule_is_a_shared_schedule_per_step_classification(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=3, per_class=2, splits=("train",))
    # 6 images / batch 2 = 3 steps per epoch, 12 epochs: x0.1 from step 24 (epoch 9) and step 33 (epoch 12)
    cfg = resolve_config(overrides=dict(TINY_TRAIN, data_dir=str(data), output=str(tmp_path / "run"), batch_size=2, epochs=12,
                                        lr=1e-2, sched="step", decay_milestones=(8, 11), decay_rate=0.1, warmup_steps=4,
                                        warmup_lr=1e-5))
    train(cfg)
    want = [multistep(t, 1e-2, 4, 1e-5, [24, 33]) for t in range(36)]
    assert step_lrs(tmp_path / "run") == pytest.approx(want, rel=1e-12)
    assert want[23] == pytest.approx(1e-2) and want[24] == pytest.approx(1e-3) and want[33] == pytest.approx(1e-4)


def test_step_schedule_per_epoch_classification(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=3, per_class=2, splits=("train",))
    cfg = resolve_config(overrides=dict(TINY_TRAIN, data_dir=str(data), output=str(tmp_path / "run"), batch_size=2, epochs=4,
                                        lr=1e-2, sched="step", decay_milestones=(2, 3), sched_per_step=False, warmup_epochs=0))
    train(cfg)
    assert step_lrs(tmp_path / "run") == pytest.approx([1e-2] * 6 + [1e-3] * 3 + [1e-4] * 3, rel=1e-12)


def test_step_schedule_of_a_detection_run(demo_root: Path, tmp_path: Path) -> None:
    # 8 scenes / batch 2 = 4 steps per epoch; the milestones are epochs, the warm-up iterations (as in the 1x recipe)
    cfg = det_cfg(demo_root, tmp_path / "run", batch_size=2, epochs=3, lr=1e-3, backbone_lr_mult=1.0, sched="step", decay_milestones=(1, 2),
                  warmup_steps=3, warmup_lr=1e-6, eval_every=3, num_workers=0)
    summary = train_detector(cfg)
    assert summary["global_step"] == 12
    want = [multistep(t, 1e-3, 3, 1e-6, [4, 8]) for t in range(12)]
    assert step_lrs(tmp_path / "run") == pytest.approx(want, rel=1e-12)
    # the recipe resolves to the shared schedule, with no subclass of the run in between
    m = resolve_dense_config(DetectionConfig, "mask_rcnn_1x_tiny", None, {"data_dir": "coco"})
    assert (m.sched, m.decay_milestones, m.decay_rate, m.warmup_steps) == ("step", (8.0, 11.0), 0.1, 500)
    import transnext.dense.train as dense_train

    assert not hasattr(dense_train, "DenseTrainRun")


@pytest.mark.parametrize(("opts", "message"), [
    (dict(sched="steps"), "sched must be 'cosine', 'poly', 'step' or 'constant', got 'steps'"),
    (dict(sched="step", decay_milestones=(11, 8)),
     r"decay_milestones must be one or more increasing epochs >= 0 \(e.g. 8 11\), got \(11.0, 8.0\)"),
    (dict(sched="step", decay_milestones=()), "decay_milestones must be one or more increasing epochs"),
    (dict(sched="step", decay_milestones=(-1, 2)), "decay_milestones must be one or more increasing epochs"),
    (dict(sched="step", decay_rate=0.0), r"decay_rate must be in \(0, 1\] .* got 0.0"),
    (dict(sched="step", decay_rate=2.0), r"decay_rate must be in \(0, 1\]"),
])
def test_step_schedule_validation(opts: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(dataset="demo", **opts).validate()
    with pytest.raises(ValueError, match=message):
        DetectionConfig(dataset="demo", **opts).validate()
    DetectionConfig(dataset="demo", sched="cosine", decay_rate=2.0).validate()  # only checked for sched="step"


# ---------------------------------------------------------------------- 2. initial checkpoint through the safe loader
def test_initial_checkpoint_goes_through_the_safe_loader(demo_root: Path, tmp_path: Path) -> None:
    from transnext.engine.state import save_training_checkpoint

    cfg = det_cfg(demo_root, tmp_path / "a", num_workers=0)
    task = DetectionTask()
    data = task.build_data(cfg, TrainRun(cfg).info)
    model = task.build_model(cfg, data, init_weights=True)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    # a good checkpoint loads (whatever fits: all of it here)
    good = tmp_path / "good.pth"
    with torch.no_grad():
        for v in sd.values():
            if v.is_floating_point():
                v.add_(0.5)
    save_training_checkpoint(good, {"model": sd, "optimizer": {}})
    loaded = task.build_model(det_cfg(demo_root, tmp_path / "a", num_workers=0, initial_checkpoint=str(good)), data, init_weights=True)
    assert_same_weights(loaded.state_dict(), sd)
    # one NaN: refused with the loader's message, naming the tensor
    name = "roi_heads.box_predictor.cls_score.weight"
    sd[name][0, 0] = math.nan
    bad = tmp_path / "bad.pth"
    save_training_checkpoint(bad, {"model": sd, "optimizer": {}})
    with pytest.raises(CheckpointError, match=rf"non-finite weights \(NaN/Inf\) in 1 tensor\(s\): {name} \[{name}: 1 NaN, 0 Inf"):
        train_detector(det_cfg(demo_root, tmp_path / "b", num_workers=0, initial_checkpoint=str(bad)))
    seg = seg_cfg(demo_root, tmp_path / "c", num_workers=0, initial_checkpoint=str(good))
    with pytest.raises(ValueError, match="no tensor matches this model"):  # a detector's weights do not fit UPerNet
        seg_task = SegmentationTask()
        seg_task.build_model(seg, seg_task.build_data(seg, TrainRun(seg).info), init_weights=True)


# ---------------------------------------------------------------------- 4. bf16 autocast
def test_mask_rcnn_bf16_training_step_and_evaluation(demo_root: Path, tmp_path: Path) -> None:
    from transnext.dense.tasks import _autocast

    cfg = det_cfg(demo_root, tmp_path / "run", amp="bf16", num_workers=0, epochs=1, batch_size=4)
    run = TrainRun(cfg, DetectionTask())
    run.setup()
    assert run.amp == "bf16"
    seen: list[torch.dtype] = []
    hook = run.model.backbone.body.register_forward_hook(lambda m, i, o: seen.append(next(iter(o.values())).dtype))
    loss, n, logs, _, _ = run.train_step(iter(run.loader), 0, 0)
    hook.remove()
    assert seen == [torch.bfloat16]  # the trunk ran under autocast
    assert n == 4 and math.isfinite(loss) and set(logs) >= {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"}
    assert all(math.isfinite(v) for v in logs.values())
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    metrics = run.evaluate()
    assert metrics["n"] == 2 and all(math.isfinite(metrics[k]) for k in ("bbox_AP", "segm_AP"))
    # the dense evaluations follow the shared AMP rule; unset means full precision
    assert isinstance(_autocast(torch.device("cpu"), "bf16"), torch.autocast)
    with _autocast(torch.device("cpu"), None):
        assert not torch.is_autocast_enabled("cpu")
    # a whole short run in bf16, evaluations included
    summary = train_detector(det_cfg(demo_root, tmp_path / "full", amp="bf16", num_workers=0, epochs=1, batch_size=4))
    assert summary["global_step"] == 2 and math.isfinite(summary["best_metrics"]["bbox_AP"])


@pytest.mark.parametrize("detector", ["mask_rcnn", "retinanet"])
def test_bf16_keeps_anchors_and_boxes_in_float32(detector: str) -> None:
    from transnext.dense import maskrcnn_transnext, retinanet_transnext

    trunk = dict(DENSE_DET_OPTS["model_kwargs"], img_size=64, drop_path_rate=0.0)
    torch.manual_seed(0)
    if detector == "mask_rcnn":
        model = maskrcnn_transnext("transnext_micro", num_classes=3, backbone_kwargs=trunk, fpn_channels=16, representation_size=32,
                                   mask_layers=(8,), min_size=640, max_size=640, box_score_thresh=0.0, rpn_pre_nms_top_n_test=200,
                                   rpn_post_nms_top_n_test=100)
    else:
        model = retinanet_transnext("transnext_micro", num_classes=3, backbone_kwargs=trunk, fpn_channels=32, min_size=640, max_size=640,
                                    score_thresh=0.0)
    image = [torch.rand(3, 640, 640)]
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.eval()(image)[0]
            maps = model.backbone(torch.rand(1, 3, 64, 64))
    boxes = out["boxes"]
    assert boxes.dtype == torch.float32 and all(m.dtype == torch.float32 for m in maps.values())
    # bf16 boxes would all lie on a 4 px grid beyond 512 px
    far = boxes[boxes > 520]
    assert far.numel() > 10 and float(((far / 4).frac() == 0).float().mean()) < 0.5
    params = dict(model.named_parameters())
    assert dict(model.state_dict()).keys() >= params.keys()  # no wrapper module: the checkpoint keys are unchanged
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()(image, [dict(boxes=torch.tensor([[600.0, 610, 630, 635]]), labels=torch.tensor([1]),
                                   masks=torch.ones(1, 640, 640, dtype=torch.uint8))])


# ---------------------------------------------------------------------- 7. images without objects
def _empty_detection_batch(n: int = 2, size: int = 64) -> tuple:
    targets = [dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64), masks=torch.zeros(0, size, size, dtype=torch.uint8),
                    image_id=i, iscrowd=torch.zeros(0, dtype=torch.int64), area=torch.zeros(0)) for i in range(n)]
    return [torch.rand(3, size, size) for _ in range(n)], targets, 0


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_detection_batch_without_boxes_trains_without_nan(demo_root: Path, tmp_path: Path, amp: str) -> None:
    run = TrainRun(det_cfg(demo_root, tmp_path / "run", num_workers=0, amp=amp, clip_grad=5.0), DetectionTask())
    run.setup()
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    grads: list[bool] = []

    class Batches:
        def __iter__(self):
            return self

        def __next__(self):
            return _empty_detection_batch()

    loss, n, logs, _, _ = run.train_step(Batches(), 0, 0)
    assert n == 2 and math.isfinite(loss) and loss > 0  # background classification and objectness still learn
    assert logs["loss_box_reg"] == 0 and logs["loss_mask"] == 0 and logs["loss_rpn_box_reg"] == 0
    for p in run.model.parameters():
        grads.append(bool(torch.isfinite(p).all()))
    assert all(grads)
    changed = [k for k, v in run.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("rpn.") for k in changed) and any(k.startswith("roi_heads.box_predictor.cls_score") for k in changed)


def test_segmentation_crop_all_ignore_trains_without_nan(demo_root: Path, tmp_path: Path) -> None:
    cfg = seg_cfg(demo_root, tmp_path / "run", num_workers=0)
    run = TrainRun(cfg, SegmentationTask())
    run.setup()
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    images = torch.rand(2, 3, cfg.crop_size, cfg.crop_size)
    labels = torch.full((2, cfg.crop_size, cfg.crop_size), cfg.ignore_index, dtype=torch.int64)
    loss, n, logs, _, _ = run.train_step(iter([(images, labels, 0)]), 0, 0)
    assert n == 2 and loss == 0.0 and logs == {"loss_seg": 0.0, "loss_aux": 0.0}
    # nothing to learn from: the weights stay finite (decoupled weight decay may shrink them, nothing more)
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    for k, v in run.model.state_dict().items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k
    # and the next, normal batch still trains
    loss, *_ = run.train_step(iter(run.loader), 0, 1)
    assert math.isfinite(loss) and loss > 0
    assert any(not torch.equal(v, before[k]) for k, v in run.model.state_dict().items() if v.is_floating_point())


# ---------------------------------------------------------------------- 3. resume after SIGKILL
def test_detection_sigkill_then_resume_auto_is_exact(demo_root: Path, tmp_path: Path) -> None:
    # 8 scenes / batch 2 = 4 steps per epoch, 2 epochs; horizontal flips, RPN / RoI sampling and stochastic depth draw
    # random numbers, the loader runs one worker process (as the demo does)
    opts = dict(DENSE_DET_OPTS, data_dir=str(demo_root), batch_size=2, epochs=2, drop_path=0.1, num_workers=1, deterministic=True,
                save_every_steps=2, seed=5)
    ref = tmp_path / "uninterrupted"
    run_cli("detect", "train", "--preset", "detect_demo", *dense_flags(opts, output=str(ref)), check=True, subprocess_=True)
    out = tmp_path / "killed"
    flags = ["detect", "train", "--preset", "detect_demo", *dense_flags(opts, output=str(out))]
    # killed after global step 7 (epoch 2, step 3); the last save was at step 6 (epoch 2, step 2)
    r = run_cli(*flags, *signal_flag(7, "SIGKILL"), subprocess_=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    ck = load_training_checkpoint(out / "last.pth")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 2, 6)
    r = run_cli(*flags, "--resume", "auto", check=True, subprocess_=True)
    assert "resumed from" in r.stderr and "epoch 2, step 2/4" in r.stderr
    a, b = (load_training_checkpoint(d / "last.pth") for d in (ref, out))
    assert a["global_step"] == b["global_step"] == 8
    assert_same_weights(a["model"], b["model"])
    rows_a, rows_b = (read_metrics(d / "metrics.jsonl") for d in (ref, out))
    steps_a = [(r["global_step"], r["loss"], r["loss_mask"]) for r in rows_a if r["event"] == "step"]
    steps_b = [(r["global_step"], r["loss"], r["loss_mask"]) for r in rows_b if r["event"] == "step"]
    assert steps_a == steps_b and len(steps_a) == 8
    val_a, val_b = ([{k: v for k, v in r.items() if k.startswith("val_")} for r in rows if r["event"] == "epoch"]
                    for rows in (rows_a, rows_b))
    assert val_a == val_b and len(val_a) == 2 and "val_bbox_AP" in val_a[-1]
    assert a["best_metrics"] == b["best_metrics"]


# ---------------------------------------------------------------------- 5. DDP
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo")
@pytest.mark.parametrize("task", ["detect", "segment"])
def test_dense_ddp_two_processes_identical_replicas(task: str, demo_root: Path, tmp_path: Path) -> None:
    out, weights = tmp_path / "ddp", tmp_path / "weights"
    opts = dict(DENSE_DET_OPTS if task == "detect" else DENSE_SEG_OPTS, data_dir=str(demo_root), output=str(out), batch_size=2,
                epochs=2, device="cpu", num_workers=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "transnext.cli.main",
           task, "train", "--preset", f"{task}_demo", *dense_flags(opts),
           "--callback", f"train_helpers:SaveWeightsAtEnd:{json.dumps({'folder': str(weights)})}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-5000:]}"
    rows = read_metrics(out / "metrics.jsonl")
    start = next(x for x in rows if x["event"] == "start")
    assert (start["world_size"], start["steps_per_epoch"]) == (2, 2)  # 8 scenes over 2 processes, batch 2
    end = next(x for x in rows if x["event"] == "end")
    assert end["global_step"] == 4 and end["replicas_in_sync"] is True
    epochs = [x for x in rows if x["event"] == "epoch"]
    assert len(epochs) == 2 and all(e["val_images"] == 2 for e in epochs)
    r0, r1 = (torch.load(weights / f"rank{i}.pth", weights_only=True) for i in (0, 1))
    assert_same_weights(r0, r1)  # parameters and buffers (BatchNorm statistics included)
    assert_same_weights(r0, load_training_checkpoint(out / "last.pth")["model"])


# ---------------------------------------------------------------------- 6. determinism
@pytest.mark.parametrize("task", ["detect", "segment"])
def test_identical_dense_runs_are_identical(task: str, demo_root: Path, tmp_path: Path) -> None:
    # the demo's settings: one intra-op thread, one data-loader worker, the same seed; not --deterministic
    make, fn = (det_cfg, train_detector) if task == "detect" else (seg_cfg, train_segmenter)
    runs = []
    for name in ("a", "b"):
        cfg = make(demo_root, tmp_path / name, batch_size=2, epochs=2, seed=11)
        assert (cfg.num_workers, cfg.threads, cfg.deterministic) == (1, 1, False)
        summary = fn(cfg)
        rows = [{k: v for k, v in r.items() if not k.endswith(("_s", "_time_s")) and k not in ("img_per_s", "eta_s")}
                for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["event"] in ("step", "epoch")]
        runs.append((summary["best_metrics"], rows, load_training_checkpoint(tmp_path / name / "last.pth")))
    (best_a, rows_a, ck_a), (best_b, rows_b, ck_b) = runs
    assert rows_a == rows_b and len(rows_a) == 10  # 8 steps + 2 epoch records: losses, lr, validation metrics
    assert best_a == best_b
    assert_same_weights(ck_a["model"], ck_b["model"])
