"""Data-parallel training through torchrun: 2 CPU processes, gloo backend."""

from __future__ import annotations

import subprocess
import sys

import pytest

from train_helpers import REPO, cli_env, make_image_folder, train_flags

pytest.importorskip("timm")

import torch.distributed as dist  # noqa: E402

from transnext.engine.metrics import read_metrics  # noqa: E402
from transnext.engine.state import load_training_checkpoint  # noqa: E402


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_torchrun_two_processes_gloo(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=8, val_per_class=3)
    out = tmp_path / "ddp"
    # repeated augmentation (3 repeats) is on under DDP, as in the recipe
    flags = train_flags(data_dir=str(data), output=str(out), epochs=2, repeated_aug=3, mixup=0.8, cutmix=1.0,
                        smoothing=0.1, drop_path=0.1, device="cpu", total_batch_size=8)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "transnext.cli.main", "train", *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-5000:]}"
    rows = read_metrics(out / "metrics.jsonl")
    start = [x for x in rows if x["event"] == "start"][0]
    assert (start["world_size"], start["total_batch"], start["accum_steps"]) == (2, 8, 1)
    # RASampler: 24 images -> 12 samples per process and epoch -> 3 steps of 4
    assert start["steps_per_epoch"] == 3
    epochs = [x for x in rows if x["event"] == "epoch"]
    assert len(epochs) == 2 and all(e["val_images"] == 9 for e in epochs)  # shards summed, none counted twice
    end = [x for x in rows if x["event"] == "end"][0]
    assert end["global_step"] == 6 and end["replicas_in_sync"] is True and len(end["replica_digests"]) == 2
    ck = load_training_checkpoint(out / "last.pth")
    assert len(ck["rng"]) == 2  # both processes' random states, for an exact resume
    assert not any(k.startswith("module.") for k in ck["model"])
