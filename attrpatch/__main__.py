"""``python -m attrpatch``: the command line (see :mod:`attrpatch.cli`)."""

from attrpatch.cli import console_main

console_main()
