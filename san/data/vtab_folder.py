"""Writing and verifying the VTAB-1K folder format.

The writer (used by the demo suite and the tfds exporter) stores lossless PNGs and the
four split lists, in the given order, builds the task in a hidden staging folder and
renames it into place, so an interrupted export never leaves a folder that looks
complete. Its manifest.json records counts, class histograms and sha256 hashes of each
list and of the images. `verify_task_folder` checks any folder, whoever made it, against
the VTAB-1K counts, the label range and (when present) the manifest, and reports lossy
JPEG copies as such.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterable

from PIL import Image

from san.data.images import CorruptImageError, load_rgb
from san.data.errors import VerifyReport
from san.data.manifest import manifest_problems, sha256_file
from san.data.splits import DatasetError, Example, list_lines, parse_list_line
from san.data.vtab_spec import ALIASES

LIST_NAMES = ("train800", "val200", "train800val200", "test")
VTAB_COUNTS = {"train800": 800, "val200": 200, "train800val200": 1000}
class VerificationError(DatasetError):
    pass


def canonical_task_name(folder_name: str) -> str:
    return ALIASES.get(folder_name, folder_name)


def write_task_folder(out_root: Path, name: str, splits: dict[str, Iterable[tuple[Image.Image, int]]],
                      num_classes: int, extra: dict | None = None) -> Path:
    """Write `<out_root>/<name>` from {"train800", "val200", "test"} -> (image, label) pairs."""
    final = Path(out_root) / name
    staging = Path(out_root) / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    lines: dict[str, list[str]] = {}
    histograms: dict[str, list[int]] = {}
    image_hash = hashlib.sha256()
    for split in ("train800", "val200", "test"):
        (staging / "images" / split).mkdir(parents=True)
        lines[split], counts = [], Counter()
        for index, (image, label) in enumerate(splits[split]):
            if not 0 <= label < num_classes:
                raise ValueError(f"{name}/{split} example {index}: label {label} outside 0..{num_classes - 1}")
            relative = f"images/{split}/{index:06d}.png"
            image.save(staging / relative, format="PNG")
            image_hash.update((staging / relative).read_bytes())
            lines[split].append(f"{relative} {label}")
            counts[label] += 1
        histograms[split] = [counts[c] for c in range(num_classes)]
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split in LIST_NAMES:
        (staging / f"{split}.txt").write_text("\n".join(lines[split]) + "\n")
    manifest = {
        "task": name, "num_classes": num_classes, "format": "png",
        "counts": {split: len(lines[split]) for split in LIST_NAMES},
        "class_histogram": histograms,
        "lists_sha256": {split: sha256_file(staging / f"{split}.txt") for split in LIST_NAMES},
        "images_sha256": image_hash.hexdigest(),
        **(extra or {}),
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final


def _read_list(path: Path, directory: Path, num_classes: int, problems: list[str]) -> list[Example]:
    """The reader's parse (splits.parse_list_line), collecting every problem instead of stopping."""
    examples = []
    for source, line in list_lines(path):
        try:
            example = parse_list_line(line, source, directory)
        except DatasetError as error:
            problems.append(str(error))
            continue
        if not example.path.is_file():
            problems.append(f"{source}: image {str(example.path)!r} does not exist")
        if not 0 <= example.label < num_classes:
            problems.append(f"{source}: label {example.label} outside 0..{num_classes - 1}")
        examples.append(example)
    return examples


def verify_task_folder(folder: Path, num_classes: int, decode: bool = False) -> VerifyReport:
    """Every problem found (not just the first), each naming its file and line."""
    folder = Path(folder)
    report = VerifyReport(canonical_task_name(folder.name), folder)
    lists: dict[str, list[Example]] = {}
    for split in LIST_NAMES:
        path = folder / f"{split}.txt"
        if not path.is_file():
            report.problems.append(f"{path}: missing split list")
            continue
        lists[split] = _read_list(path, folder, num_classes, report.problems)
    for split, expected in VTAB_COUNTS.items():
        if split in lists and len(lists[split]) != expected:
            report.problems.append(f"{folder / (split + '.txt')}: {len(lists[split])} lines, VTAB-1K has {expected}")
    if {"train800", "val200", "train800val200"} <= set(lists):
        joined = [(e.path, e.label) for e in lists["train800"] + lists["val200"]]
        if [(e.path, e.label) for e in lists["train800val200"]] != joined:
            report.problems.append(f"{folder / 'train800val200.txt'}: is not train800 followed by val200")
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        report.problems += manifest_problems(manifest, manifest_path, {split: len(e) for split, e in lists.items()},
                                             lambda split: folder / f"{split}.txt", "lists_sha256", num_classes, "lines")
    else:
        report.notes.append("no manifest.json: counts and labels checked, contents not hashed")
    suffixes = Counter(e.path.suffix.lower() for examples in lists.values() for e in examples)
    if suffixes[".jpg"] + suffixes[".jpeg"]:
        report.notes.append(f"lossy JPEG copy ({suffixes['.jpg'] + suffixes['.jpeg']} JPEG list entries): results "
                            "differ from the PNG export (one user measured about 10 points on CIFAR-100)")
    if decode:  # train800val200 repeats the other two lists
        for split, examples in lists.items():
            if split == "train800val200":
                continue
            for example in examples:
                if example.path.is_file():
                    try:
                        load_rgb(example)
                    except CorruptImageError as error:
                        report.problems.append(str(error))
    return report
