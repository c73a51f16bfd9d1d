"""One process per run directory.

Two sweeps pointed at the same results directory must not train the same run twice or
interleave writes to its record. An advisory `flock` on a file in the run directory is
held for the whole run; the kernel releases it when the process dies (SIGKILL
included), so a killed run never leaves a lock that needs cleaning up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".lock"


class RunBusyError(RuntimeError):
    """Another live process holds this run directory."""

    def __init__(self, run_dir: Path):
        super().__init__(f"another process is running {run_dir}; it will be skipped here")
        self.run_dir = run_dir


@contextlib.contextmanager
def run_lock(run_dir: Path, wait: bool = False) -> Iterator[None]:
    """Hold the run directory's lock; without `wait`, raise RunBusyError when it is taken."""
    run_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(run_dir / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusyError(run_dir) from None
        yield
    finally:
        os.close(descriptor)  # closing the descriptor releases the lock
