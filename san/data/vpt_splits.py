"""VPT's `vtab_trainval_splits.json`: which 1,000 training images VPT used, per task.

VPT's VTAB_SETUP.md: "for each dataset, you can find the filenames of the randomly selected
1k training examples used in our experiment. We got them by extracting the 'filename'
attribute from the tensorflow dataset feature dict"; dsprites, smallnorb and svhn have no
such attribute and are not in the file. The file maps a dataset key to its file names,
either as one list or split by split (`{"train": [...], "val": [...]}`); keys are read
loosely ("caltech101", "vtab-caltech101", "clevr(task=\"count_all\")", tfds names), because
the public description names no exact schema. `san-prepare vtab` records the same tfds
attribute (`TaskSpec.id_feature`) for train800 and val200 in the manifest, so an export can
be compared with it: the count of VPT's images that are not in the export's 1,000.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from san.data.errors import DatasetError
from san.data.manifest import read_manifest
from san.data.vtab_spec import ALIASES, TASKS

# words in a key's arguments that pick one task of a two-task dataset
_TASK_WORDS = {
    "clevr": {"count": "clevr_count", "dist": "clevr_dist"},
    "dsprites": {"loc": "dsprites_loc", "x_position": "dsprites_loc", "ori": "dsprites_ori"},
    "smallnorb": {"azi": "smallnorb_azi", "ele": "smallnorb_ele"},
}


def _tasks_for_key(key: str) -> list[str]:
    text = key.strip().lower()
    text = text[len("vtab-") :] if text.startswith("vtab-") else text
    base, _, arguments = text.partition("(")
    base = re.split(r"[:/]", base.strip())[0]
    if base in TASKS or base in ALIASES:
        return [ALIASES.get(base, base)]
    tasks = [
        name for name, spec in TASKS.items() if spec.tfds_name.split("/")[0] == base or name.startswith(base + "_")
    ]
    if base in _TASK_WORDS:
        chosen = {task for word, task in _TASK_WORDS[base].items() if word in arguments}
        tasks = [task for task in tasks if task in chosen] or tasks
    return tasks


def _names(value: Any, path: Path, key: str) -> list[str]:
    if isinstance(value, Mapping):
        return [name for part in value.values() for name in _names(part, path, key)]
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return list(value)
    raise DatasetError(
        f"{path}: entry {key!r} is neither a list of file names nor an object of such lists; "
        "expected VPT's vtab_trainval_splits.json"
    )


def load_vpt_splits(path: str | Path) -> dict[str, list[str]]:
    """{task: VPT's file names} from the split file; an unreadable file or entry is a named error."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(
            f"{path}: no such file; pass VPT's vtab_trainval_splits.json (VPT's VTAB data release)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid json ({error})") from None
    if not isinstance(table, dict):
        raise DatasetError(f"{path}: expected a json object mapping each dataset to its file names")
    by_task: dict[str, list[str]] = {}
    for key, value in table.items():
        tasks = _tasks_for_key(key)
        if not tasks:
            raise DatasetError(
                f"{path}: entry {key!r} names no VTAB task; accepted: {sorted(TASKS)} or their tfds names"
            )
        for task in tasks:
            by_task[task] = _names(value, path, key)
    return by_task


def _basename(name: str) -> str:
    return PurePosixPath(name.replace("\\", "/")).name


def compare_with_vpt(folder: str | Path, task: str, vpt_names: list[str]) -> str:
    """One line: how many of VPT's images the export's train800 + val200 lack."""
    manifest = read_manifest(folder) or {}
    ids = manifest.get("source_ids", {})
    ours = [name for split in ("train800", "val200") for name in ids.get(split, [])]
    if not ours:
        return (
            f"{task}: cannot compare, {folder} records no tfds file names (only `san-prepare vtab` exports "
            f"do, in manifest.json)"
        )
    vpt = Counter(_basename(name) for name in vpt_names)
    mine = Counter(_basename(name) for name in ours)
    differ = sum((vpt - mine).values())
    builder = manifest.get("source", {}).get("tfds_builder", "?")
    order = (
        ""
        if differ
        else (
            ", same order" if [_basename(n) for n in vpt_names] == [_basename(n) for n in ours] else ", another order"
        )
    )
    return (
        f"{task}: {differ} of VPT's {sum(vpt.values())} images differ from this export's {sum(mine.values())} "
        f"(train800 + val200 of {builder}{order})"
    )
