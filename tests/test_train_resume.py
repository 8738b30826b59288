"""Killing a training process mid-epoch (SIGKILL) and resuming gives bitwise the same weights."""

from __future__ import annotations

import signal

import pytest
import torch

from train_helpers import make_image_folder, run_cli, signal_flag, train_flags

pytest.importorskip("timm")

from transnext.engine.metrics import read_metrics  # noqa: E402
from transnext.engine.state import load_training_checkpoint  # noqa: E402


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=8, val_per_class=2)
    # every source of randomness of the recipe: RandAugment, random erasing, Mixup/CutMix with label
    # smoothing, stochastic depth, a data-loader worker process; 6 steps per epoch, 2 epochs
    opts = dict(data_dir=str(data), epochs=2, aa="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0,
                smoothing=0.1, drop_path=0.2, num_workers=1, deterministic=True, save_every_steps=4, seed=7)
    ref = tmp_path / "uninterrupted"
    run_cli("train", *train_flags(output=str(ref), **opts), check=True, subprocess_=True)

    out = tmp_path / "killed"
    flags = train_flags(output=str(out), **opts)
    # killed after global step 11 (epoch 2, step 5); the last save was at step 8 (epoch 2, step 2)
    r = run_cli("train", *flags, *signal_flag(11, "SIGKILL"), subprocess_=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    ck = load_training_checkpoint(out / "last.pth")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 2, 8)
    assert not list(out.glob(".*.tmp")), "a temporary checkpoint file was left behind"

    r = run_cli("train", *flags, "--resume", "auto", check=True, subprocess_=True)
    assert "resumed from" in r.stderr and "epoch 2, step 2/6" in r.stderr

    a = load_training_checkpoint(ref / "last.pth")
    b = load_training_checkpoint(out / "last.pth")
    assert a["global_step"] == b["global_step"] == 12
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # the logged losses of the resumed run are the uninterrupted run's, step for step
    la = [(r["global_step"], r["loss"]) for r in read_metrics(ref / "metrics.jsonl") if r["event"] == "step"]
    lb = [(r["global_step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"]
    assert la == lb and len(la) == 12
