"""One run per run directory: an exclusive lock on ``out_dir/.lock`` for the run's whole life.

Two runs writing into one directory would replace each other's checkpoints and clear each other's
half-written ones, each ending "successfully" with the other's result gone. The lock is an
``flock`` that the kernel releases when its process ends, however it ends, so a lock of a killed
run never blocks the next one: a lock file that names a holder but is not locked was left by a
process that is gone, and is taken over with a notice. The file names the holder (host and pid),
so a refused run says whom it waits for. Under DDP only rank 0 takes it, once for all ranks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from lightning.pytorch.utilities import rank_zero_warn

from ..layout import RUN_LOCK


class RunLockError(RuntimeError):
    """The run directory is in use by another run, or cannot be written; one line says which."""


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir``'s lock while the body runs; RunLockError at once if another run does."""
    with _open_lock_file(out_dir) as handle:  # closing it releases the flock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockError(
                f"{out_dir}: in use by another run ({_holder(handle)}); wait for it to end or "
                "choose another --out-dir") from None
        if left := _holder(handle):
            rank_zero_warn(f"{out_dir}: taking over the lock left by {left}, which is no longer "
                           "running (it was killed)")
        _write_holder(handle, f"host {socket.gethostname()} pid {os.getpid()}")
        try:
            yield
        finally:  # only a killed process leaves its name behind
            _write_holder(handle, "")


def _open_lock_file(out_dir: Path) -> IO[str]:
    """The lock file, created if needed; an unwritable out_dir fails here, before any work."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return open(out_dir / RUN_LOCK, "a+")
    except OSError as error:
        raise RunLockError(f"--out-dir {out_dir}: cannot write there ({error.strerror}); choose "
                           "a writable directory") from None


def _holder(handle: IO[str]) -> str:
    handle.seek(0)
    return handle.read().strip()


def _write_holder(handle: IO[str], holder: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(holder + "\n" if holder else "")
    handle.flush()
    os.fsync(handle.fileno())
