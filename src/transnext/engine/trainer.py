"""The training loop: the published recipe, resumable to the bit, single process or DDP.

``train(cfg)`` runs one training job described by a :class:`TrainConfig`; ``transnext train``
and ``transnext demo`` call it, and so can Python code. Output folder layout::

    config.yaml     the effective configuration
    last.pth        resumable state (model, optimizer, scheduler, scaler, RNG, position)
    best.pth        weights of the best validation top-1 (+ architecture, classes, metrics)
    metrics.jsonl   one JSON object per logged step and per epoch
    curves.png      loss, validation accuracy and learning rate
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import CheckpointError
from .config import TrainConfig, save_config
from .distributed import DistInfo, all_gather_object, barrier, cleanup, init_distributed, reduce_sum
from .evaluate import autocast_context, evaluate
from .metrics import MetricsLog, plot_curves
from .state import capture_rng_state, load_training_checkpoint, restore_rng_state, save_training_checkpoint

__all__ = ["TrainingError", "TrainingInterrupted", "train"]

FAULT_KILL_ENV = "TRANSNEXT_FAULT_KILL_AT_STEP"  # fault injection for tests: SIGKILL after this step
FAULT_SIGINT_ENV = "TRANSNEXT_FAULT_SIGINT_AT_STEP"  # ... or send SIGINT to itself


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, out of memory...); the message says what to change."""


class TrainingInterrupted(KeyboardInterrupt):
    """Stopped by SIGINT/SIGTERM after saving a resumable checkpoint (``.checkpoint``)."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint


@dataclass
class _Data:
    train: Any
    val: Any | None
    classes: list[str]


# ---------------------------------------------------------------------- data
def _build_data(cfg: TrainConfig) -> _Data:
    from ..data import (
        DataError,
        build_eval_transform,
        build_train_transform,
        demo_dataset,
        scan_image_folder,
    )
    from ..data.datasets import ImageFileDataset

    train_tf = build_train_transform(
        cfg.img_size, auto_augment=cfg.aa, re_prob=cfg.reprob, re_mode=cfg.remode, interpolation=cfg.interpolation,
        scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip, color_jitter=cfg.color_jitter, mean=cfg.mean, std=cfg.std,
    )
    eval_tf = build_eval_transform(cfg.img_size, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
    if cfg.dataset == "demo":
        train = demo_dataset("train", train_tf)
        return _Data(train, demo_dataset("val", eval_tf), train.classes)
    root = Path(cfg.data_dir)  # type: ignore[arg-type]
    if not root.exists():
        raise DataError(
            f"data folder not found: {root} (expected {root}/{cfg.train_split}/<class>/<images> and {root}/{cfg.val_split}/...)"
        )
    train_dir = root / cfg.train_split
    if not train_dir.is_dir():
        raise DataError(
            f"training folder not found: {train_dir} (expected {root}/{cfg.train_split}/<class>/<images>; "
            "set --train-split if it has another name)"
        )
    samples, classes = scan_image_folder(train_dir, strict=cfg.strict_data, what="training")
    train = ImageFileDataset(samples, train_tf, strict=cfg.strict_data, classes=classes)
    val = None
    val_dir = root / cfg.val_split
    if val_dir.is_dir():
        vs, _ = scan_image_folder(val_dir, class_to_idx={c: i for i, c in enumerate(classes)}, strict=cfg.strict_data, what="validation")
        val = ImageFileDataset(vs, eval_tf, strict=cfg.strict_data, classes=classes)
    else:
        warnings.warn(f"no validation folder {val_dir}: training without evaluation; best.pth follows the last epoch", stacklevel=2)
    return _Data(train, val, classes)


def _resolve_amp(amp: str, device: torch.device) -> str:
    if amp == "auto":
        return "fp16" if device.type == "cuda" else "bf16"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA; on CPU use --amp bf16 or --amp none")
    return amp


def _oom_advice(cfg: TrainConfig, accum: int) -> str:
    return (
        f"out of memory with batch size {cfg.batch_size} per process at {cfg.img_size}x{cfg.img_size} "
        f"({cfg.model}). Lower --batch-size (with --total-batch-size {cfg.total_batch_size or cfg.batch_size * accum} "
        "kept, gradient accumulation keeps the effective batch), add --grad-checkpointing (recomputes activations), "
        "use --amp bf16/fp16, or train at a smaller --img-size. The last checkpoint is intact; continue with --resume auto."
    )


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg)


class _StopFlag:
    """SIGINT/SIGTERM request a stop at the end of the current step (a second SIGINT aborts)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: saving a resumable checkpoint after this step "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _set_determinism(cfg: TrainConfig, info: DistInfo) -> None:
    import random

    import numpy as np

    torch.manual_seed(cfg.seed + info.rank)
    np.random.seed((cfg.seed + info.rank) % (1 << 32))
    random.seed(cfg.seed + info.rank)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True


# ---------------------------------------------------------------------- main entry
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a training job; returns a summary (best/last metrics, paths, time).

    Raises :class:`TrainingInterrupted` after SIGINT/SIGTERM (a resumable ``last.pth`` is saved),
    :class:`TrainingError` when training cannot continue, ``ValueError``/``DataError`` for bad input.
    """
    cfg.validate()
    info = init_distributed(cfg.device)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        return _train(cfg, info)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        cleanup(info)


def _train(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from torch.utils.data import DataLoader

    from ..data import SeededDataset, ShardSampler, build_train_sampler, collate_skip
    from ..models import DROP_PATH_RATES, param_groups_weight_decay
    from ..models.registry import split_name
    from .modeling import check_image_size, create_model_with_arch

    t_start = time.perf_counter()
    device = info.device
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _set_determinism(cfg, info)
    out = Path(cfg.output)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    amp = _resolve_amp(cfg.amp, device)

    # ---- resume state (read early: the data and model must match it)
    resume_path: Path | None = None
    if cfg.resume:
        resume_path = out / "last.pth" if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume == "auto" and not resume_path.exists():
            if info.is_main:
                print(f"--resume auto: no {resume_path} yet, starting from scratch", file=sys.stderr)
            resume_path = None
    ck = load_training_checkpoint(resume_path) if resume_path else None

    # ---- data
    data = _build_data(cfg)
    num_classes = cfg.num_classes or len(data.classes)
    if num_classes < len(data.classes):
        raise ValueError(f"--num-classes {num_classes} is smaller than the {len(data.classes)} classes of the training set")
    per_proc = len(data.train) if cfg.repeated_aug == 1 or not (info.distributed or cfg.repeated_aug_single) else None
    sampler = build_train_sampler(
        data.train, cfg.seed, info.rank, info.world_size,
        cfg.repeated_aug if (info.distributed or cfg.repeated_aug_single) else 1,
    )
    n_local = len(sampler)
    micro_per_epoch = n_local // cfg.batch_size
    step_batch = cfg.batch_size * info.world_size
    accum = 1 if cfg.total_batch_size is None else max(1, round(cfg.total_batch_size / step_batch))
    if cfg.total_batch_size is not None and accum * step_batch != cfg.total_batch_size and info.is_main:
        warnings.warn(
            f"--total-batch-size {cfg.total_batch_size} is not a multiple of batch {cfg.batch_size} x {info.world_size} "
            f"process(es); using {accum} accumulation step(s) = total batch {accum * step_batch}", stacklevel=2)
    steps_per_epoch = micro_per_epoch // accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"the training set gives {n_local} samples per process per epoch, fewer than one optimizer step of "
            f"{cfg.batch_size} x {accum} accumulation; lower --batch-size or --total-batch-size"
            + (f" ({per_proc} images)" if per_proc else "")
        )
    total_steps = steps_per_epoch * cfg.epochs
    loader = DataLoader(
        SeededDataset(data.train), batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
        collate_fn=collate_skip, drop_last=True, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=False,
    )
    val_loader = None
    if data.val is not None:
        val_loader = DataLoader(
            data.val, batch_size=cfg.batch_size, sampler=ShardSampler(len(data.val), info.rank, info.world_size),
            num_workers=cfg.num_workers, collate_fn=collate_skip, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    # ---- model
    variant, _ = split_name(cfg.model)
    drop_path = cfg.drop_path if cfg.drop_path is not None else DROP_PATH_RATES.get(variant, 0.0)
    model = create_model_with_arch(
        cfg.model, num_classes=num_classes, model_kwargs=cfg.model_kwargs, img_size=cfg.img_size,
        pretrain_size=cfg.pretrain_size, pos_bias=cfg.pos_bias, drop_path=drop_path, attn_backend=cfg.attn_backend,
        pretrained=cfg.pretrained and ck is None and cfg.initial_checkpoint is None,
        checkpoint_path=cfg.initial_checkpoint if ck is None else None,
    )
    arch = model.arch
    check_image_size(model, cfg.img_size)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(
        param_groups_weight_decay(model, cfg.weight_decay), opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
        eps=cfg.opt_eps,
    )
    per_step = cfg.sched_per_step
    min_lr = cfg.lr if cfg.sched == "constant" else cfg.min_lr
    scheduler = CosineLRScheduler(
        optimizer, t_initial=total_steps if per_step else cfg.epochs, lr_min=min_lr,
        warmup_t=round(cfg.warmup_epochs * steps_per_epoch) if per_step else round(cfg.warmup_epochs),
        warmup_lr_init=cfg.warmup_lr, t_in_epochs=not per_step,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    start_epoch, start_step, global_step, best = 0, 0, 0, -math.inf
    best_metrics: dict[str, Any] = {}
    if ck is not None:
        if ck["arch"] != arch:
            raise CheckpointError(
                f"{resume_path} was trained as {ck['arch']}, not {arch}; resume with the same model, "
                "classes and sizes, or start a new run (--initial-checkpoint loads weights only)"
            )
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        if ck.get("scheduler"):
            scheduler.load_state_dict(ck["scheduler"])
        start_epoch, start_step, global_step = ck["epoch"], ck["step_in_epoch"], ck["global_step"]
        best, best_metrics = ck.get("best_top1", -math.inf), ck.get("best_metrics", {})
        geometry = (cfg.batch_size, info.world_size, accum, steps_per_epoch)
        if tuple(ck.get("geometry", geometry)) != geometry and start_step:
            warnings.warn(
                f"batch geometry changed since the checkpoint ({ck.get('geometry')} -> {geometry}): epoch "
                f"{start_epoch} restarts from its beginning", stacklevel=2)
            global_step -= start_step
            start_step = 0
        rng = ck.get("rng") or []
        if len(rng) == info.world_size:
            restore_rng_state(rng[info.rank])
        else:
            warnings.warn(f"checkpoint holds RNG states of {len(rng)} process(es), this run has {info.world_size}: "
                          "random streams restart (the run continues, but not bit-identically)", stacklevel=2)
        if info.is_main:
            print(f"resumed from {resume_path}: epoch {start_epoch + 1}, step {start_step}/{steps_per_epoch}, "
                  f"global step {global_step}", file=sys.stderr)

    train_model: torch.nn.Module = model
    if cfg.compile:
        train_model = torch.compile(model)
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup_fn = Mixup(
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
            mode=cfg.mixup_mode, label_smoothing=cfg.smoothing, num_classes=num_classes,
        )
        criterion: torch.nn.Module = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    log = MetricsLog(out / "metrics.jsonl", enabled=info.is_main)
    if ck is not None:
        log.truncate_after(global_step)
    else:
        log.reset()
    if info.is_main:
        save_config(cfg, out / "config.yaml")
        log.write({"event": "start", "global_step": global_step, "world_size": info.world_size, "accum_steps": accum,
                   "steps_per_epoch": steps_per_epoch, "total_batch": step_batch * accum, "device": str(device),
                   "amp": amp, "params": sum(p.numel() for p in model.parameters()), "resumed": ck is not None})
    data_cfg = dict(img_size=cfg.img_size, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation,
                    mean=list(cfg.mean), std=list(cfg.std))

    def state(epoch: int, step_in_epoch: int) -> dict[str, Any]:
        rng = all_gather_object(capture_rng_state(), info)
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {}, "rng": rng, "epoch": epoch,
            "step_in_epoch": step_in_epoch, "global_step": global_step, "best_top1": best, "best_metrics": best_metrics,
            "config": cfg.to_dict(), "arch": arch, "classes": data.classes, "data_cfg": data_cfg,
            "geometry": [cfg.batch_size, info.world_size, accum, steps_per_epoch],
        }

    def save_last(epoch: int, step_in_epoch: int) -> Path:
        st = state(epoch, step_in_epoch)  # collective: every rank takes part
        path = out / "last.pth"
        if info.is_main:
            save_training_checkpoint(path, st)
        barrier(info)
        return path

    fault_kill = int(os.environ.get(FAULT_KILL_ENV, "-1"))
    fault_int = int(os.environ.get(FAULT_SIGINT_ENV, "-1"))
    show = cfg.progress and info.is_main
    step_times: list[float] = []
    last_val: dict[str, Any] = {}
    skipped_total = 0

    with _StopFlag() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            first = start_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch, start=first * accum * cfg.batch_size)
            if not per_step:
                scheduler.step(epoch)
            model.train()
            it = iter(loader)
            bar = None
            if show:
                from tqdm.auto import tqdm

                bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                           dynamic_ncols=True, file=sys.stderr)
            loss_sum = torch.zeros((), dtype=torch.float64)
            loss_n = 0
            t_epoch = time.perf_counter()
            for step in range(first, steps_per_epoch):
                t0 = time.perf_counter()
                if per_step:
                    scheduler.step_update(global_step)
                lr = optimizer.param_groups[0]["lr"]
                step_loss = 0.0
                n_img = 0
                try:
                    for micro in range(accum):
                        x, y, skipped = next(it)
                        skipped_total += skipped
                        if x is None:
                            continue
                        if mixup_fn is not None and len(x) % 2:
                            x, y = x[:-1], y[:-1]
                            if len(x) == 0:
                                continue
                        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                        if cfg.channels_last:
                            x = x.contiguous(memory_format=torch.channels_last)
                        if mixup_fn is not None:
                            x, y = mixup_fn(x, y)
                        sync = micro == accum - 1 or not info.distributed
                        ctx = contextlib.nullcontext() if sync else train_model.no_sync()  # type: ignore[operator]
                        with ctx:
                            with autocast_context(device, amp):
                                loss = criterion(train_model(x), y)
                            scaler.scale(loss / accum).backward()
                        step_loss += loss.item() / accum
                        n_img += len(x)
                except Exception as e:
                    if _is_oom(e):
                        raise TrainingError(_oom_advice(cfg, accum)) from e
                    raise
                if not math.isfinite(step_loss):
                    raise TrainingError(
                        f"the loss became {step_loss} at epoch {epoch + 1}, step {step + 1} (lr {lr:.3g}); lower --lr, keep "
                        "--clip-grad, or use --amp bf16/none instead of fp16. The last checkpoint is intact (--resume auto)."
                    )
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                loss_sum += step_loss
                loss_n += 1
                dt = time.perf_counter() - t0
                step_times.append(dt)
                recent = step_times[-50:]
                img_s = n_img * info.world_size / max(dt, 1e-9)
                eta_total = (total_steps - global_step) * sum(recent) / len(recent)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}",
                                    eta=time.strftime("%H:%M:%S", time.gmtime(eta_total)))
                if cfg.log_every and global_step % cfg.log_every == 0:
                    log.write({"event": "step", "epoch": epoch, "step": step + 1, "global_step": global_step,
                               "epoch_float": epoch + (step + 1) / steps_per_epoch, "loss": step_loss, "lr": lr,
                               "img_per_s": img_s, "eta_s": eta_total})
                if global_step == fault_kill:
                    os.kill(os.getpid(), signal.SIGKILL)
                if global_step == fault_int:
                    os.kill(os.getpid(), signal.SIGINT)
                want_stop = stop.requested
                if info.distributed:
                    want_stop = reduce_sum([float(want_stop)], info)[0] > 0
                if want_stop:
                    if bar is not None:
                        bar.close()
                    path = save_last(epoch, step + 1)
                    log.write({"event": "interrupted", "epoch": epoch, "step": step + 1, "global_step": global_step})
                    raise TrainingInterrupted(path)
                if cfg.save_every_steps and global_step % cfg.save_every_steps == 0 and step + 1 < steps_per_epoch:
                    save_last(epoch, step + 1)
            if bar is not None:
                bar.close()
            del it
            s, n = reduce_sum([float(loss_sum), float(loss_n)], info)
            train_loss = s / max(n, 1)
            record: dict[str, Any] = {"event": "epoch", "epoch": epoch, "global_step": global_step, "train_loss": train_loss,
                                      "lr": optimizer.param_groups[0]["lr"], "epoch_time_s": time.perf_counter() - t_epoch}
            is_last = epoch + 1 == cfg.epochs
            improved = False
            if val_loader is not None and ((epoch + 1) % max(cfg.eval_every, 1) == 0 or is_last):
                last_val = evaluate(model, val_loader, device, amp, None, info, show,
                                    "validate", cfg.channels_last)
                record.update({f"val_{k}": v for k, v in last_val.items() if k in ("top1", "top5", "loss")})
                record["val_images"] = last_val["n"]
                improved = last_val["top1"] > best
                if improved:
                    best = last_val["top1"]
                    best_metrics = {"epoch": epoch, **last_val}
            elif val_loader is None:
                improved = True
                best_metrics = {"epoch": epoch, "train_loss": train_loss}
            if skipped_total:
                record["skipped_images"] = skipped_total
                if info.is_main:
                    warnings.warn(f"{skipped_total} unreadable image(s) skipped so far (see the warnings above)", stacklevel=2)
            log.write(record)
            if info.is_main:
                msg = f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}"
                if "val_top1" in record:
                    msg += f", val top-1 {record['val_top1']:.2f}%, top-5 {record['val_top5']:.2f}%, loss {record['val_loss']:.4f}"
                print(msg, file=sys.stderr, flush=True)
            save_last(epoch + 1, 0)
            if improved and info.is_main:
                save_training_checkpoint(out / "best.pth", {
                    "model": model.state_dict(), "arch": arch, "classes": data.classes, "data_cfg": data_cfg,
                    "metrics": best_metrics, "epoch": epoch, "config": cfg.to_dict(), "optimizer": {},
                    "step_in_epoch": 0, "global_step": global_step,
                })
            if info.is_main:
                try:
                    title = cfg.model
                    if cfg.model_kwargs:
                        depths = [len(getattr(model, f"block{i + 1}")) for i in range(model.num_stages)]
                        title = f"TransNeXt dims {'/'.join(map(str, model.embed_dims))}, depths {'/'.join(map(str, depths))}"
                    title += f" ({cfg.preset} preset)" if cfg.preset else ""
                    plot_curves(out / "metrics.jsonl", out / "curves.png", title=title)
                except ImportError:
                    pass
            barrier(info)
    summary = {
        "output": str(out), "last": str(out / "last.pth"), "best": str(out / "best.pth"),
        "metrics": str(out / "metrics.jsonl"), "curves": str(out / "curves.png"), "best_metrics": best_metrics,
        "final": last_val, "epochs": cfg.epochs, "global_step": global_step, "time_s": time.perf_counter() - t_start,
        "classes": data.classes, "skipped_images": skipped_total,
    }
    end: dict[str, Any] = {"event": "end", "global_step": global_step, "time_s": summary["time_s"],
                           "best_top1": best if best > -math.inf else None}
    if info.distributed:  # every process must hold the same weights after synchronised steps
        with torch.no_grad():
            digest = float(sum(p.double().abs().sum() for p in model.parameters()))
        digests = all_gather_object(digest, info)
        end["replica_digests"] = digests
        summary["replicas_in_sync"] = end["replicas_in_sync"] = max(digests) == min(digests)
    log.write(end)
    return summary
