"""``transnext train``: train or fine-tune with the published recipe (presets) or any settings."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..engine.config import add_config_arguments
    from ..engine.presets import PRESETS

    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.epilog = (
        "Precedence: preset < --config file < flags. Presets: " + ", ".join(PRESETS) + ". "
        "Multi-process: torchrun --nproc-per-node N -m transnext train ... "
        "Resume: --resume auto (or a path to last.pth)."
    )
    g = parser.add_argument_group("recipe")
    g.add_argument("--preset", default=None, metavar="NAME",
                   help=f"recipe preset ({', '.join(PRESETS)}); default: the preset of --model")
    g.add_argument("--config", default=None, metavar="FILE", help="YAML, TOML or JSON file of options")
    g.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")
    g.add_argument("--callback", action="append", default=[], metavar="MODULE:NAME[:JSON]",
                   help="add a training callback: NAME(**JSON) from an importable MODULE (a transnext.engine.Callback); "
                        "repeatable")
    add_config_arguments(parser.add_argument_group("options (each overrides the preset and the config file)"))


def run(args: argparse.Namespace) -> int:
    from ..engine.config import config_from_args
    from ..engine.trainer import TrainingInterrupted, load_callback, train

    cfg = config_from_args(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    try:
        summary = train(cfg, callbacks=[load_callback(spec) for spec in args.callback])
    except TrainingInterrupted as e:
        print(f"training interrupted; resumable checkpoint saved: {e.checkpoint}\n"
              f"continue with: transnext train --config {cfg.output}/config.yaml --resume auto", file=sys.stderr)
        return 130
    best = summary["best_metrics"]
    msg = f"done in {summary['time_s']:.0f} s: {summary['global_step']} steps"
    if "top1" in best:
        msg += f"; best val top-1 {best['top1']:.2f}% (epoch {best['epoch'] + 1})"
    print(msg + f"; checkpoints in {summary['output']}")
    return 0
