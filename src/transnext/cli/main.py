"""``transnext`` command: one tool, one module per subcommand.

Each subcommand lives in ``transnext.cli.<module>`` and provides ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their subcommand runs, so ``transnext info``
does not pay for the training stack.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("info", "list variants with parameters, GFLOPs and published accuracy"),
    "convert": ("convert", "convert a checkpoint between .pth and .safetensors"),
    "export": ("export", "export a model to ONNX (one input size, checked in onnxruntime)"),
    "train": ("train", "train or fine-tune a model (published recipe presets)"),
    "eval": ("evaluate", "evaluate a model on an image folder or robustness benchmark"),
    "predict": ("predict", "top-k predictions for images or folders"),
    "benchmark": ("benchmark", "speed and memory of attention backends and peer backbones, side by side"),
    "demo": ("demo", "train, evaluate and predict on the embedded demo data set"),
    "visualize": ("visualize", "see what a model sees: effective receptive field, attention maps, class activation maps"),
    "detect": ("detect", "object detection / instance segmentation: train, eval, predict, demo"),
    "segment": ("segment", "semantic segmentation (UPerNet): train, eval, predict, demo"),
}


def build_parser() -> argparse.ArgumentParser:
    from .. import DIST_NAME, __version__

    parser = argparse.ArgumentParser(prog="transnext", description="TransNeXt models: train, evaluate, predict, benchmark.")
    parser.add_argument("--version", action="version", version=f"transnext {__version__} ({DIST_NAME})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # one flag for every subcommand, so no module can forget it
        p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
        try:
            mod = importlib.import_module(f"transnext.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"transnext.cli.{module}":
                raise
            p.set_defaults(_missing=True)
            continue
        mod.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        print(f"transnext {args.command}: not available in this installation", file=sys.stderr)
        return 2
    mod = importlib.import_module(f"transnext.cli.{args._module}")
    try:
        return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, TypeError, ImportError) as e:
        # Expected user errors get one clear line, not a traceback (--debug shows it).
        if args.debug:
            raise
        print(f"transnext {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
