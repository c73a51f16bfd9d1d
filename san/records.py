"""Result records: one `record.json` per run, written atomically.

A record is written when a run starts (`status: running`), and replaced when it ends
(`complete`, or `failed` with the error). A run killed outright therefore leaves a
`running` record, which a sweep treats as unfinished and resumes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from san.atomic import atomic_write_bytes

RECORD_NAME = "record.json"
SCHEMA_VERSION = 1


def write_record(run_dir: Path, record: dict[str, Any]) -> Path:
    path = run_dir / RECORD_NAME
    atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=False, default=str) + "\n").encode())
    return path


def read_record(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def find_records(root: Path) -> list[Path]:
    return sorted(Path(root).rglob(RECORD_NAME))


def layout_facts(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a record says about its task's place in a report table: the suite, the task, its
    group, and the experiment's task list (None for a run outside one), which orders the
    columns. The report reads these from the records, never from configs."""
    dataset = config["dataset"]
    return {
        "suite": dataset["suite"],
        "task": dataset["name"],
        "group": dataset.get("group"),
        "task_order": (config.get("plan") or {}).get("tasks"),
    }
