"""``python -m transnext.benchmark``: the same tool as ``transnext benchmark``."""

import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
