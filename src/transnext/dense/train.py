"""Entry points of dense training: the shared run (:class:`~transnext.engine.trainer.TrainRun`) with a task.

:func:`train_detector` / :func:`train_segmenter` run :class:`~transnext.dense.tasks.DetectionTask`
/ :class:`~transnext.dense.tasks.SegmentationTask` in the shared loop; every schedule, the step
schedule of the Mask R-CNN 1x recipe (``sched="step"``) included, is the shared loop's own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..engine.trainer import Callback, train
from .tasks import DetectionTask, SegmentationTask

__all__ = ["train_dense", "train_detector", "train_segmenter"]


def train_dense(cfg: Any, task: Any, callbacks: Iterable[Callback] = ()) -> dict[str, Any]:
    """Run ``task`` with ``cfg`` in the shared loop (:func:`transnext.engine.trainer.train`); the summary also holds the task."""
    summary = train(cfg, task, callbacks)
    summary["task"] = task
    return summary


def train_detector(cfg: Any, callbacks: Iterable[Callback] = ()) -> dict[str, Any]:
    """Train a detector described by a :class:`~transnext.dense.config.DetectionConfig`."""
    return train_dense(cfg, DetectionTask(), callbacks)


def train_segmenter(cfg: Any, callbacks: Iterable[Callback] = ()) -> dict[str, Any]:
    """Train a segmenter described by a :class:`~transnext.dense.config.SegmentationConfig`."""
    return train_dense(cfg, SegmentationTask(), callbacks)
