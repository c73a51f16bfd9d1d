"""Files written whole or not at all: records, selections, caches, checkpoints.

A neutral home (standard library only): the data cache, the records, the protocol and
the trainer all write through it without importing one another.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write_stream(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(stream)` into a temporary file in the same folder, fsync, then rename over `path`.

    The content goes straight to disk (no in-memory copy of it), and a crash at any point
    leaves either the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_stream(path, lambda stream: stream.write(data))
