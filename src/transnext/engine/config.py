"""Training configuration: one dataclass, presets, config files (YAML/TOML) and CLI flags.

Precedence: preset < config file < command-line flags. The effective configuration is saved
as ``config.yaml`` beside the checkpoints, and inside each checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..preprocessing import IMAGENET_MEAN, IMAGENET_STD

SCHEDULES = ("cosine", "poly", "step", "constant")

__all__ = ["SCHEDULES", "TrainConfig", "add_config_arguments", "config_from_args", "load_config_file", "resolve_config", "save_config"]


@dataclass
class TrainConfig:
    # model
    model: str = "transnext_micro"
    model_kwargs: dict = field(default_factory=dict)  # architecture overrides (embed_dims, depths, ...)
    num_classes: int | None = None  # None: from the data set
    img_size: int = 224
    pretrain_size: int | None = None  # None: img_size (224 for the 384 fine-tunes)
    pos_bias: str = "extrapolate"
    drop_path: float | None = None  # None: the published rate of the variant
    pretrained: bool = False  # start from the published weights of `model`
    initial_checkpoint: str | None = None  # start from these weights (other size / classes allowed)
    # data
    dataset: str = "folder"  # "folder" (data_dir/train, data_dir/val) or "demo"
    data_dir: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    strict_data: bool = False
    num_workers: int = 8
    # batch and optimisation
    batch_size: int = 128  # per process
    total_batch_size: int | None = 1024  # reached by gradient accumulation; None: no accumulation
    epochs: int = 300
    max_steps: int | None = None  # run length in optimizer steps instead of epochs (iteration schedules)
    opt: str = "adamw"
    lr: float = 1e-3
    opt_eps: float = 1e-8
    weight_decay: float = 0.05
    sched: str = "cosine"  # "cosine", "poly", "step" (multi-step, the Mask R-CNN 1x schedule) or "constant"
    sched_per_step: bool = True  # False: step the schedule once per epoch, like the reference
    poly_power: float = 1.0  # exponent of the "poly" schedule
    decay_milestones: tuple = (8, 11)  # sched="step": epochs from which the lr is multiplied by decay_rate once more
    decay_rate: float = 0.1  # sched="step": factor applied at each milestone
    warmup_epochs: float = 5
    warmup_steps: int | None = None  # warm-up length in optimizer steps (overrides warmup_epochs)
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    clip_grad: float | None = 1.0
    # augmentation
    aa: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    remode: str = "pixel"
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (0.75, 1.3333333333333333)
    hflip: float = 0.5
    color_jitter: float = 0.4
    interpolation: str = "bicubic"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    repeated_aug: int = 3  # repeats per sample under DDP (1: off)
    repeated_aug_single: bool = False  # also use repeated augmentation in a single process
    crop_pct: float | None = None  # evaluation crop (None: 0.875 below 384, squash at >= 384)
    # system
    amp: str = "auto"  # "auto" (fp16 on CUDA, bf16 on CPU), "fp16", "bf16", "none"
    compile: bool = False
    channels_last: bool = False
    grad_checkpointing: bool = False
    device: str = "auto"
    deterministic: bool = False
    seed: int = 0
    attn_backend: str | None = None
    threads: int | None = None  # intra-op CPU threads per process (None: torch's default)
    # output
    output: str = "runs/train"
    resume: str | None = None  # a checkpoint path, or "auto": <output>/last.pth if present
    save_every_steps: int = 0  # also save `last` every N optimizer steps (0: at epoch ends only)
    eval_every: int = 1  # epochs between evaluations
    eval_every_steps: int = 0  # optimizer steps between evaluations (0: by epochs, eval_every)
    log_every: int = 10  # optimizer steps between metric lines
    progress: bool = True
    preset: str | None = None

    # what --data-dir must hold, named by the missing-data error (subclasses name their layouts)
    DATA_LAYOUT: ClassVar[str] = "an ImageFolder tree with train/ and val/"
    # options a subclass's task ignores: still accepted, not listed by --help
    IGNORED_OPTIONS: ClassVar[frozenset[str]] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], require_data: bool = True) -> TrainConfig:
        """Validated configuration; ``require_data=False`` accepts a missing ``data_dir`` (``--print-config``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        cfg = cls(**{k: v for k, v in d.items()})
        cfg._require_data = require_data
        cfg.validate()
        return cfg

    def validate(self) -> None:
        fields = {f.name: f for f in dataclasses.fields(self)}
        hints = typing.get_type_hints(type(self))
        for name in fields:
            setattr(self, name, _coerce(name, getattr(self, name), hints[name]))
        checks = [
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.total_batch_size is None or self.total_batch_size >= 1, "total_batch_size must be >= 1"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.img_size >= 1, f"img_size must be positive, got {self.img_size}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.sched in SCHEDULES, f"sched must be 'cosine', 'poly', 'step' or 'constant', got {self.sched!r}"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.eval_every_steps >= 0 and self.save_every_steps >= 0, "eval_every_steps and save_every_steps must be >= 0"),
            (self.amp in ("auto", "fp16", "bf16", "none"), f"amp must be auto, fp16, bf16 or none, got {self.amp!r}"),
            (self.dataset in ("folder", "demo"), f"dataset must be 'folder' or 'demo', got {self.dataset!r}"),
            (self.pos_bias in ("extrapolate", "interpolate"), f"pos_bias must be extrapolate or interpolate, got {self.pos_bias!r}"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (self.threads is None or self.threads >= 1, "threads must be >= 1"),
            (self.repeated_aug >= 1, "repeated_aug must be >= 1"),
            (0 <= self.mixup_prob <= 1, "mixup_prob must be in [0, 1]"),
            (0 <= self.smoothing < 1, "smoothing must be in [0, 1)"),
            (len(self.scale) == 2 and len(self.ratio) == 2, "scale and ratio take two numbers each"),
            (len(self.mean) == 3 and len(self.std) == 3, "mean and std take three numbers each"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.sched == "step":
            _check_step_schedule(self.decay_milestones, self.decay_rate)
        if self.dataset == "folder" and not self.data_dir and getattr(self, "_require_data", True):
            raise ValueError(f"no training data: pass --data-dir DIR ({self.DATA_LAYOUT}) or --dataset demo")


def _check_step_schedule(milestones: tuple, rate: float) -> None:
    """The milestones (epochs) of ``sched="step"`` must be >= 0 and increasing; the rate in (0, 1]."""
    ms = list(milestones)
    if not ms or any(m < 0 for m in ms) or any(b <= a for a, b in zip(ms, ms[1:])):
        raise ValueError(f"decay_milestones must be one or more increasing epochs >= 0 (e.g. 8 11), got {tuple(ms)}")
    if not 0 < rate <= 1:
        raise ValueError(f"decay_rate must be in (0, 1] (the lr is multiplied by it at each milestone), got {rate}")


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _coerce(name: str, v: Any, hint: Any) -> Any:
    """Type-check a value read from a config file (lists -> tuples, ints -> floats...)."""
    if v is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ValueError(f"option {name!r} cannot be empty")
    base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    t = base[0]
    try:
        if t is bool:
            if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
                return v.lower() in ("true", "1", "yes")
            if not isinstance(v, bool):
                raise TypeError
            return v
        if t is int:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise TypeError
            return int(v)
        if t is float:
            if isinstance(v, bool):
                raise TypeError
            return float(v)
        if t is str:
            if not isinstance(v, str):
                raise TypeError
            return v
        if t is tuple:
            if not isinstance(v, (list, tuple)):
                raise TypeError
            return tuple(float(x) for x in v)
        if t is dict:
            if not isinstance(v, dict):
                raise TypeError
            return {k: tuple(x) if isinstance(x, list) else x for k, x in v.items()}
    except (TypeError, ValueError):
        raise ValueError(f"option {name!r}: expected {getattr(t, '__name__', t)}, got {v!r}") from None
    return v


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON file of options (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python < 3.11
                try:
                    import tomli as tomllib  # type: ignore[no-redef]
                except ModuleNotFoundError:
                    raise ImportError(f"reading {path} needs Python 3.11+ or the tomli package (pip install tomli)") from None
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"config file {path}: unknown format {suffix!r} (use .yaml, .yml, .toml or .json)")
    except ImportError:
        raise
    except (ValueError, TypeError) as e:
        raise ValueError(f"config file {path} is not valid {suffix[1:].upper()}: {e}") from e
    except Exception as e:  # yaml.YAMLError and friends
        raise ValueError(f"config file {path} is not valid {suffix[1:].upper()}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    from ..checkpoints import atomic_write

    d = cfg.to_dict()
    try:
        import yaml

        text = yaml.safe_dump(d, sort_keys=False)
    except ImportError:
        path = Path(path).with_suffix(".json")
        text = json.dumps(d, indent=2)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def resolve_config(preset: str | None = None, file: str | Path | None = None, overrides: dict[str, Any] | None = None,
                   require_data: bool = True) -> TrainConfig:
    """Preset (or the preset of ``overrides['model']``) < config file < explicit overrides.

    ``require_data=False`` accepts a missing ``data_dir`` (to print a recipe without its data).
    """
    from .presets import get_preset, preset_for_model

    file_opts = load_config_file(file) if file else {}
    overrides = dict(overrides or {})
    preset = preset or overrides.pop("preset", None) or file_opts.pop("preset", None)
    if preset is None:
        model = overrides.get("model") or file_opts.get("model")
        preset = preset_for_model(model) if model else None
    base = get_preset(preset) if preset else {}
    merged = {**base, **file_opts, **overrides}
    merged["preset"] = preset
    return TrainConfig.from_dict(merged, require_data=require_data)


# ---------------------------------------------------------------------- argparse
_HELP = {
    "model": "variant name (transnext_micro/tiny/small/base/micro_aaaa) or a preset's model",
    "model_kwargs": "architecture overrides as JSON, e.g. '{\"depths\": [1,1,2,1]}'",
    "total_batch_size": "target total batch; gradient accumulation makes up the difference",
    "resume": "checkpoint to continue from, or 'auto' (<output>/last.pth when present)",
    "amp": "mixed precision: auto (fp16 on CUDA, bf16 on CPU), fp16, bf16, none",
    "sched_per_step": "update the learning rate every optimizer step (--no-sched-per-step: once per epoch)",
    "max_steps": "run length in optimizer steps (overrides --epochs; e.g. 160000 with --sched poly)",
    "eval_every_steps": "evaluate every N optimizer steps instead of every --eval-every epochs",
    "warmup_steps": "warm-up length in optimizer steps (overrides --warmup-epochs)",
    "sched": "learning-rate schedule: cosine, poly, step (x --decay-rate at each of --decay-milestones) or constant",
    "decay_milestones": "--sched step: epochs from which the lr is multiplied by --decay-rate once more",
}


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type[TrainConfig] = TrainConfig) -> None:
    """One flag per field of ``config_cls`` (``--batch-size``...), all defaulting to 'not given'."""
    hints = typing.get_type_hints(config_cls)
    defaults = config_cls.__dataclass_fields__
    for f in dataclasses.fields(config_cls):
        if f.name == "preset":
            continue
        hidden = f.name in config_cls.IGNORED_OPTIONS
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        t = args[0]
        d = defaults[f.name]
        dv = d.default if d.default is not dataclasses.MISSING else d.default_factory()  # type: ignore[misc]
        text = _HELP.get(f.name, "")
        if f.name == "dataset":
            text = f"'folder' ({config_cls.DATA_LAYOUT}, under --data-dir) or 'demo' (embedded data set)"
        help_text = text + (f" (default: {dv})" if dv not in ((), {}) else "")
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, dest=f.name, help=argparse.SUPPRESS if hidden else help_text.strip())
        if t is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif t is tuple:
            parser.add_argument(flag, type=float, nargs="+", metavar="X", **kw)
        elif t is dict:
            parser.add_argument(flag, type=_json_dict, metavar="JSON", **kw)
        elif type(None) in typing.get_args(hint) and t in (int, float, str):
            parser.add_argument(flag, type=_optional(t), metavar=t.__name__.upper(), **kw)
        else:
            parser.add_argument(flag, type=t, metavar=t.__name__.upper(), **kw)


def _optional(t: type) -> Any:
    def parse(s: str) -> Any:
        return None if s.lower() in ("none", "null", "off") else t(s)

    parse.__name__ = t.__name__
    return parse


def _json_dict(s: str) -> dict:
    try:
        d = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}: {e}") from e
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return d


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return resolve_config(getattr(args, "preset", None), getattr(args, "config", None), overrides,
                          require_data=not getattr(args, "print_config", False))
