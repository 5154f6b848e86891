"""SIGUSR1 means "checkpoint, stop, requeue" (SLURM's ``--signal=USR1@90``).

The handler is installed as the command line starts, before torch and Lightning are imported, so a
signal that arrives during those seconds of start-up is kept for the trainer instead of killing the
process (Python's default for SIGUSR1); the checkpoint callback acts on it at its first step.
"""

from __future__ import annotations

import signal
import threading

_requested = threading.Event()


def install() -> None:
    """Record SIGUSR1 instead of dying of it (main thread only, where Python allows handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda signum, frame: _requested.set())


def requested() -> bool:
    return _requested.is_set()


def clear() -> None:
    """Forget a request once it has been acted on (the next run in this process starts clean)."""
    _requested.clear()
