"""Training, evaluation and prediction engine (the functions behind the ``transnext`` commands)."""

from .classification import ClassificationTask
from .config import TrainConfig, load_config_file, resolve_config, save_config
from .evaluate import ALEXNET_ERRORS, BENCHMARKS, detect_benchmark, evaluate, markdown_table, run_benchmark
from .modeling import build_model, checkpoint_info, model_from_checkpoint
from .predict import class_names_for, predict_images
from .presets import PRESETS, get_preset, list_presets
from .task import StepOutput, Task, TaskData
from .trainer import Callback, TrainingError, TrainingInterrupted, TrainRun, train

__all__ = [
    "ALEXNET_ERRORS",
    "BENCHMARKS",
    "Callback",
    "ClassificationTask",
    "PRESETS",
    "StepOutput",
    "Task",
    "TaskData",
    "TrainConfig",
    "TrainRun",
    "TrainingError",
    "TrainingInterrupted",
    "build_model",
    "checkpoint_info",
    "class_names_for",
    "detect_benchmark",
    "evaluate",
    "get_preset",
    "list_presets",
    "load_config_file",
    "markdown_table",
    "model_from_checkpoint",
    "predict_images",
    "resolve_config",
    "run_benchmark",
    "save_config",
    "train",
]
