"""Training: presets, configuration, the loop's features, checkpoints, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from train_helpers import (
    TINY_TRAIN,
    make_image_folder,
    one_thread,  # noqa: F401
    run_cli,
    train_flags,
    write_corrupt,
)

pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")

from transnext.checkpoints import CheckpointError  # noqa: E402
from transnext.data import DataError  # noqa: E402
from transnext.engine import PRESETS, TrainConfig, TrainingError, resolve_config, train  # noqa: E402
from transnext.engine.config import load_config_file  # noqa: E402
from transnext.engine.metrics import read_metrics  # noqa: E402
from transnext.engine.state import load_training_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=8, val_per_class=4)


def cfg_for(data, out, **kw) -> TrainConfig:
    return resolve_config(overrides=dict(TINY_TRAIN, data_dir=str(data), output=str(out), **kw))


# ---------------------------------------------------------------------- presets and config
def test_presets_follow_published_recipe():
    p = PRESETS["tiny"]
    assert (p["lr"], p["weight_decay"], p["opt_eps"], p["total_batch_size"], p["batch_size"]) == (1e-3, 0.05, 1e-8, 1024, 128)
    assert (p["epochs"], p["warmup_epochs"], p["warmup_lr"], p["min_lr"], p["clip_grad"]) == (300, 5, 1e-6, 1e-5, 1.0)
    assert (p["mixup"], p["cutmix"], p["mixup_switch_prob"], p["smoothing"], p["reprob"]) == (0.8, 1.0, 0.5, 0.1, 0.25)
    assert p["aa"] == "rand-m9-mstd0.5-inc1" and p["repeated_aug"] == 3 and p["interpolation"] == "bicubic"
    assert {k: PRESETS[k]["drop_path"] for k in ("micro", "tiny", "small", "base", "micro_aaaa")} == {
        "micro": 0.15, "tiny": 0.25, "small": 0.45, "base": 0.6, "micro_aaaa": 0.15}
    assert PRESETS["micro_aaaa"]["img_size"] == 256
    for name, dp in (("small_384", 0.7), ("base_384", 0.8)):
        f = PRESETS[name]
        got = (f["img_size"], f["pretrain_size"], f["lr"], f["sched"], f["warmup_epochs"], f["epochs"])
        assert got == (384, 224, 1e-5, "constant", 0, 5)
        assert (f["mixup"], f["cutmix"], f["drop_path"], f["pretrained"]) == (0.8, 0.0, dp, True)


def test_config_precedence_and_files(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("lr: 0.5\nbatch-size: 7\nepochs: 3\n")
    toml = tmp_path / "c.toml"
    toml.write_text('lr = 0.25\nscale = [0.5, 1.0]\naa = "rand-m5"\n')
    cfg = resolve_config("small", yml, {"epochs": 9, "data_dir": "x"})
    assert (cfg.model, cfg.drop_path, cfg.lr, cfg.batch_size, cfg.epochs) == ("transnext_small", 0.45, 0.5, 7, 9)
    cfg = resolve_config(None, toml, {"model": "transnext_base", "data_dir": "x"})
    assert (cfg.preset, cfg.drop_path, cfg.lr, cfg.scale, cfg.aa) == ("base", 0.6, 0.25, (0.5, 1.0), "rand-m5")
    assert load_config_file(toml)["lr"] == 0.25


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config_file(bad)
    with pytest.raises(ValueError, match="unknown training option.*learning_rate"):
        resolve_config(overrides={"learning_rate": 1, "data_dir": "x"})
    with pytest.raises(ValueError, match="option 'batch_size': expected int"):
        resolve_config(overrides={"batch_size": "many", "data_dir": "x"})
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_config("huge")
    with pytest.raises(ValueError, match="--data-dir"):
        resolve_config("tiny")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config_file(tmp_path / "none.yaml")


def test_cli_print_config_with_flags_and_file(tmp_path):
    f = tmp_path / "opts.toml"
    f.write_text("batch_size = 32\nlr = 0.002\n")
    out = run_cli("train", "--preset", "micro_aaaa", "--config", str(f), "--lr", "3e-4", "--data-dir", "d", "--no-compile",
                  "--scale", "0.3", "1.0", "--clip-grad", "none", "--print-config", check=True)
    cfg = json.loads(out.stdout)
    got = (cfg["img_size"], cfg["batch_size"], cfg["lr"], cfg["compile"], cfg["scale"], cfg["clip_grad"])
    assert got == (256, 32, 3e-4, False, [0.3, 1.0], None)


# ---------------------------------------------------------------------- a full short run
def test_train_run_outputs(data, tmp_path):
    out = tmp_path / "run"
    cfg = cfg_for(data, out, epochs=3, lr=3e-3, log_every=2)
    summary = train(cfg)
    for name in ("last.pth", "best.pth", "metrics.jsonl", "curves.png", "config.yaml"):
        assert (out / name).is_file(), name
    ck = load_training_checkpoint(out / "last.pth")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (3, 0, 18)
    assert set(ck) >= {"model", "optimizer", "scheduler", "scaler", "rng", "config", "arch", "classes"}
    assert ck["classes"] == ["class_0", "class_1", "class_2"]
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if r["event"] == "step"]
    epochs = [r for r in rows if r["event"] == "epoch"]
    assert len(steps) == 9 and len(epochs) == 3
    assert all({"loss", "lr", "img_per_s", "eta_s"} <= set(r) for r in steps)
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert summary["best_metrics"]["top1"] > 34  # chance is 33.3 on 3 classes
    saved = load_config_file(out / "config.yaml")
    assert saved["lr"] == 3e-3 and saved["model_kwargs"]["depths"] == [1, 1, 1, 1]
    # best.pth is a plain weights file for create_model / load_checkpoint too
    from transnext.engine.modeling import model_from_checkpoint

    m, info = model_from_checkpoint(out / "best.pth")
    assert m.num_classes == 3 and info["classes"] == ck["classes"]


def test_schedule_warmup_cosine_per_step(data, tmp_path):
    cfg = cfg_for(data, tmp_path / "s", epochs=4, lr=1e-2, warmup_epochs=1, warmup_lr=1e-4, min_lr=1e-3)
    train(cfg)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "s" / "metrics.jsonl") if r["event"] == "step"]
    assert len(lrs) == 24
    # timm's cosine with warm-up (no prefix), as in the reference: linear warm-up over the first
    # 6 steps, then the cosine over all 24 steps, updated every step
    want = [1e-4 + t * (1e-2 - 1e-4) / 6 if t < 6 else 1e-3 + 0.5 * (1e-2 - 1e-3) * (1 + math.cos(math.pi * t / 24))
            for t in range(24)]
    assert lrs == pytest.approx(want, rel=1e-9)
    assert all(a > b for a, b in zip(lrs[6:], lrs[7:]))


def test_schedule_per_epoch_and_constant(data, tmp_path):
    train(cfg_for(data, tmp_path / "e", epochs=3, lr=1e-2, warmup_epochs=0, sched_per_step=False))
    lrs = [r["lr"] for r in read_metrics(tmp_path / "e" / "metrics.jsonl") if r["event"] == "step"]
    assert len(set(lrs[:6])) == 1 and lrs[6] < lrs[0]
    train(cfg_for(data, tmp_path / "c", epochs=2, lr=1e-5, sched="constant"))
    lrs = [r["lr"] for r in read_metrics(tmp_path / "c" / "metrics.jsonl") if r["event"] == "step"]
    assert lrs == pytest.approx([1e-5] * 12)


def test_gradient_accumulation_matches_large_batch(data, tmp_path):
    """4 x 2 accumulation = one batch of 8 (same samples, same augmentations)."""
    a = cfg_for(data, tmp_path / "a", batch_size=4, total_batch_size=8, clip_grad=None)
    b = cfg_for(data, tmp_path / "b", batch_size=8, total_batch_size=8, clip_grad=None)
    train(a)
    train(b)
    ma = load_training_checkpoint(tmp_path / "a" / "last.pth")
    mb = load_training_checkpoint(tmp_path / "b" / "last.pth")
    assert ma["global_step"] == mb["global_step"] == 3
    for k in ma["model"]:
        torch.testing.assert_close(ma["model"][k], mb["model"][k], rtol=1e-4, atol=1e-5)


def test_no_weight_decay_groups(data, tmp_path):
    train(cfg_for(data, tmp_path / "w"))
    ck = load_training_checkpoint(tmp_path / "w" / "last.pth")
    groups = ck["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05]
    from transnext.engine.modeling import model_from_checkpoint
    from transnext.models import param_groups_weight_decay

    m, _ = model_from_checkpoint(tmp_path / "w" / "last.pth")
    want = param_groups_weight_decay(m, 0.05)
    assert [len(g["params"]) for g in groups] == [len(g["params"]) for g in want]
    assert (groups[0]["eps"], groups[0]["betas"]) == (1e-8, (0.9, 0.999))


def test_recipe_features_run(data, tmp_path):
    """Mixup/CutMix + smoothing, RandAugment, erasing, drop path, grad checkpointing, channels-last
    and repeated augmentation in one short run."""
    cfg = cfg_for(data, tmp_path / "f", mixup=0.8, cutmix=1.0, smoothing=0.1, aa="rand-m9-mstd0.5-inc1", reprob=0.25,
                  drop_path=0.1, grad_checkpointing=True, channels_last=True, repeated_aug=3,
                  repeated_aug_single=True, clip_grad=1.0)
    s = train(cfg)
    ck = load_training_checkpoint(tmp_path / "f" / "last.pth")
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert s["global_step"] == 6  # RepeatAugSampler keeps the epoch length: 24 samples / 4


def test_bf16_autocast_on_cpu(data, tmp_path):
    s = train(cfg_for(data, tmp_path / "b", amp="bf16", epochs=2, lr=3e-3))
    start = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["event"] == "start"][0]
    assert start["amp"] == "bf16"
    ck = load_training_checkpoint(tmp_path / "b" / "last.pth")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert s["final"]["top1"] > 34  # it learns (chance: 33.3)


def test_finetune_from_checkpoint_other_size_and_classes(data, tmp_path):
    from transnext.checkpoints import save_state_dict
    from transnext.engine.modeling import create_model_with_arch

    src = create_model_with_arch("transnext_micro", num_classes=5, model_kwargs=TINY_TRAIN["model_kwargs"], img_size=32, pretrain_size=64)
    save_state_dict(src.state_dict(), tmp_path / "published.pth")
    cfg = cfg_for(data, tmp_path / "ft", img_size=48, initial_checkpoint=str(tmp_path / "published.pth"), lr=1e-12,
                  warmup_lr=1e-12, min_lr=1e-12, weight_decay=0.0)
    with pytest.warns(UserWarning, match="classifier has 5 classes, the model 3"):
        train(cfg)
    got = load_training_checkpoint(tmp_path / "ft" / "last.pth")["model"]
    assert got["head.weight"].shape == (3, 64)
    torch.testing.assert_close(got["block3.0.attn.kv.weight"], src.state_dict()["block3.0.attn.kv.weight"], atol=1e-6, rtol=0)
    wrong = create_model_with_arch("transnext_micro", num_classes=3,
                                   model_kwargs=dict(TINY_TRAIN["model_kwargs"], embed_dims=[8, 16, 32, 48]), img_size=32, pretrain_size=64)
    save_state_dict(wrong.state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        train(cfg_for(data, tmp_path / "ft2", initial_checkpoint=str(tmp_path / "wrong.pth")))


# ---------------------------------------------------------------------- bad input and faults
def test_missing_and_empty_data(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        train(cfg_for(tmp_path / "nothing", tmp_path / "o"))
    (tmp_path / "d" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match="training folder not found.*--train-split"):
        train(cfg_for(tmp_path / "d", tmp_path / "o"))
    (tmp_path / "d" / "train").mkdir()
    with pytest.raises(DataError, match="is empty"):
        train(cfg_for(tmp_path / "d", tmp_path / "o"))


def test_cli_errors_are_one_line(tmp_path, data):
    r = run_cli("train", *train_flags(data_dir=str(tmp_path / "missing"), output=str(tmp_path / "o")))
    assert r.returncode == 1 and "error: data folder not found" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", *train_flags(data_dir=str(data), output=str(tmp_path / "o"), amp="fp16", device="cpu"))
    assert r.returncode == 1 and "--amp fp16 needs CUDA" in r.stderr
    r = run_cli("train", *train_flags(data_dir=str(data), output=str(tmp_path / "o"), img_size=16))
    assert r.returncode == 1 and "too small" in r.stderr and "minimum input is 29x29" in r.stderr


def test_batch_larger_than_dataset(data, tmp_path):
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        train(cfg_for(data, tmp_path / "o", batch_size=64))


def test_corrupt_training_images_counted_or_strict(tmp_path):
    d = make_image_folder(tmp_path / "data", classes=2, per_class=8, val_per_class=2)
    write_corrupt(d / "train" / "class_0" / "broken.png")
    write_corrupt(d / "train" / "class_1" / "cut.jpg", "truncated")
    with pytest.warns(UserWarning, match="unreadable image"):
        s = train(cfg_for(d, tmp_path / "o", epochs=1))
    assert s["skipped_images"] == 2
    epoch = [r for r in read_metrics(tmp_path / "o" / "metrics.jsonl") if r["event"] == "epoch"][0]
    assert epoch["skipped_images"] == 2
    with pytest.raises(DataError, match="(broken.png|cut.jpg).*--strict-data"):
        train(cfg_for(d, tmp_path / "o2", strict_data=True))


def test_resume_errors(data, tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        train(cfg_for(data, tmp_path / "o", resume=str(tmp_path / "junk.pth")))
    with pytest.raises(FileNotFoundError, match="resume from not found"):
        train(cfg_for(data, tmp_path / "o", resume=str(tmp_path / "none.pth")))
    from transnext.checkpoints import save_state_dict

    save_state_dict({"w": torch.zeros(1)}, tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match="--initial-checkpoint"):
        train(cfg_for(data, tmp_path / "o", resume=str(tmp_path / "weights.pth")))
    train(cfg_for(data, tmp_path / "r"))
    other = dict(TINY_TRAIN["model_kwargs"], depths=[1, 1, 2, 1])
    with pytest.raises(CheckpointError, match="resume with the same model"):
        train(cfg_for(data, tmp_path / "r", resume="auto", model_kwargs=other, epochs=2))


def test_out_of_memory_is_explained(data, tmp_path, monkeypatch):
    from transnext.models import TransNeXt

    def boom(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(TransNeXt, "forward", boom)
    with pytest.raises(TrainingError, match="out of memory.*Lower --batch-size.*--grad-checkpointing.*--resume auto"):
        train(cfg_for(data, tmp_path / "o"))


def test_non_finite_loss_is_explained(data, tmp_path, monkeypatch):
    from transnext.models import TransNeXt

    orig = TransNeXt.forward
    monkeypatch.setattr(TransNeXt, "forward", lambda self, x: orig(self, x) * float("nan"))
    with pytest.raises(TrainingError, match="loss became nan.*lower --lr"):
        train(cfg_for(data, tmp_path / "o"))


def test_sigint_saves_resumable_checkpoint(data, tmp_path):
    out = tmp_path / "int"
    env_flags = train_flags(data_dir=str(data), output=str(out), epochs=2)
    from train_helpers import signal_flag

    r = run_cli("train", *env_flags, *signal_flag(4, "SIGINT"), subprocess_=True)
    assert r.returncode == 130, r.stderr[-2000:]
    assert "resumable checkpoint saved" in r.stderr and "--resume auto" in r.stderr
    ck = load_training_checkpoint(out / "last.pth")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (0, 4, 4)
    r = run_cli("train", *env_flags, "--resume", "auto", check=True)
    assert "resumed from" in r.stderr
    ck = load_training_checkpoint(out / "last.pth")
    assert (ck["epoch"], ck["global_step"]) == (2, 12)
    steps = [r["global_step"] for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"]
    assert steps == list(range(1, 13))  # nothing lost, nothing logged twice


@pytest.mark.slow
def test_torch_compile_run(data, tmp_path):
    s = train(cfg_for(data, tmp_path / "c", compile=True, epochs=1))
    assert s["global_step"] == 6
    ck = load_training_checkpoint(tmp_path / "c" / "last.pth")
    assert not any(k.startswith("_orig_mod.") for k in ck["model"])  # the plain module's names are saved


# ---------------------------------------------------------------------- the run object, tasks and callbacks
def test_iteration_based_run_poly_schedule_and_step_evaluation(data, tmp_path):
    """max_steps ends the run mid-epoch; eval_every_steps evaluates (and may save best.pth) between epoch ends."""
    out = tmp_path / "it"
    s = train(cfg_for(data, out, max_steps=9, sched="poly", poly_power=1.0, lr=1e-2, min_lr=0.0, warmup_epochs=0,
                      eval_every_steps=4))
    assert s["global_step"] == 9 and s["epochs"] == 2  # 6 steps per epoch
    rows = read_metrics(out / "metrics.jsonl")
    lrs = [r["lr"] for r in rows if r["event"] == "step"]
    assert lrs == pytest.approx([1e-2 * (1 - t / 9) for t in range(9)], rel=1e-9)  # linear decay to 0 over 9 steps
    evals = [r["global_step"] for r in rows if r["event"] == "eval"]
    epochs = [(r["global_step"], "val_top1" in r) for r in rows if r["event"] == "epoch"]
    assert evals == [4, 8] and epochs == [(6, False), (9, True)]
    ck = load_training_checkpoint(out / "last.pth")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 3, 9)
    # resuming a finished iteration-based run does nothing more
    s = train(cfg_for(data, out, max_steps=9, sched="poly", lr=1e-2, min_lr=0.0, warmup_epochs=0, eval_every_steps=4,
                      resume="auto"))
    assert s["global_step"] == 9


def test_callbacks_see_the_run_and_can_stop_it(data, tmp_path):
    from transnext.engine import Callback, TrainingInterrupted

    class Recorder(Callback):
        def __init__(self):
            self.events = []

        def on_step_end(self, run, loss):
            self.events.append(("step", run.global_step))
            if run.global_step == 8:
                run.request_stop()

        def on_evaluate(self, run, metrics):
            self.events.append(("eval", run.global_step))

        def on_checkpoint(self, run, path, kind):
            self.events.append((kind, run.global_step))

    rec = Recorder()
    with pytest.raises(TrainingInterrupted) as e:
        train(cfg_for(data, tmp_path / "cb", epochs=2), callbacks=[rec])
    assert e.value.checkpoint == tmp_path / "cb" / "last.pth"
    assert rec.events == [("step", i) for i in range(1, 7)] + [("eval", 6), ("last", 6), ("best", 6), ("step", 7),
                                                                ("step", 8), ("last", 8)]
    ck = load_training_checkpoint(tmp_path / "cb" / "last.pth")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 2, 8)


def test_a_new_task_needs_no_loop_change(tmp_path):
    """A regression task (lower loss is better) trained by the same loop: the Task protocol is enough."""
    from transnext.engine import StepOutput, Task, TaskData
    from transnext.engine.distributed import reduce_sum

    g = torch.Generator().manual_seed(0)
    w_true = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    xs = torch.randn(64, 4, generator=g)
    pairs = [(x, (x @ w_true.T).squeeze(0)) for x in xs]

    class Regression(Task):
        name = "regression"
        best_metric = "mse"
        higher_is_better = False
        curve_metrics = ("mse",)

        def build_data(self, cfg, info):
            return TaskData(train=pairs[:48], val=pairs[48:], val_batch_size=5)

        def build_model(self, cfg, data, init_weights):
            return torch.nn.Linear(4, 1)

        def train_step(self, model, batch, run):
            x, y, skipped = batch
            return StepOutput(torch.nn.functional.mse_loss(model(x).squeeze(1), y), samples=len(x), skipped=skipped,
                              logs={"abs_err": float((model(x).squeeze(1) - y).abs().mean().detach())})

        def evaluate(self, model, loader, run):
            model.eval()
            with torch.no_grad():
                se, n = 0.0, 0
                for x, y, _ in loader:
                    se += float(((model(x).squeeze(1) - y) ** 2).sum())
                    n += len(y)
            se, n = reduce_sum([se, float(n)], run.info)
            return {"mse": se / n, "n": int(n)}

        def checkpoint_extras(self, model):
            return {"arch": {"kind": "linear", "in": 4}}

    cfg = TrainConfig(dataset="folder", data_dir="unused", model="linear", batch_size=8, total_batch_size=None, epochs=6,
                      lr=0.5, warmup_epochs=0, min_lr=0.0, weight_decay=0.0, clip_grad=None, amp="none", num_workers=0,
                      progress=False, output=str(tmp_path / "reg"), log_every=1)
    s = train(cfg, task=Regression())
    rows = read_metrics(tmp_path / "reg" / "metrics.jsonl")
    mses = [r["val_mse"] for r in rows if r["event"] == "epoch"]
    assert len(mses) == 6 and mses[-1] < mses[0] / 4 and all("abs_err" in r for r in rows if r["event"] == "step")
    assert s["best_metric"] == "mse" and s["best_metrics"]["mse"] == min(mses)
    best = load_training_checkpoint(tmp_path / "reg" / "best.pth")
    assert best["arch"] == {"kind": "linear", "in": 4} and best["task"] == "regression"
    assert best["metrics"]["mse"] == min(mses) and (tmp_path / "reg" / "curves.png").is_file()


def test_one_amp_rule():
    from transnext.engine.amp import resolve_amp

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [resolve_amp(a, cpu) for a in (None, "auto", "bf16", "none")] == ["none", "bf16", "bf16", "none"]
    assert [resolve_amp(a, cuda) for a in (None, "auto", "fp16", "bf16")] == ["fp16", "fp16", "fp16", "bf16"]
    with pytest.raises(ValueError, match="--amp fp16 needs CUDA"):
        resolve_amp("fp16", cpu)
    with pytest.raises(ValueError, match="--amp must be one of"):
        resolve_amp("fp8", cpu)


def test_callback_spec_errors():
    from transnext.engine.trainer import load_callback

    assert type(load_callback('train_helpers:SignalAtStep:{"step": 3}')).__name__ == "SignalAtStep"
    with pytest.raises(ValueError, match="expected MODULE:NAME"):
        load_callback("nomodule")
    with pytest.raises(ValueError, match="cannot import Nope from train_helpers"):
        load_callback("train_helpers:Nope")
    with pytest.raises(ValueError, match="not a transnext Callback"):
        load_callback("train_helpers:cli_env")


def test_strict_data_error_from_a_worker_is_the_original_error(tmp_path):
    """With loader workers, --strict-data stops with the file's own one-line error, not the worker's traceback text."""
    d = make_image_folder(tmp_path / "data", classes=2, per_class=4, val_per_class=1)
    write_corrupt(d / "train" / "class_0" / "broken.png")
    with pytest.raises(DataError) as info:
        train(cfg_for(d, tmp_path / "o", strict_data=True, num_workers=1))
    msg = str(info.value)
    assert "broken.png" in msg and "--strict-data" in msg, msg
    assert "DataLoader worker" not in msg and "Traceback" not in msg, msg
