"""Entry points of dense training: the shared run (:class:`~transnext.engine.trainer.TrainRun`) with a task.

:func:`train_detector` / :func:`train_segmenter` run :class:`~transnext.dense.tasks.DetectionTask`
/ :class:`~transnext.dense.tasks.SegmentationTask` in the shared loop. :class:`DenseTrainRun` adds
one thing the shared loop does not have yet: the step schedule of the Mask R-CNN 1x recipe
(``sched="step"``: the learning rate times ``decay_rate`` at each epoch of ``decay_milestones``,
after the linear warm-up); every other schedule is the shared loop's own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..engine.trainer import Callback, TrainRun
from .tasks import DetectionTask, SegmentationTask

__all__ = ["DenseTrainRun", "train_dense", "train_detector", "train_segmenter"]


class DenseTrainRun(TrainRun):
    """:class:`TrainRun` with the multi-step schedule of the dense recipes."""

    def _build_scheduler(self) -> Any:
        cfg = self.cfg
        if getattr(cfg, "sched", None) != "step":
            return super()._build_scheduler()
        per_step = cfg.sched_per_step or self.max_steps is not None
        self.per_step = per_step
        unit = self.steps_per_epoch if per_step else 1  # milestones are given in epochs
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * self.steps_per_epoch)
        if not per_step:
            warmup = -(-warmup // self.steps_per_epoch)
        return _multistep_scheduler(self.optimizer, [int(m * unit) for m in cfg.decay_milestones], cfg.decay_rate, warmup,
                                    cfg.warmup_lr, t_in_epochs=not per_step)


def _multistep_scheduler(optimizer: Any, milestones: list[int], decay_rate: float, warmup_t: int, warmup_lr_init: float,
                         t_in_epochs: bool) -> Any:
    """timm-style scheduler: linear warm-up to the base lr over ``warmup_t``, then ``lr * decay_rate**k``
    where ``k`` counts the milestones ``<= t`` (mmcv's step policy: the decay starts at index ``t == m``)."""
    import bisect

    from timm.scheduler.scheduler import Scheduler

    class MultiStepWarmup(Scheduler):
        def __init__(self) -> None:
            super().__init__(optimizer, "lr", t_in_epochs=t_in_epochs)
            self.milestones = sorted(milestones)
            self.decay_rate = decay_rate
            self.warmup_t = warmup_t
            self.warmup_lr_init = warmup_lr_init
            self.update_groups(self._get_lr(0))

        def _get_lr(self, t: int) -> list[float]:
            factor = self.decay_rate ** bisect.bisect_right(self.milestones, t)
            if t < self.warmup_t:
                return [self.warmup_lr_init + t * (v * factor - self.warmup_lr_init) / self.warmup_t for v in self.base_values]
            return [v * factor for v in self.base_values]

    return MultiStepWarmup()


def train_dense(cfg: Any, task: Any, callbacks: Iterable[Callback] = ()) -> dict[str, Any]:
    """Run ``task`` with ``cfg`` in the shared loop (the set-up and clean-up of ``engine.trainer.train``)."""
    from ..engine.distributed import cleanup, init_distributed

    cfg.validate()
    info = init_distributed(cfg.device)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        run = DenseTrainRun(cfg, task, callbacks, info)
        summary = run.fit()
        summary["task"] = task
        return summary
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        cleanup(info)


def train_detector(cfg: Any, callbacks: Iterable[Callback] = ()) -> dict[str, Any]:
    """Train a detector described by a :class:`~transnext.dense.config.DetectionConfig`."""
    return train_dense(cfg, DetectionTask(), callbacks)


def train_segmenter(cfg: Any, callbacks: Iterable[Callback] = ()) -> dict[str, Any]:
    """Train a segmenter described by a :class:`~transnext.dense.config.SegmentationConfig`."""
    return train_dense(cfg, SegmentationTask(), callbacks)
