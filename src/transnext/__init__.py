"""transnext: TransNeXt vision backbones for PyTorch, exact to the reference, at any input size."""

from __future__ import annotations

import importlib.util

from .checkpoints import CheckpointError, convert_checkpoint, load_checkpoint, save_state_dict
from .models import (
    VARIANTS,
    WEIGHTS,
    TransNeXt,
    Weights,
    create_model,
    get_weights,
    list_models,
    list_pretrained,
)

DIST_NAME = "transnext-pytorch"  # the distribution (pip) name; the import name is `transnext`


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DIST_NAME)
    except PackageNotFoundError:  # a source tree on sys.path that was never installed
        return "0+unknown"


__version__ = _version()

__all__ = [
    "DIST_NAME",
    "VARIANTS",
    "WEIGHTS",
    "CheckpointError",
    "TransNeXt",
    "Weights",
    "__version__",
    "convert_checkpoint",
    "create_model",
    "get_weights",
    "list_models",
    "list_pretrained",
    "load_checkpoint",
    "save_state_dict",
]


def _register_timm() -> None:
    # timm is an optional extra: when installed, `import transnext` makes the variants
    # available to timm.create_model.
    if importlib.util.find_spec("timm") is None:
        return
    try:
        from .integrations import timm as _timm  # noqa: F401
    except ImportError:  # a broken timm install must not break the core package
        pass


_register_timm()
