"""Ctrl-C that stops a run cleanly: the signal is recorded, and acted on at safe points.

Python's default SIGINT handler raises `KeyboardInterrupt` at whatever bytecode runs next. Inside
JAX that can be its dispatch code or a garbage-collection callback: the interrupt is then
swallowed ("Exception ignored in ... _xla_gc_callback") or leaves XLA's runtime half torn down
(a segmentation fault at exit). Within :func:`deferred_interrupts` a Ctrl-C only sets a flag;
long loops call :func:`raise_if_interrupted` between device computations, where raising is safe.
A second Ctrl-C exits at once, after the caller's cleanup.

Outside :func:`deferred_interrupts` (plain library use) nothing changes: the default handler
raises as usual and :func:`raise_if_interrupted` is a no-op.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C'd command

_requested = threading.Event()
_cleanups: list[Callable[[], object]] = []  # of the active deferred_interrupts blocks, outermost first


def raise_if_interrupted() -> None:
    """Raise `KeyboardInterrupt` if Ctrl-C was pressed inside :func:`deferred_interrupts`."""
    if _requested.is_set():
        _requested.clear()
        raise KeyboardInterrupt


def _on_sigint(signum, frame) -> None:
    if not _requested.is_set():
        _requested.set()
        sys.stderr.write("\nattrpatch: stopping at the next safe point (Ctrl-C again to quit now)\n")
        return
    for cleanup in reversed(_cleanups):
        cleanup()
    sys.stderr.write("attrpatch: interrupted; nothing written\n")
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


@contextmanager
def deferred_interrupts(cleanup: Callable[[], object] = lambda: None) -> Iterator[None]:
    """Within: the first Ctrl-C is deferred to the next :func:`raise_if_interrupted`; a second
    calls the `cleanup()` of every active block (innermost first) and exits with code 130
    (``os._exit``: no interpreter teardown while XLA may still be running). Blocks nest: an inner
    one only adds its cleanup, and a Ctrl-C deferred before it is still acted on inside it. Only
    installed in the main thread, and only where SIGINT has Python's default handler (a launcher
    that ignores SIGINT keeps it ignored)."""
    current = signal.getsignal(signal.SIGINT)
    nested = current is _on_sigint
    if threading.current_thread() is not threading.main_thread() or not (
            nested or current is signal.default_int_handler):
        yield
        return
    _cleanups.append(cleanup)
    if not nested:
        _requested.clear()
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        _cleanups.remove(cleanup)
        if not nested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _requested.clear()
