"""``python -m torch_reformer.bench memory speed quality [--quick] ...``: see ``torch_reformer.bench``."""

import sys

from . import main

sys.exit(main(sys.argv[1:], prog="python -m torch_reformer.bench"))
