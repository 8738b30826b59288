"""``transnext benchmark``: speed and memory of the attention backends and of peer models, side by side.

The work is in the :mod:`transnext.benchmark` package (also ``python -m transnext.benchmark``);
this module only wires it into the command line.
"""

from __future__ import annotations

import argparse
from typing import Any


def _show(value: Any) -> str:
    """A default as it is typed on the command line: ``224x224`` for a size, lists space-separated."""
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, (list, tuple)):
        return " ".join(_show(v) for v in value)
    return str(value)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: ...)`` to each option with a real default whose help does not already state one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (d is argparse.SUPPRESS or d is None or d is False or d == [] or not action.option_strings
                or "default" in text or text is argparse.SUPPRESS):
            return text
        return f"{text} (default: {_show(d).replace('%', '%%') or repr(d)})".strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..benchmark import add_arguments as _add

    parser.formatter_class = DefaultsHelpFormatter
    _add(parser)


def run(args: argparse.Namespace) -> int:
    from ..benchmark import run as _run

    return _run(args)
