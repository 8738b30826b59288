"""What a task (classification, detection, segmentation...) gives the training loop.

The loop in :mod:`transnext.engine.trainer` owns everything that does not depend on the task:
process groups and devices, seeding, the resumable sampler, gradient accumulation, AMP and the
gradient scaler, clipping, the optimizer and learning-rate schedule, epoch- or iteration-based
run length, evaluation cadence, atomic checkpoints with exact resume, SIGINT/SIGTERM handling,
progress bars, ``metrics.jsonl`` and ``curves.png``. A task supplies the rest by subclassing
:class:`Task`:

``build_data(cfg, info) -> TaskData``
    Training and validation data sets (any map-style data set, items of any structure), class
    names if the task has them, and the validation batch size. The loop wraps the training set
    in a seeded, resumable, DDP-sharded sampler and batches items with :meth:`Task.collate`.

``build_model(cfg, data, init_weights) -> nn.Module``
    The model, on the CPU, in training mode. ``init_weights`` is False when the run resumes
    (weights come from the checkpoint): the task then skips pretrained / initial weights.
    Anything else the task needs per run (criterion, Mixup...) is set up here.

``collate(items) -> batch``
    DataLoader ``collate_fn`` for both splits (default: :func:`transnext.data.collate_skip`,
    which stacks ``(image, target)`` pairs and counts unreadable items). A detection task
    returns ``(list of images, list of target dicts, n_skipped)`` instead.

``train_step(model, batch, run) -> StepOutput``
    Forward pass and loss of one micro-batch, run under the run's autocast. ``model`` is the
    wrapped training module (DDP / compiled); move tensors with ``run.device``. Return the
    mean loss as a tensor (the loop scales, back-propagates and accumulates it), the number of
    samples used, the unreadable items skipped, and optional extra scalars to log (e.g. the
    components of a detector's loss dict). ``loss=None`` means "nothing usable in this batch".

``evaluate(model, loader, run) -> dict[str, float]``
    Metrics on the validation loader (``model`` is the plain module; the loop switches it back
    to training mode afterwards). Under DDP each process sees its shard of the data; the task
    reduces across processes (``run.info``; see :mod:`transnext.engine.distributed`) so every
    process returns the same figures. The dict must hold :attr:`Task.best_metric`, and ``n``
    (samples evaluated) by convention; scalar entries are logged as ``val_<name>``.

``checkpoint_extras(model) -> dict``
    Plain data saved beside the weights in ``last.pth`` and ``best.pth`` (e.g. ``arch``,
    ``classes``, ``data_cfg``): what the task's inference side needs to rebuild the model.
    An ``arch`` entry is compared on resume to refuse a checkpoint of another architecture.

Optional hooks with defaults: ``param_groups(model, cfg)`` (optimizer groups; default: no
weight decay on biases, norms and position tables), ``format_metrics(metrics)`` (the epoch
line) and ``title(model, cfg)`` (the curves' title). Class attributes: ``name``,
``best_metric`` (key of ``evaluate``'s dict that selects ``best.pth``), ``higher_is_better``
and ``curve_metrics`` (metric names plotted in ``curves.png``).

Run length is ``cfg.epochs`` epochs, or ``cfg.max_steps`` optimizer steps when set (the
iteration schedules of dense tasks, e.g. 160k iterations with ``sched="poly"``); evaluation
runs every ``cfg.eval_every`` epochs, or every ``cfg.eval_every_steps`` steps when set. A task
with its own options subclasses :class:`~transnext.engine.config.TrainConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from .config import TrainConfig
    from .distributed import DistInfo
    from .trainer import TrainRun

__all__ = ["StepOutput", "Task", "TaskData"]


@dataclass
class TaskData:
    """Data sets of a run. ``val`` None: no evaluation (``best.pth`` follows the last epoch)."""

    train: Any
    val: Any | None = None
    classes: list[str] | None = None
    val_batch_size: int | None = None  # None: the training batch size


@dataclass
class StepOutput:
    """Result of :meth:`Task.train_step` for one micro-batch."""

    loss: torch.Tensor | None  # mean loss (None: the batch held nothing usable)
    samples: int = 0  # samples that went into the loss (throughput, logging)
    skipped: int = 0  # unreadable items dropped from the batch
    logs: dict[str, float] = field(default_factory=dict)  # extra per-step scalars (averaged over accumulation)


class Task:
    """Base class of a training task; see the module docstring for the protocol."""

    name: ClassVar[str] = "task"
    best_metric: ClassVar[str] = "loss"
    higher_is_better: ClassVar[bool] = False
    curve_metrics: ClassVar[tuple[str, ...]] = ()

    def build_data(self, cfg: TrainConfig, info: DistInfo) -> TaskData:
        raise NotImplementedError

    def build_model(self, cfg: TrainConfig, data: TaskData, init_weights: bool) -> torch.nn.Module:
        raise NotImplementedError

    def collate(self, items: list) -> Any:
        from ..data import collate_skip

        return collate_skip(items)

    def train_step(self, model: torch.nn.Module, batch: Any, run: TrainRun) -> StepOutput:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, loader: Any, run: TrainRun) -> dict[str, float]:
        raise NotImplementedError

    def checkpoint_extras(self, model: torch.nn.Module) -> dict[str, Any]:
        return {}

    def param_groups(self, model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
        from ..models import param_groups_weight_decay

        return param_groups_weight_decay(model, cfg.weight_decay)

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        return ", ".join(f"val {k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))

    def title(self, model: torch.nn.Module, cfg: TrainConfig) -> str:
        return cfg.model + (f" ({cfg.preset} preset)" if cfg.preset else "")

    def is_better(self, value: float, best: float | None) -> bool:
        if value != value:  # NaN never improves
            return False
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best
