"""``python -m edgepack.report ...``: the same as ``edgepack report ...``."""

import sys

from edgepack.cli import main

sys.exit(main(["report", *sys.argv[1:]]))
