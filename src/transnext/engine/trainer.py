"""The training loop: the published recipe, resumable to the bit, single process or DDP.

``train(cfg)`` runs one training job described by a :class:`TrainConfig`; ``transnext train``
and ``transnext demo`` call it, and so can Python code. The loop is a :class:`TrainRun` (setup,
resume, steps, epoch ends, evaluation, checkpoints, summary) driving a task; the task decides
the model, the data, the loss and the metrics (:mod:`transnext.engine.task` documents that
protocol; :class:`~transnext.engine.classification.ClassificationTask` is the default).
:class:`Callback` objects observe the run (``train(cfg, callbacks=[...])``, or
``transnext train --callback module:name``). Output folder layout::

    config.yaml     the effective configuration
    last.pth        resumable state (model, optimizer, scheduler, scaler, RNG, position)
    best.pth        weights of the best validation score (+ architecture, classes, metrics)
    metrics.jsonl   one JSON object per logged step, per evaluation and per epoch
    curves.png      loss, validation metrics and learning rate
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import CheckpointError
from .amp import autocast, resolve_amp
from .config import TrainConfig, save_config
from .distributed import DistInfo, all_gather_object, barrier, cleanup, init_distributed, reduce_sum
from .metrics import MetricsLog, plot_curves
from .state import capture_rng_state, load_training_checkpoint, restore_rng_state, save_training_checkpoint
from .task import Task

__all__ = ["Callback", "TrainRun", "TrainingError", "TrainingInterrupted", "load_callback", "train"]


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, out of memory...); the message says what to change."""


class TrainingInterrupted(KeyboardInterrupt):
    """Stopped by SIGINT/SIGTERM after saving a resumable checkpoint (``.checkpoint``)."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint


class Callback:
    """Observer of a :class:`TrainRun`; override the hooks you need (all run on every process).

    ``run`` exposes the position (``epoch``, ``step_in_epoch``, ``global_step``), the model,
    optimizer, the last evaluation (``last_eval``) and ``request_stop()``, which ends the run
    after the current step with a resumable checkpoint, as SIGINT does.
    """

    def on_run_start(self, run: TrainRun) -> None: ...

    def on_step_end(self, run: TrainRun, loss: float) -> None: ...

    def on_evaluate(self, run: TrainRun, metrics: dict[str, Any]) -> None: ...

    def on_epoch_end(self, run: TrainRun, record: dict[str, Any]) -> None: ...

    def on_checkpoint(self, run: TrainRun, path: Path, kind: str) -> None: ...  # kind: "last" or "best"

    def on_run_end(self, run: TrainRun, summary: dict[str, Any]) -> None: ...


def load_callback(spec: str) -> Callback:
    """``module:name`` or ``module:name:{json keyword arguments}`` -> ``name(**kwargs)`` from ``module``."""
    module, sep, rest = spec.partition(":")
    name, _, kwargs_text = rest.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--callback {spec!r}: expected MODULE:NAME or MODULE:NAME:JSON (e.g. mypkg.hooks:Notify)")
    try:
        kwargs = json.loads(kwargs_text) if kwargs_text else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--callback {spec!r}: the keyword arguments are not valid JSON: {e}") from e
    if not isinstance(kwargs, dict):
        raise ValueError(f"--callback {spec!r}: the keyword arguments must be a JSON object")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--callback {spec!r}: cannot import {name} from {module}: {e}") from e
    cb = factory(**kwargs)
    if not isinstance(cb, Callback):
        raise ValueError(f"--callback {spec!r}: {name} returned {type(cb).__name__}, not a transnext Callback")
    return cb


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


# ---------------------------------------------------------------------- schedules
def multistep_scheduler(optimizer: torch.optim.Optimizer, milestones: list[int], decay_rate: float, warmup_t: int,
                       warmup_lr_init: float, t_in_epochs: bool) -> Any:
    """The multi-step schedule (``sched="step"``) as a timm scheduler: linear warm-up from ``warmup_lr_init``
    to the base lr over ``warmup_t``, then ``lr * decay_rate**k`` with ``k`` the number of milestones ``<= t``.

    The decay starts at index ``t == m`` (mmcv's step policy, e.g. the Mask R-CNN 1x recipe: x0.1 from the
    first iteration of epochs 9 and 12 with milestones 8 and 11); timm's ``MultiStepLRScheduler`` decays one
    index earlier, hence this class.
    """
    import bisect

    from timm.scheduler.scheduler import Scheduler

    class _MultiStepWarmup(Scheduler):
        def __init__(self) -> None:
            super().__init__(optimizer, "lr", t_in_epochs=t_in_epochs)
            self.milestones = sorted(int(m) for m in milestones)
            self.decay_rate = decay_rate
            self.warmup_t = warmup_t
            self.warmup_lr_init = warmup_lr_init
            self.update_groups(self._get_lr(0))

        def _get_lr(self, t: int) -> list[float]:
            factor = self.decay_rate ** bisect.bisect_right(self.milestones, t)
            if t < self.warmup_t:
                return [self.warmup_lr_init + t * (v * factor - self.warmup_lr_init) / self.warmup_t for v in self.base_values]
            return [v * factor for v in self.base_values]

    return _MultiStepWarmup()


# ---------------------------------------------------------------------- the run
class TrainRun:
    """One training job: :meth:`setup`, :meth:`resume`, then :meth:`fit` (steps, epoch ends,
    evaluations, checkpoints) and :meth:`summary`. ``train(cfg)`` is ``TrainRun(cfg).fit()``
    inside the process-group set-up."""

    def __init__(self, cfg: TrainConfig, task: Task | None = None, callbacks: Iterable[Callback] = (),
                 info: DistInfo | None = None) -> None:
        from .classification import ClassificationTask

        self.cfg = cfg
        self.task = task if task is not None else ClassificationTask()
        self.callbacks = list(callbacks)
        self.info = info or DistInfo()
        self.device = self.info.device
        self.out = Path(cfg.output)
        # position and bookkeeping (what last.pth records)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best: float | None = None
        self.best_metrics: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.skipped_total = 0
        self.resumed_from: Path | None = None
        self._stop: _StopFlag | None = None
        self._stop_requested = False
        self._step_times: list[float] = []
        self._buffers_synced = True
        self._ready = False

    # ------------------------------------------------------------------ helpers
    @property
    def show_progress(self) -> bool:
        return bool(self.cfg.progress and self.info.is_main)

    def request_stop(self) -> None:
        """End the run after the current step with a resumable checkpoint (as SIGINT does)."""
        self._stop_requested = True

    def _emit(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def sync_buffers(self) -> None:
        """Under DDP, make every process hold the same buffers (collective; a no-op when already in sync).

        DDP broadcasts rank 0's buffers before each forward, so after a step each process keeps the
        BatchNorm statistics of its own batch: evaluations (each process scores its shard) and the saved
        model would mix different models. The running statistics are averaged over the processes (the
        running mean then is that of all their batches); every other buffer is rank 0's.
        """
        if not self.info.distributed or self._buffers_synced:
            return
        import torch.distributed as dist

        averaged: set[int] = set()
        with torch.no_grad():
            for m in self.model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                    for b in (m.running_mean, m.running_var):
                        if b is not None:
                            dist.all_reduce(b)
                            b.div_(self.info.world_size)
                            averaged.add(id(b))
            for b in self.model.buffers():
                if id(b) not in averaged:
                    dist.broadcast(b, 0)
        self._buffers_synced = True

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Data, loaders, model, optimizer, schedule, scaler, log; reads the resume state first."""
        from timm.optim import create_optimizer_v2
        from torch.utils.data import DataLoader

        from ..data import SeededDataset, ShardSampler, build_train_sampler

        cfg, info = self.cfg, self.info
        self._t_start = time.perf_counter()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        _set_determinism(cfg, info)
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.amp = resolve_amp(cfg.amp, self.device)

        ck = self._read_resume_state()  # early: the data and model must match it
        self.data = self.task.build_data(cfg, info)
        repeats = cfg.repeated_aug if (info.distributed or cfg.repeated_aug_single) else 1
        self.sampler = build_train_sampler(self.data.train, cfg.seed, info.rank, info.world_size, repeats)
        n_local = len(self.sampler)
        step_batch = cfg.batch_size * info.world_size
        self.accum = 1 if cfg.total_batch_size is None else max(1, round(cfg.total_batch_size / step_batch))
        if cfg.total_batch_size is not None and self.accum * step_batch != cfg.total_batch_size and info.is_main:
            warnings.warn(
                f"--total-batch-size {cfg.total_batch_size} is not a multiple of batch {cfg.batch_size} x {info.world_size} "
                f"process(es); using {self.accum} accumulation step(s) = total batch {self.accum * step_batch}", stacklevel=3)
        self.total_batch = step_batch * self.accum
        self.steps_per_epoch = n_local // cfg.batch_size // self.accum
        if self.steps_per_epoch < 1:
            per_proc = len(self.data.train) if repeats == 1 else None
            raise ValueError(
                f"the training set gives {n_local} samples per process per epoch, fewer than one optimizer step of "
                f"{cfg.batch_size} x {self.accum} accumulation; lower --batch-size or --total-batch-size"
                + (f" ({per_proc} images)" if per_proc else "")
            )
        self.max_steps = cfg.max_steps
        self.total_steps = self.max_steps if self.max_steps is not None else self.steps_per_epoch * cfg.epochs
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        pin = self.device.type == "cuda"
        self.loader = DataLoader(
            SeededDataset(self.data.train), batch_size=cfg.batch_size, sampler=self.sampler, num_workers=cfg.num_workers,
            collate_fn=self.task.collate, drop_last=True, pin_memory=pin,
            generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=False,
        )
        self.val_loader = None
        if self.data.val is not None:
            self.val_loader = DataLoader(
                self.data.val, batch_size=self.data.val_batch_size or cfg.batch_size,
                sampler=ShardSampler(len(self.data.val), info.rank, info.world_size), num_workers=cfg.num_workers,
                collate_fn=self.task.collate, pin_memory=pin, generator=torch.Generator().manual_seed(cfg.seed),
            )

        self.model = self.task.build_model(cfg, self.data, init_weights=ck is None)
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = create_optimizer_v2(
            self.task.param_groups(self.model, cfg), opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.opt_eps,
        )
        self.scheduler = self._build_scheduler()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        if ck is not None:
            self.resume(ck)

        self.train_model: torch.nn.Module = self.model
        if cfg.compile:
            self.train_model = torch.compile(self.model)
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_model = DDP(self.train_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        self.log = MetricsLog(self.out / "metrics.jsonl", enabled=info.is_main)
        if ck is not None:
            self.log.truncate_after(self.global_step)
        else:
            self.log.reset()
        if info.is_main:
            save_config(cfg, self.out / "config.yaml")
            self.log.write({
                "event": "start", "task": self.task.name, "global_step": self.global_step, "world_size": info.world_size,
                "accum_steps": self.accum, "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "total_batch": self.total_batch, "device": str(self.device), "amp": self.amp,
                "params": sum(p.numel() for p in self.model.parameters()), "resumed": ck is not None,
            })
        self._ready = True

    def _read_resume_state(self) -> dict[str, Any] | None:
        cfg = self.cfg
        if not cfg.resume:
            return None
        path = self.out / "last.pth" if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume == "auto" and not path.exists():
            if self.info.is_main:
                print(f"--resume auto: no {path} yet, starting from scratch", file=sys.stderr)
            return None
        self.resumed_from = path
        return load_training_checkpoint(path)

    def _build_scheduler(self) -> Any:
        from timm.scheduler import CosineLRScheduler, PolyLRScheduler

        cfg = self.cfg
        per_step = cfg.sched_per_step or self.max_steps is not None
        self.per_step = per_step
        if cfg.warmup_steps is not None:
            warmup = cfg.warmup_steps if per_step else math.ceil(cfg.warmup_steps / self.steps_per_epoch)
        else:
            warmup = round(cfg.warmup_epochs * self.steps_per_epoch) if per_step else round(cfg.warmup_epochs)
        if cfg.sched == "step":
            unit = self.steps_per_epoch if per_step else 1  # milestones are given in epochs
            return multistep_scheduler(self.optimizer, [round(m * unit) for m in cfg.decay_milestones], cfg.decay_rate, warmup,
                                      cfg.warmup_lr, t_in_epochs=not per_step)
        common = dict(t_initial=self.total_steps if per_step else cfg.epochs, warmup_t=warmup, warmup_lr_init=cfg.warmup_lr,
                      t_in_epochs=not per_step)
        if cfg.sched == "poly":
            return PolyLRScheduler(self.optimizer, power=cfg.poly_power, lr_min=cfg.min_lr, **common)
        return CosineLRScheduler(self.optimizer, lr_min=cfg.lr if cfg.sched == "constant" else cfg.min_lr, **common)

    # ------------------------------------------------------------------ resume
    def resume(self, ck: dict[str, Any]) -> None:
        """Restore weights, optimizer, schedule, scaler, position, best score and RNG from ``ck``."""
        cfg, info = self.cfg, self.info
        arch = self.task.checkpoint_extras(self.model).get("arch")
        if ck.get("arch") != arch:
            raise CheckpointError(
                f"{self.resumed_from} was trained as {ck.get('arch')}, not {arch}; resume with the same model, "
                "classes and sizes, or start a new run (--initial-checkpoint loads weights only)"
            )
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        if ck.get("scheduler"):
            self.scheduler.load_state_dict(ck["scheduler"])
        self.epoch, self.step_in_epoch, self.global_step = ck["epoch"], ck["step_in_epoch"], ck["global_step"]
        best = ck.get("best_score", ck.get("best_top1"))
        self.best = None if best is None or best == -math.inf else float(best)
        self.best_metrics = ck.get("best_metrics", {})
        geometry = (cfg.batch_size, info.world_size, self.accum, self.steps_per_epoch)
        if tuple(ck.get("geometry", geometry)) != geometry and self.step_in_epoch:
            warnings.warn(
                f"batch geometry changed since the checkpoint ({ck.get('geometry')} -> {geometry}): epoch "
                f"{self.epoch} restarts from its beginning", stacklevel=3)
            self.global_step -= self.step_in_epoch
            self.step_in_epoch = 0
        rng = ck.get("rng") or []
        if len(rng) == info.world_size:
            restore_rng_state(rng[info.rank])
        else:
            warnings.warn(f"checkpoint holds RNG states of {len(rng)} process(es), this run has {info.world_size}: "
                          "random streams restart (the run continues, but not bit-identically)", stacklevel=3)
        if info.is_main:
            print(f"resumed from {self.resumed_from}: epoch {self.epoch + 1}, step {self.step_in_epoch}/"
                  f"{self.steps_per_epoch}, global step {self.global_step}", file=sys.stderr)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """Everything :meth:`resume` needs (collective under DDP: every process's RNG state is gathered)."""
        self.sync_buffers()
        rng = all_gather_object(capture_rng_state(), self.info)
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": rng, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "best_score": self.best, "best_metric": self.task.best_metric, "best_metrics": self.best_metrics,
            "config": self.cfg.to_dict(), "task": self.task.name, **self.task.checkpoint_extras(self.model),
            "geometry": [self.cfg.batch_size, self.info.world_size, self.accum, self.steps_per_epoch],
        }

    def save_last(self) -> Path:
        st = self.state()  # collective: every rank takes part
        path = self.out / "last.pth"
        if self.info.is_main:
            save_training_checkpoint(path, st)
        barrier(self.info)
        self._emit("on_checkpoint", path, "last")
        return path

    def save_best(self) -> Path:
        self.sync_buffers()
        path = self.out / "best.pth"
        if self.info.is_main:
            save_training_checkpoint(path, {
                "model": self.model.state_dict(), "metrics": self.best_metrics, "epoch": self.best_metrics.get("epoch", self.epoch),
                "config": self.cfg.to_dict(),
                "task": self.task.name, **self.task.checkpoint_extras(self.model), "optimizer": {}, "step_in_epoch": 0,
                "global_step": self.global_step,
            })
        self._emit("on_checkpoint", path, "best")
        return path

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Set up (unless done), train to the end, return :meth:`summary`."""
        if not self._ready:
            self.setup()
        self._emit("on_run_start")
        with _StopFlag() as stop:
            self._stop = stop
            while not self._finished(self.epoch):
                self.run_epoch()
        return self.summary()

    def _finished(self, epoch: int) -> bool:
        if self.max_steps is not None:
            return self.global_step >= self.max_steps
        return epoch >= self.cfg.epochs

    def run_epoch(self) -> None:
        """Train from the current position to the end of the epoch (or of the run), then close the epoch."""
        cfg = self.cfg
        epoch, first = self.epoch, self.step_in_epoch
        self.sampler.set_epoch(epoch, start=first * self.accum * cfg.batch_size)
        if not self.per_step:
            self.scheduler.step(epoch)
        self.model.train()
        it = iter(self.loader)
        bar = None
        if self.show_progress:
            from tqdm.auto import tqdm

            total = self.steps_per_epoch if self.max_steps is None else min(self.steps_per_epoch, first + self.max_steps - self.global_step)
            bar = tqdm(total=total, initial=first, desc=f"epoch {epoch + 1}/{self.num_epochs}", unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        self._epoch_loss = [0.0, 0]
        t_epoch = time.perf_counter()
        from ..data.datasets import worker_errors

        try:
            with worker_errors():  # a worker's --strict-data error surfaces as the original one-line error
                for step in range(first, self.steps_per_epoch):
                    loss, n_samples, logs, lr, dt = self.train_step(it, epoch, step)
                    self.step_in_epoch = step + 1
                    self._after_step(loss, n_samples, logs, lr, dt, bar)
                    if self.max_steps is not None and self.global_step >= self.max_steps:
                        break
        finally:
            if bar is not None:
                bar.close()
        del it
        complete = self.step_in_epoch >= self.steps_per_epoch
        self.end_epoch(complete, time.perf_counter() - t_epoch)

    def train_step(self, it: Iterator[Any], epoch: int, step: int) -> tuple[float, int, dict[str, float], float, float]:
        """One optimizer step over ``accum`` micro-batches; returns (loss, samples, extra logs, lr, seconds)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        if self.per_step:
            self.scheduler.step_update(self.global_step)
        lr = self.optimizer.param_groups[0]["lr"]
        step_loss, n_samples = 0.0, 0
        logs: dict[str, float] = {}
        try:
            for micro in range(self.accum):
                batch = next(it)
                sync = micro == self.accum - 1 or not self.info.distributed
                ctx = contextlib.nullcontext() if sync else self.train_model.no_sync()  # type: ignore[operator]
                with ctx:
                    with autocast(self.device, self.amp):
                        out = self.task.train_step(self.train_model, batch, self)
                    self.skipped_total += out.skipped
                    if out.loss is None:
                        continue
                    self.scaler.scale(out.loss / self.accum).backward()
                step_loss += out.loss.item() / self.accum
                n_samples += out.samples
                for k, v in out.logs.items():
                    logs[k] = logs.get(k, 0.0) + float(v) / self.accum
        except Exception as e:
            if _is_oom(e):
                raise TrainingError(_oom_advice(cfg, self.accum)) from e
            raise
        if not math.isfinite(step_loss):
            raise TrainingError(
                f"the loss became {step_loss} at epoch {epoch + 1}, step {step + 1} (lr {lr:.3g}); lower --lr, keep "
                "--clip-grad, or use --amp bf16/none instead of fp16. The last checkpoint is intact (--resume auto)."
            )
        if cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._buffers_synced = False
        self.global_step += 1
        return step_loss, n_samples, logs, lr, time.perf_counter() - t0

    def _after_step(self, loss: float, n_samples: int, logs: dict[str, float], lr: float, dt: float, bar: Any) -> None:
        """Log, notify callbacks, honour stop requests, periodic saves and step-based evaluation."""
        cfg, info = self.cfg, self.info
        self._epoch_loss[0] += loss
        self._epoch_loss[1] += 1
        self._step_times.append(dt)
        recent = self._step_times[-50:]
        img_s = n_samples * info.world_size / max(dt, 1e-9)
        eta = (self.total_steps - self.global_step) * sum(recent) / len(recent)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}",
                            eta=time.strftime("%H:%M:%S", time.gmtime(eta)))
        if cfg.log_every and self.global_step % cfg.log_every == 0:
            self.log.write({"event": "step", "epoch": self.epoch, "step": self.step_in_epoch, "global_step": self.global_step,
                            "epoch_float": self.epoch + self.step_in_epoch / self.steps_per_epoch, "loss": loss, "lr": lr,
                            "img_per_s": img_s, "eta_s": eta, **logs})
        self._emit("on_step_end", loss)
        want_stop = self._stop_requested or (self._stop is not None and self._stop.requested)
        if info.distributed:
            want_stop = reduce_sum([float(want_stop)], info)[0] > 0
        if want_stop:
            if bar is not None:
                bar.close()
            path = self.save_last()
            self.log.write({"event": "interrupted", "epoch": self.epoch, "step": self.step_in_epoch,
                            "global_step": self.global_step})
            raise TrainingInterrupted(path)
        run_ends = self.max_steps is not None and self.global_step >= self.max_steps
        mid_epoch = self.step_in_epoch < self.steps_per_epoch and not run_ends
        if mid_epoch and cfg.eval_every_steps and self.global_step % cfg.eval_every_steps == 0:
            metrics = self.evaluate()
            if metrics:
                self.log.write({"event": "eval", "epoch": self.epoch, "global_step": self.global_step,
                                "epoch_float": self.epoch + self.step_in_epoch / self.steps_per_epoch,
                                **self._val_record(metrics)})
                if info.is_main:
                    print(f"step {self.global_step}/{self.total_steps}: {self.task.format_metrics(metrics)}", file=sys.stderr)
            improved = self._update_best(metrics)
            self.save_last()
            if improved:
                self.save_best()
            self._plot()
            barrier(info)
        elif mid_epoch and cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0:
            self.save_last()

    def evaluate(self) -> dict[str, Any]:
        """The task's metrics on the validation split ({} without one); the model returns to training mode."""
        if self.val_loader is None:
            return {}
        self.sync_buffers()
        metrics = self.task.evaluate(self.model, self.val_loader, self)
        self.model.train()
        self.last_eval = dict(metrics)
        self._emit("on_evaluate", metrics)
        return metrics

    def _val_record(self, metrics: dict[str, Any]) -> dict[str, Any]:
        rec = {f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("n", "skipped")}
        if "n" in metrics:
            rec["val_images"] = metrics["n"]
        return rec

    def _update_best(self, metrics: dict[str, Any]) -> bool:
        where = {"epoch": self.epoch, "global_step": self.global_step}
        if not metrics:
            return False
        value = metrics[self.task.best_metric]
        if self.task.is_better(value, self.best):
            self.best = float(value)
            self.best_metrics = {**where, **metrics}
            return True
        return False

    def end_epoch(self, complete: bool, seconds: float) -> None:
        """Epoch record, evaluation when due, last.pth (and best.pth when improved), curves."""
        cfg, info = self.cfg, self.info
        s, n = reduce_sum([self._epoch_loss[0], float(self._epoch_loss[1])], info)
        train_loss = s / max(n, 1)
        record: dict[str, Any] = {"event": "epoch", "epoch": self.epoch, "global_step": self.global_step, "train_loss": train_loss,
                                  "lr": self.optimizer.param_groups[0]["lr"], "epoch_time_s": seconds}
        is_last = self._finished(self.epoch + 1) if complete else True
        if cfg.eval_every_steps:
            due = is_last or self.global_step % cfg.eval_every_steps == 0
        else:
            due = (self.epoch + 1) % max(cfg.eval_every, 1) == 0 or is_last
        improved = False
        if self.val_loader is not None and due:
            metrics = self.evaluate()
            record.update(self._val_record(metrics))
            improved = self._update_best(metrics)
        elif self.val_loader is None:
            improved = True
            self.best_metrics = {"epoch": self.epoch, "global_step": self.global_step, "train_loss": train_loss}
        if self.skipped_total:
            record["skipped_images"] = self.skipped_total
            if info.is_main:
                warnings.warn(f"{self.skipped_total} unreadable image(s) skipped so far (see the warnings above)", stacklevel=2)
        self.log.write(record)
        self._emit("on_epoch_end", record)
        if info.is_main:
            msg = f"epoch {self.epoch + 1}/{self.num_epochs}: train loss {train_loss:.4f}"
            if self.val_loader is not None and due:
                msg += ", " + self.task.format_metrics(self.last_eval)
            print(msg, file=sys.stderr, flush=True)
        if complete:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.save_last()
        if improved:
            self.save_best()
        self._plot()
        barrier(info)

    def _plot(self) -> None:
        if not self.info.is_main:
            return
        try:
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png", title=self.task.title(self.model, self.cfg),
                        val_metrics=self.task.curve_metrics)
        except ImportError:  # matplotlib is optional
            pass

    def summary(self) -> dict[str, Any]:
        """Paths, best and final metrics, steps, time; writes the ``end`` record (checks replicas under DDP)."""
        self.sync_buffers()
        out = self.out
        summary = {
            "output": str(out), "last": str(out / "last.pth"), "best": str(out / "best.pth"),
            "metrics": str(out / "metrics.jsonl"), "curves": str(out / "curves.png"), "best_metrics": self.best_metrics,
            "best_metric": self.task.best_metric, "final": self.last_eval, "epochs": self.num_epochs,
            "global_step": self.global_step, "time_s": time.perf_counter() - self._t_start,
            "classes": self.data.classes, "skipped_images": self.skipped_total,
        }
        end: dict[str, Any] = {"event": "end", "global_step": self.global_step, "time_s": summary["time_s"],
                               "best_metric": self.task.best_metric, "best": self.best}
        if self.info.distributed:  # every process must hold the same weights (and BatchNorm statistics) after synchronised steps
            tensors = [*self.model.parameters(), *(b for b in self.model.buffers() if b.is_floating_point())]
            with torch.no_grad():
                digest = float(sum(t.double().abs().sum() for t in tensors))
            digests = all_gather_object(digest, self.info)
            end["replica_digests"] = digests
            summary["replicas_in_sync"] = end["replicas_in_sync"] = max(digests) == min(digests)
        self.log.write(end)
        self._emit("on_run_end", summary)
        return summary


# ---------------------------------------------------------------------- main entry
def train(cfg: TrainConfig, task: Task | None = None, callbacks: Iterable[Callback] = ()) -> dict[str, Any]:
    """Run a training job; returns a summary (best/last metrics, paths, time).

    ``task``: what is trained (default: :class:`~transnext.engine.classification.ClassificationTask`).
    Raises :class:`TrainingInterrupted` after SIGINT/SIGTERM (a resumable ``last.pth`` is saved),
    :class:`TrainingError` when training cannot continue, ``ValueError``/``DataError`` for bad input.
    """
    cfg.validate()
    info = init_distributed(cfg.device)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        return TrainRun(cfg, task, callbacks, info).fit()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        cleanup(info)
