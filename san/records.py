"""Result records: one `record.json` per run, written atomically.

A record is written when a run starts (`status: running`), and replaced when it ends
(`complete`, or `failed` with the error). A run killed outright therefore leaves a
`running` record, which a sweep treats as unfinished and resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

RECORD_NAME = "record.json"
SCHEMA_VERSION = 1


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


def write_record(run_dir: Path, record: dict[str, Any]) -> Path:
    path = run_dir / RECORD_NAME
    atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=False, default=str) + "\n").encode())
    return path


def read_record(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def find_records(root: Path) -> list[Path]:
    return sorted(Path(root).rglob(RECORD_NAME))
