"""``python -m attrpatch``: the command line (see :mod:`attrpatch.cli`)."""

import sys

from attrpatch.cli import main

sys.exit(main())
