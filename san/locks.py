"""One process per run directory (and per cache file being built).

Two sweeps pointed at the same results directory must not train the same run twice or
interleave writes to its record. An advisory `flock` on a file in the run directory is
held for the whole run; the kernel releases it when the process dies (SIGKILL
included), so a killed run never leaves a lock that needs cleaning up.

Some cluster file systems do not implement flock (Lustre mounted without `flock`, NFS
without a lock daemon): the call fails with ENOSYS, ENOLCK or EOPNOTSUPP. There the lock
falls back to a lock file created with O_EXCL (atomic on every POSIX file system, NFSv3+
included) that names its holder and is touched by a heartbeat thread. A lock file whose
holder is a dead process on this host, or whose heartbeat stopped more than
`STALE_AFTER_S` ago (a holder on a host that died), is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

from san.errors import UserError

LOCK_NAME = ".lock"
EXCLUSIVE_LOCK_SUFFIX = ".held"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
# errno values of a file system that has no flock at all (as opposed to a lock that is taken).
_FLOCK_UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}


class RunBusyError(UserError, RuntimeError):
    """Another live process holds this run directory."""

    def __init__(self, run_dir: Path):
        super().__init__(f"another process is running {run_dir}; it will be skipped here")
        self.run_dir = run_dir


class LockBusy(RuntimeError):
    """`file_lock(..., wait=False)` found the lock taken."""


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = False, poll_s: float = 0.5) -> Iterator[str]:
    """Hold an exclusive lock named by `path`; yields the mechanism used ("flock" or "lock_file").

    Without `wait`, raise LockBusy when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        flock_supported = True
    except BlockingIOError:
        os.close(descriptor)
        raise LockBusy(str(path)) from None
    except OSError as error:
        os.close(descriptor)
        if error.errno not in _FLOCK_UNSUPPORTED:
            raise
        flock_supported = False
    if not flock_supported:
        with _exclusive_file_lock(path.with_name(path.name + EXCLUSIVE_LOCK_SUFFIX), wait, poll_s):
            yield "lock_file"
        return
    try:
        yield "flock"
    finally:
        os.close(descriptor)  # closing the descriptor releases the lock


@contextlib.contextmanager
def run_lock(run_dir: Path, wait: bool = False) -> Iterator[None]:
    """Hold the run directory's lock; without `wait`, raise RunBusyError when it is taken."""
    try:
        with file_lock(run_dir / LOCK_NAME, wait=wait):
            yield
    except LockBusy:
        raise RunBusyError(run_dir) from None


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


def _is_stale(path: Path) -> bool:
    try:
        holder = json.loads(path.read_text() or "{}")
        age = time.time() - path.stat().st_mtime
    except (FileNotFoundError, json.JSONDecodeError):
        return False  # being written or just released: look again
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
    return age > STALE_AFTER_S


@contextlib.contextmanager
def _exclusive_file_lock(path: Path, wait: bool, poll_s: float) -> Iterator[None]:
    while True:
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if _is_stale(path):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            if not wait:
                raise LockBusy(str(path)) from None
            time.sleep(poll_s)
    with os.fdopen(descriptor, "w") as stream:
        json.dump(_holder(), stream)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)

    beating = threading.Thread(target=heartbeat, name=f"lock-heartbeat:{path.name}", daemon=True)
    beating.start()
    try:
        yield
    finally:
        stop.set()
        beating.join()
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
