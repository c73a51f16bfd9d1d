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
from typing import Any

RECORD_NAME = "record.json"
SCHEMA_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def write_record(run_dir: Path, record: dict[str, Any]) -> Path:
    path = run_dir / RECORD_NAME
    atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=False, default=str) + "\n").encode())
    return path


def read_record(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def find_records(root: Path) -> list[Path]:
    return sorted(Path(root).rglob(RECORD_NAME))
