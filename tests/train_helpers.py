"""Shared helpers of the training / evaluation / prediction tests: tiny models and image folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from transnext.engine.trainer import Callback

REPO = Path(__file__).resolve().parents[1]

# A TransNeXt with the real blocks, small enough for CPU tests (about 60k parameters).
TINY_ARCH = dict(
    embed_dims=[8, 16, 32, 64], num_heads=[1, 1, 2, 4], depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2],
    sr_ratios=[8, 4, 2, 1], window_size=[3, 3, 3, None],
)

# Options of a short, cheap training run (override per test).
TINY_TRAIN = dict(
    model="transnext_micro", model_kwargs=TINY_ARCH, img_size=32, pretrain_size=64, batch_size=4,
    total_batch_size=None, epochs=1, lr=1e-3, warmup_epochs=0, warmup_lr=1e-6, min_lr=1e-5, aa=None, reprob=0.0,
    mixup=0.0, cutmix=0.0, smoothing=0.0, repeated_aug=1, compile=False, amp="none", num_workers=0,
    crop_pct=1.0, drop_path=0.0, progress=False, log_every=1, dataset="folder",
)

COLORS = [(220, 40, 40), (40, 200, 60), (50, 60, 230), (230, 220, 40), (200, 60, 200)]


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 32, splits=("train", "val"),
                      val_per_class: int | None = None, seed: int = 0) -> Path:
    """ImageFolder tree of noisy solid-colour squares (one colour per class: learnable in a few steps)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        n = per_class if split == "train" or val_per_class is None else val_per_class
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.array(COLORS[c % len(COLORS)], dtype=np.float32)
                img = base + rng.normal(0, 25, (size, size, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"img_{i}.png")
    return root


def write_corrupt(path: Path, kind: str = "garbage") -> Path:
    """A file with an image extension that does not decode: 'garbage', 'truncated' or 'empty'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "garbage":
        path.write_bytes(b"this is not an image" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        from io import BytesIO

        from PIL import Image

        buf = BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # src first; tests/ too, so ``--callback train_helpers:SignalAtStep:...`` imports in a child process
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300, check: bool = False,
            subprocess_: bool = False) -> subprocess.CompletedProcess:
    """Run ``transnext ARGS``: in this process (fast) or, with ``subprocess_``/``env``, as a child process."""
    if not subprocess_ and env is None:
        import contextlib
        import io

        from transnext.cli.main import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse errors
                code = e.code if isinstance(e.code, int) else 2
        proc = subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
        if check and code != 0:
            raise AssertionError(f"exit {code}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
        return proc
    proc = subprocess.run(
        [sys.executable, "-m", "transnext.cli.main", *args], capture_output=True, text=True, env=env or cli_env(),
        timeout=timeout, cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def options_as_flags(opts: dict) -> list[str]:
    """Config options as command-line flags (booleans as --x / --no-x, None as "none", dicts as JSON)."""
    import json

    flags: list[str] = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, dict):
            flags += [flag, json.dumps(v)]
        elif isinstance(v, (list, tuple)):
            flags += [flag, *map(str, v)]
        else:
            flags += [flag, "none" if v is None else str(v)]
    return flags


def train_flags(**overrides) -> list[str]:
    """TINY_TRAIN (+ overrides) as command-line flags."""
    return options_as_flags(dict(TINY_TRAIN, **overrides))


def save_tiny_checkpoint(path: Path, num_classes: int = 3, classes=None, img_size: int = 32, seed: int = 0, **data_cfg):
    """A transnext checkpoint (weights + architecture + classes + eval data config) of the tiny model."""
    import torch

    from transnext.engine.modeling import create_model_with_arch
    from transnext.engine.state import save_training_checkpoint

    torch.manual_seed(seed)
    m = create_model_with_arch("transnext_micro", num_classes=num_classes, model_kwargs=TINY_ARCH, img_size=img_size, pretrain_size=64)
    cfg = dict(img_size=img_size, crop_pct=1.0, interpolation="bicubic", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    cfg.update(data_cfg)
    save_training_checkpoint(path, {
        "model": m.state_dict(), "arch": m.arch, "classes": list(classes) if classes else None, "data_cfg": cfg,
        "optimizer": {}, "epoch": 0, "step_in_epoch": 0, "global_step": 0, "config": {},
    })
    return m


class SignalAtStep(Callback):
    """Fault injection: the training process sends itself ``signal`` right after optimizer step ``step``."""

    def __init__(self, step: int, signal: str = "SIGKILL") -> None:
        import signal as signals

        self.step = step
        self.signum = getattr(signals, signal)

    def on_step_end(self, run, loss: float) -> None:
        if run.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def signal_flag(step: int, signal: str) -> list[str]:
    """``transnext train`` flags that make the run send itself ``signal`` after ``step``."""
    import json

    return ["--callback", f"train_helpers:SignalAtStep:{json.dumps({'step': step, 'signal': signal})}"]


@pytest.fixture
def one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one intra-op thread."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------- dense tasks
# A TransNeXt trunk and heads small enough for CPU tests of detection / segmentation on 64 px demo scenes.
DENSE_TRUNK = dict(embed_dims=[8, 16, 32, 64], num_heads=[1, 1, 2, 4], depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2])
_DENSE_COMMON = dict(dataset="folder", train_split="train", val_split="val", test_split="test", model_kwargs=DENSE_TRUNK,
                     img_size=64, pretrain_size=64, batch_size=4, epochs=2, lr=1e-3, threads=1, progress=False, log_every=1,
                     backbone_weights=None)  # random trunk (the demo recipes start from trained weights)
# overrides of the detect_demo recipe
DENSE_DET_OPTS = dict(_DENSE_COMMON, drop_path=0.0, min_size=[64], max_size=64, fpn_channels=16, representation_size=32,
                      mask_layers=[8], detections_per_img=10,
                      detector_kwargs=dict(rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50,
                                           rpn_post_nms_top_n_test=30, box_batch_size_per_image=32))
# overrides of the segment_demo recipe (animals against background, 2 classes)
DENSE_SEG_OPTS = dict(_DENSE_COMMON, drop_path=0.1, crop_size=64, resize_scale=[64, 64], channels=16, aux_channels=8)


def dense_flags(opts: dict, **overrides) -> list[str]:
    """Options of a dense run (e.g. DENSE_DET_OPTS + overrides) as ``transnext detect/segment train`` flags."""
    return options_as_flags(dict(opts, **overrides))


class SaveWeightsAtEnd(Callback):
    """Every process writes its final weights to ``<folder>/rank<r>.pth`` (to compare DDP replicas)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_run_end(self, run, summary) -> None:
        import torch

        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in run.model.state_dict().items()}, self.folder / f"rank{run.info.rank}.pth")
