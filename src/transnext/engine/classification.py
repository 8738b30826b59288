"""Image classification as a :class:`~transnext.engine.task.Task`: the ImageNet recipe's task."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .task import StepOutput, Task, TaskData

if TYPE_CHECKING:
    from .config import TrainConfig
    from .distributed import DistInfo
    from .trainer import TrainRun

__all__ = ["ClassificationTask"]


# How a training run takes a local file instead of published weights (named when the hub cannot be reached).
INITIAL_CHECKPOINT_OPTION = "--initial-checkpoint PATH (initial_checkpoint= in a config)"


class ClassificationTask(Task):
    """ImageFolder (or the embedded demo set) -> TransNeXt -> cross-entropy; best = validation top-1.

    Mixup/CutMix with soft-target cross-entropy, or label smoothing, as the recipe sets them.
    """

    name = "classification"
    best_metric = "top1"
    higher_is_better = True
    curve_metrics = ("top1", "top5")

    def __init__(self) -> None:
        self.cfg: TrainConfig | None = None
        self.classes: list[str] = []
        self.criterion: torch.nn.Module | None = None
        self.mixup: Any = None

    # ------------------------------------------------------------------ data
    def build_data(self, cfg: TrainConfig, info: DistInfo) -> TaskData:
        from ..data import DataError, build_eval_transform, build_train_transform, demo_dataset, scan_image_folder
        from ..data.datasets import ImageFileDataset

        train_tf = build_train_transform(
            cfg.img_size, auto_augment=cfg.aa, re_prob=cfg.reprob, re_mode=cfg.remode, interpolation=cfg.interpolation,
            scale=cfg.scale, ratio=cfg.ratio, hflip=cfg.hflip, color_jitter=cfg.color_jitter, mean=cfg.mean, std=cfg.std,
        )
        eval_tf = build_eval_transform(cfg.img_size, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
        if cfg.dataset == "demo":
            train = demo_dataset("train", train_tf)
            return TaskData(train, demo_dataset("val", eval_tf), list(train.classes))
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
            vs, _ = scan_image_folder(val_dir, class_to_idx={c: i for i, c in enumerate(classes)}, strict=cfg.strict_data,
                                      what="validation")
            val = ImageFileDataset(vs, eval_tf, strict=cfg.strict_data, classes=classes)
        else:
            warnings.warn(f"no validation folder {val_dir}: training without evaluation; best.pth follows the last epoch",
                          stacklevel=2)
        return TaskData(train, val, list(classes))

    # ------------------------------------------------------------------ model and loss
    def build_model(self, cfg: TrainConfig, data: TaskData, init_weights: bool) -> torch.nn.Module:
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        from ..models import DROP_PATH_RATES
        from ..models.registry import split_name
        from .modeling import check_image_size, create_model_with_arch

        self.cfg = cfg
        self.classes = list(data.classes or [])
        num_classes = cfg.num_classes or len(self.classes)
        if num_classes < len(self.classes):
            raise ValueError(f"--num-classes {num_classes} is smaller than the {len(self.classes)} classes of the training set")
        variant, _ = split_name(cfg.model)
        drop_path = cfg.drop_path if cfg.drop_path is not None else DROP_PATH_RATES.get(variant, 0.0)
        start = cfg.initial_checkpoint if init_weights else None
        if cfg.pretrained and init_weights and start is None:
            from ..checkpoints import download_weights
            from ..models.registry import get_weights

            # fetched here so that an unreachable hub names the training option that takes a local file
            start = download_weights(get_weights(cfg.model), local_option=INITIAL_CHECKPOINT_OPTION)
        model = create_model_with_arch(
            cfg.model, num_classes=num_classes, model_kwargs=cfg.model_kwargs, img_size=cfg.img_size,
            pretrain_size=cfg.pretrain_size, pos_bias=cfg.pos_bias, drop_path=drop_path, attn_backend=cfg.attn_backend,
            pretrained=False, checkpoint_path=start,
        )
        check_image_size(model, cfg.img_size)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                mode=cfg.mixup_mode, label_smoothing=cfg.smoothing, num_classes=num_classes,
            )
            self.criterion = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
        else:
            self.criterion = torch.nn.CrossEntropyLoss()
        return model

    def train_step(self, model: torch.nn.Module, batch: Any, run: TrainRun) -> StepOutput:
        x, y, skipped = batch
        if x is None:
            return StepOutput(None, skipped=skipped)
        if self.mixup is not None and len(x) % 2:  # timm's batch Mixup needs an even batch
            x, y = x[:-1], y[:-1]
            if len(x) == 0:
                return StepOutput(None, skipped=skipped)
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        if run.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        assert self.criterion is not None, "build_model() sets the criterion"
        return StepOutput(self.criterion(model(x), y), samples=len(x), skipped=skipped)

    # ------------------------------------------------------------------ evaluation and outputs
    def evaluate(self, model: torch.nn.Module, loader: Any, run: TrainRun) -> dict[str, float]:
        from .evaluate import evaluate

        return evaluate(model, loader, run.device, run.amp, None, run.info, run.show_progress, "validate",
                        run.cfg.channels_last)

    def checkpoint_extras(self, model: torch.nn.Module) -> dict[str, Any]:
        cfg = self.cfg
        assert cfg is not None, "build_model() records the configuration"
        data_cfg = dict(img_size=cfg.img_size, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation,
                        mean=list(cfg.mean), std=list(cfg.std))
        return {"arch": model.arch, "classes": self.classes, "data_cfg": data_cfg}

    def format_metrics(self, metrics: dict[str, Any]) -> str:
        return f"val top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%, loss {metrics['loss']:.4f}"

    def title(self, model: torch.nn.Module, cfg: TrainConfig) -> str:
        title = cfg.model
        if cfg.model_kwargs:
            depths = [len(getattr(model, f"block{i + 1}")) for i in range(model.num_stages)]
            title = f"TransNeXt dims {'/'.join(map(str, model.embed_dims))}, depths {'/'.join(map(str, depths))}"
        return title + (f" ({cfg.preset} preset)" if cfg.preset else "")
