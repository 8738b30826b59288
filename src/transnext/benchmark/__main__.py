"""``python -m transnext.benchmark``: the same tool as ``transnext benchmark``."""

import argparse
import sys


def main(argv: "list[str] | None" = None) -> int:
    """Parse with the options (and the default-showing help) of ``transnext benchmark`` and run."""
    from ..cli.benchmark import add_arguments, run
    from . import __doc__ as doc

    parser = argparse.ArgumentParser(prog="python -m transnext.benchmark", description=(doc or "").split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
