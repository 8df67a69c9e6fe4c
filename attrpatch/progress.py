"""Progress bars (tqdm) for the long computations: on stderr, only on a terminal, and only once
a computation has run for `delay` seconds (a short one prints nothing)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: float, enabled: bool = True, desc: str = "", unit: str = "it",
                 delay: float = 2.0) -> tqdm:
    """A tqdm bar over `total` units; a no-op bar unless `enabled` and stderr is a terminal (a
    log would fill with carriage returns). Use as a context manager, ``bar.update(n)``."""
    return tqdm(total=total, desc=desc, unit=unit, delay=delay, leave=False, file=sys.stderr,
                dynamic_ncols=True, disable=not (enabled and sys.stderr.isatty()))
