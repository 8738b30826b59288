"""``transnext benchmark``: speed and memory of the attention backends and of peer models, side by side.

The work is in the :mod:`transnext.benchmark` package (also ``python -m transnext.benchmark``);
this module only wires it into the command line.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..benchmark import add_arguments as _add

    _add(parser)


def run(args: argparse.Namespace) -> int:
    from ..benchmark import run as _run

    return _run(args)
