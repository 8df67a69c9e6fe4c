"""Stop signals that end a run cleanly: Ctrl-C (SIGINT), SIGTERM (what `timeout`, SLURM and
``docker stop`` send) and SIGHUP (a closed terminal) are recorded, and acted on at safe points.

Python's default SIGINT handler raises `KeyboardInterrupt` at whatever bytecode runs next. Inside
JAX that can be its dispatch code or a garbage-collection callback: the interrupt is then
swallowed ("Exception ignored in ... _xla_gc_callback") or leaves XLA's runtime half torn down
(a segmentation fault at exit); SIGTERM and SIGHUP kill the process outright, leaving its
staging directory behind. Within :func:`deferred_interrupts` a stop signal only sets a flag;
long loops call :func:`raise_if_interrupted` between device computations, where raising is safe.
A second stop signal exits at once, after the caller's cleanup, with the status shells report
for a command the signal stopped (:func:`exit_status`: 130 SIGINT, 143 SIGTERM, 129 SIGHUP).

A run's last step, moving its finished output into place, runs in :func:`final_step`: a stop
signal waits for it, and once it completes the run is done, so later signals are ignored and
the command exits 0 with its output complete. An interrupted exit status therefore always means
that the previous output is untouched.

Outside :func:`deferred_interrupts` (plain library use) nothing changes, except that a stop
signal received during :func:`final_step` is delivered when it ends.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, what shells report for a Ctrl-C'd command
# SIGHUP does not exist on Windows
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))
EXIT_STATUSES = frozenset(128 + s for s in STOP_SIGNALS)
_DEFAULT_HANDLERS = (signal.SIG_DFL, signal.default_int_handler)


class _Run:
    """What the active :func:`deferred_interrupts` blocks share."""

    def __init__(self):
        self.depth = 0  # nested blocks active
        self.replaced: dict[int, object] = {}  # signal -> the handler the outermost block replaced
        self.cleanups: list[Callable[[], object]] = []  # of the active blocks, outermost first
        self.requested = 0  # a stop signal received and not acted on yet (0: none)
        self.received = 0  # the last stop signal received (0: none)
        self.held = 0  # active final_step blocks
        self.done = False  # a final step completed: signals no longer stop anything


_run = _Run()


def _name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def raise_if_interrupted() -> None:
    """Raise `KeyboardInterrupt` if a stop signal arrived inside :func:`deferred_interrupts`
    (and the run's final step has not completed)."""
    if _run.requested and not _run.done:
        _run.requested = 0
        raise KeyboardInterrupt


def exit_status() -> int:
    """The exit status for a run a stop signal ended: 128 + the signal (130 for a plain
    `KeyboardInterrupt`)."""
    return 128 + (_run.received or signal.SIGINT)


def _on_signal(signum, frame) -> None:
    _run.received = signum
    if _run.done or _run.held:
        sys.stderr.write(f"\nattrpatch: {_name(signum)}: the output is complete; finishing\n")
        return
    if not _run.requested:
        _run.requested = signum
        sys.stderr.write(f"\nattrpatch: {_name(signum)}: stopping at the next safe point "
                         f"({_name(signum)} again to quit now)\n")
        return
    for cleanup in reversed(_run.cleanups):
        cleanup()
    sys.stderr.write("attrpatch: interrupted; nothing written\n")
    sys.stderr.flush()
    os._exit(128 + signum)


@contextmanager
def deferred_interrupts(cleanup: Callable[[], object] = lambda: None) -> Iterator[None]:
    """Within: the first stop signal (SIGINT, SIGTERM, SIGHUP) is deferred to the next
    :func:`raise_if_interrupted`; a second calls the `cleanup()` of every active block (innermost
    first) and exits with :func:`exit_status` (``os._exit``: no interpreter teardown while XLA
    may still be running). Blocks nest: an inner one only adds its cleanup, and a signal
    deferred before it is still acted on inside it. Only installed in the main thread, and only
    for signals that have their default handler (a launcher that ignores one, as ``nohup`` does
    SIGHUP, keeps it ignored)."""
    global _run
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _run.depth == 0:
        taken = [s for s in STOP_SIGNALS if signal.getsignal(s) in _DEFAULT_HANDLERS]
        if not taken:
            yield
            return
        _run = _Run()
        for s in taken:
            _run.replaced[s] = signal.signal(s, _on_signal)
    _run.depth += 1
    _run.cleanups.append(cleanup)
    try:
        yield
    finally:
        _run.cleanups.remove(cleanup)
        _run.depth -= 1
        if _run.depth == 0:
            for s, handler in _run.replaced.items():
                if signal.getsignal(s) is _on_signal:  # not since set by ignore_stop_signals
                    signal.signal(s, handler)
            _run.replaced.clear()
            _run.requested = 0


@contextmanager
def final_step() -> Iterator[None]:
    """Within: the last step of a run (moving its output into place), which no stop signal
    cuts short. Inside :func:`deferred_interrupts`, a signal meanwhile is only noted, and once
    the block completes the run is done: later signals are ignored and
    :func:`raise_if_interrupted` does nothing. Elsewhere (main thread), SIGINT, SIGTERM and
    SIGHUP that have their default handler are held and delivered when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _run.depth and any(signal.getsignal(s) is _on_signal for s in STOP_SIGNALS):
        _run.held += 1
        try:
            yield
            _run.done = True
        finally:
            _run.held -= 1
        return
    held: list[int] = []
    replaced = {s: signal.signal(s, lambda signum, frame: held.append(signum))
                for s in STOP_SIGNALS if signal.getsignal(s) in _DEFAULT_HANDLERS}
    try:
        yield
    finally:
        for s, handler in replaced.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(held):
            signal.raise_signal(s)


def ignore_stop_signals() -> None:
    """Ignore SIGINT, SIGTERM and SIGHUP from now on, where :func:`deferred_interrupts` handles
    them: for a command whose outcome is decided, so that a late signal cannot change its exit
    status during interpreter teardown."""
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is _on_signal:
            signal.signal(s, signal.SIG_IGN)
