"""Writing and verifying the VTAB-1K folder format.

The writer (used by the demo suite and the tfds exporter) stores the four split lists in
the given order, builds the task in a hidden staging folder and renames it into place, so
an interrupted export never leaves a folder that looks complete. Two variants:
`png_lossless` (default: PNG, train800val200.txt lists the train800 and val200 files again)
and `jpeg_noah` (NOAH's exporter: JPEG at PIL's default quality, NOAH's file names, and
train800val200 written as its own copies). Its manifest.json records the variant, counts,
class histograms and sha256 hashes of each list and of the images.

`verify_task_folder` checks any folder, whoever made it (this suite, NOAH's release, a
copy of either), against the VTAB-1K counts, the label range, the files themselves and
(when present) the manifest. train800val200 is checked by content, never by path: its
labels must be those of train800 + val200 and, with `decode` or a manifest, its images the
same images (see `_match_images`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from san.data.errors import VerifyReport
from san.data.images import CorruptImageError, load_rgb
from san.data.layout import JPEG_SUFFIXES, LIST_NAMES, detect_layout
from san.data.manifest import (
    JPEG_NOAH,
    PNG_LOSSLESS,
    manifest_problems,
    manifest_variant,
    read_manifest,
    sha256_file,
)
from san.data.splits import DatasetError, Example, list_lines, parse_list_line
from san.data.vtab_spec import ALIASES, TASKS

VTAB_COUNTS = {"train800": 800, "val200": 200, "train800val200": 1000}
# variant -> (file suffix, PIL save arguments). NOAH's get_vtab1k.py saves with `Image.save(path)` on a
# .jpg path: PIL's default JPEG quality (75) and chroma subsampling.
VARIANTS = {PNG_LOSSLESS: (".png", {"format": "PNG"}), JPEG_NOAH: (".jpg", {"format": "JPEG"})}
# Re-encoding a decoded JPEG (at quality 75 or 95) moved an 8x8 thumbnail of the image by at most 2.7
# grey levels (mean absolute difference, of 255) over 450 photo crops; different crops of the same photos
# differed by 9 or more. Images that look alike at 8x8 (dsprites' sprites) can still be confused.
THUMBNAIL = 8
THUMBNAIL_TOLERANCE = 4.0
MAX_LISTED = 5  # unmatched train800val200 lines named one by one; the rest are counted


def canonical_task_name(folder_name: str) -> str:
    return ALIASES.get(folder_name, folder_name)


def write_task_folder(
    out_root: Path,
    name: str,
    splits: dict[str, Iterable[tuple]],
    num_classes: int,
    extra: dict | None = None,
    variant: str = PNG_LOSSLESS,
) -> Path:
    """Write `<out_root>/<name>` from {"train800", "val200", "test"} -> (image, label[, source id]) items.

    Source ids (a tfds file name) are kept in the manifest for train800 and val200, so an export can
    be compared with VPT's split file. `jpeg_noah` also writes train800val200 as its own copies.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown data variant {variant!r}; accepted: {sorted(VARIANTS)}")
    suffix, save_args = VARIANTS[variant]
    own_copies = variant == JPEG_NOAH
    final = Path(out_root) / name
    staging = Path(out_root) / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    lines: dict[str, list[str]] = {"train800val200": []}
    histograms: dict[str, list[int]] = {}
    source_ids: dict[str, list[str]] = {}
    image_hash = hashlib.sha256()
    for split in ("train800val200",) if own_copies else ():
        (staging / "images" / split).mkdir(parents=True)
    for split in ("train800", "val200", "test"):
        (staging / "images" / split).mkdir(parents=True)
        lines[split], counts, ids = [], Counter(), []
        for index, (image, label, *source) in enumerate(splits[split]):
            if not 0 <= label < num_classes:
                raise ValueError(f"{name}/{split} example {index}: label {label} outside 0..{num_classes - 1}")
            relative = f"images/{split}/{index:06d}{suffix}"
            image.save(staging / relative, **save_args)
            image_hash.update((staging / relative).read_bytes())
            lines[split].append(f"{relative} {label}")
            if split != "test":
                copy = f"images/train800val200/{len(lines['train800val200']):06d}{suffix}" if own_copies else relative
                if own_copies:  # encoded again from the same pixels, as NOAH's exporter does
                    image.save(staging / copy, **save_args)
                    image_hash.update((staging / copy).read_bytes())
                lines["train800val200"].append(f"{copy} {label}")
                ids.append(source[0] if source else None)
            counts[label] += 1
        histograms[split] = [counts[c] for c in range(num_classes)]
        if split != "test" and any(i is not None for i in ids):
            source_ids[split] = ids
    for split in LIST_NAMES:
        (staging / f"{split}.txt").write_text("\n".join(lines[split]) + "\n")
    manifest = {
        "task": name,
        "num_classes": num_classes,
        "data_variant": variant,
        "format": suffix.lstrip("."),
        "counts": {split: len(lines[split]) for split in LIST_NAMES},
        "class_histogram": histograms,
        "lists_sha256": {split: sha256_file(staging / f"{split}.txt") for split in LIST_NAMES},
        "images_sha256": image_hash.hexdigest(),
        **({"source_ids": source_ids} if source_ids else {}),
        **(extra or {}),
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final


def _truncated(path: Path) -> str | None:
    """Why a JPEG or PNG file is cut short, read from its last bytes (no decoding); None if it ends well."""
    suffix = path.suffix.lower()
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(0, size - 64))
        tail = handle.read()
    if suffix in JPEG_SUFFIXES and b"\xff\xd9" not in tail:  # the end-of-image marker; encoders may pad after it
        return "truncated JPEG (no end-of-image marker)"
    if suffix == ".png" and not tail.endswith(b"IEND\xaeB`\x82"):
        return "truncated PNG (no IEND chunk at the end)"
    return None


def _read_list(
    path: Path, directory: Path, num_classes: int, problems: list[str], checked: set[Path], check_ends: bool
) -> list[Example]:
    """The reader's parse (splits.parse_list_line), collecting every problem instead of stopping.

    Each image file is checked once (`checked`): it exists and (`check_ends`) is not cut short.
    """
    examples = []
    for source, line in list_lines(path):
        try:
            example = parse_list_line(line, source, directory)
        except DatasetError as error:
            problems.append(str(error))
            continue
        if example.path not in checked:
            checked.add(example.path)
            if not example.path.is_file():
                problems.append(f"{source}: image {str(example.path)!r} does not exist")
            elif check_ends and (reason := _truncated(example.path)):
                problems.append(f"{source}: image {str(example.path)!r}: {reason}")
        if not 0 <= example.label < num_classes:
            problems.append(f"{source}: label {example.label} outside 0..{num_classes - 1}")
        examples.append(example)
    return examples


def _pixels(example: Example) -> tuple[str, tuple[int, int], np.ndarray]:
    """(sha256 of the decoded RGB pixels, size, 8x8 thumbnail) of one image."""
    image = load_rgb(example)
    thumbnail = np.asarray(image.resize((THUMBNAIL, THUMBNAIL), Image.BOX), dtype=np.float32)
    return hashlib.sha256(image.tobytes()).hexdigest(), image.size, thumbnail


def _match_images(joined: Sequence[Example], parts: Sequence[Example], problems: list[str]) -> list[Example]:
    """The train800val200 entries that are not an image of train800/val200 with the same label.

    Each part image is used once. In three passes, each only on what the last left over: equal
    file bytes; equal decoded pixels; an 8x8 thumbnail within THUMBNAIL_TOLERANCE grey levels,
    for JPEG copies that were encoded again (NOAH's release re-encodes train800val200).
    """
    pool: dict[tuple[str, int], list[Example]] = defaultdict(list)
    for example in parts:
        pool[sha256_file(example.path), example.label].append(example)
    left = []
    for example in joined:
        same_bytes = pool.get((sha256_file(example.path), example.label))
        if same_bytes:
            same_bytes.pop()
        else:
            left.append(example)
    if not left:
        return []
    spare = [example for bucket in pool.values() for example in bucket]
    decoded: dict[Path, tuple] = {}
    for example in left + spare:
        try:
            decoded[example.path] = _pixels(example)
        except CorruptImageError as error:
            problems.append(str(error))
    spare = [e for e in spare if e.path in decoded]
    # Only an image with the same label and size can match; one group per (label, size).
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, example in enumerate(spare):
        groups[example.label, decoded[example.path][1]].append(index)
    thumbnails = {key: np.stack([decoded[spare[i].path][2] for i in members]) for key, members in groups.items()}
    free = {key: np.ones(len(members), dtype=bool) for key, members in groups.items()}
    unmatched = []
    for exact in (True, False):  # equal pixels first, so a near match never takes an exact one's image
        still = []
        for example in (e for e in (left if exact else unmatched) if e.path in decoded):
            digest, size, thumbnail = decoded[example.path]
            key = (example.label, size)
            if key not in groups:
                still.append(example)
                continue
            if exact:
                hits = [j for j, i in enumerate(groups[key]) if free[key][j] and decoded[spare[i].path][0] == digest]
                best = hits[0] if hits else None
            else:
                distance = np.where(free[key], np.abs(thumbnails[key] - thumbnail).mean(axis=(1, 2, 3)), np.inf)
                best = int(np.argmin(distance)) if distance.min() <= THUMBNAIL_TOLERANCE else None
            if best is None:
                still.append(example)
            else:
                free[key][best] = False
        unmatched = still
    return unmatched


def _trainval_problems(
    lists: Mapping[str, list[Example]], folder: Path, by_content: bool, report: VerifyReport
) -> None:
    """train800val200 holds train800's and val200's labels and, when `by_content`, their images."""
    joined, parts = lists["train800val200"], lists["train800"] + lists["val200"]
    path = folder / "train800val200.txt"
    have, want = Counter(e.label for e in joined), Counter(e.label for e in parts)
    if have != want:
        differences = [
            f"{sum(count.values())} {word} of label(s) {sorted(count)[:MAX_LISTED]}"
            for word, count in (("more", have - want), ("fewer", want - have))
            if count
        ]
        first = next((e.source for e, p in zip(joined, parts) if e.label != p.label), None)
        report.problems.append(
            f"{path}: its labels are not those of train800 + val200 ({', '.join(differences)} "
            f"in train800val200" + (f"; first difference in list order at {first}" if first else "") + ")"
        )
        return
    if [e.label for e in joined] != [e.label for e in parts]:
        report.notes.append(
            "train800val200 lists train800 + val200 in another order (tf.data's interleaving "
            "of the two slices does that); checked as a set"
        )
    if not by_content or [e.path for e in joined] == [e.path for e in parts]:
        return  # the same files (this suite's export) hold the same content
    if any(not e.path.is_file() for e in joined + parts):
        return  # already reported as missing
    unmatched = _match_images(joined, parts, report.problems)
    for example in unmatched[:MAX_LISTED]:
        report.problems.append(
            f"{example.source}: image {str(example.path)!r} is none of the train800/val200 "
            f"images with label {example.label} (train800val200 must be train800 + val200)"
        )
    if len(unmatched) > MAX_LISTED:
        report.problems.append(
            f"{path}: ... and {len(unmatched) - MAX_LISTED} more lines whose image is not in train800/val200"
        )


def expected_counts_for(task: str, manifest: Mapping | None) -> dict[str, int]:
    """VTAB-1K's 800/200/1000, and the task's published test size for a copy without a manifest
    (an export's own manifest records the test size of the tfds version it was read from)."""
    counts = dict(VTAB_COUNTS)
    if task in TASKS and manifest is None:
        counts["test"] = TASKS[task].test_count
    return counts


def verify_task_folder(
    folder: Path,
    num_classes: int,
    decode: bool = False,
    expected_counts: Mapping[str, int] | None = None,
    progress: bool = False,
) -> VerifyReport:
    """Every problem found (not just the first), each naming its file and line.

    `expected_counts` replaces VTAB-1K's split sizes (tests use tiny tasks). Without `decode`,
    images are checked to exist and to end as a JPEG/PNG file ends; with it, every image is decoded.
    """
    folder = Path(folder)
    report = VerifyReport(canonical_task_name(folder.name), folder)
    manifest_path = folder / "manifest.json"
    manifest = read_manifest(folder)
    lists: dict[str, list[Example]] = {}
    checked: set[Path] = set()
    for split in LIST_NAMES:
        path = folder / f"{split}.txt"
        if not path.is_file():
            report.problems.append(f"{path}: missing split list")
            continue
        lists[split] = _read_list(path, folder, num_classes, report.problems, checked, check_ends=not decode)
    counts = dict(expected_counts) if expected_counts is not None else expected_counts_for(report.name, manifest)
    for split, expected in counts.items():
        if split in lists and len(lists[split]) != expected:
            wanted = f"VTAB-1K has {expected}" if expected_counts is None else f"expected {expected}"
            report.problems.append(f"{folder / (split + '.txt')}: {len(lists[split])} lines, {wanted}")
    if {"train800", "val200", "train800val200"} <= set(lists):
        _trainval_problems(lists, folder, decode or manifest is not None, report)
    if manifest is not None:
        report.variant = manifest_variant(manifest)
        report.problems += manifest_problems(
            manifest,
            manifest_path,
            {split: len(e) for split, e in lists.items()},
            lambda split: folder / f"{split}.txt",
            "lists_sha256",
            num_classes,
            "lines",
        )
        if report.name in TASKS and "test" in lists and len(lists["test"]) != TASKS[report.name].test_count:
            report.notes.append(
                f"test has {len(lists['test'])} images; the published VTAB-1K copies (VPT's tfds "
                f"versions) have {TASKS[report.name].test_count}: see the manifest's tfds version"
            )
    else:
        report.variant = "external:" + detect_layout(
            {
                split: [
                    e.path.relative_to(folder).as_posix() if e.path.is_relative_to(folder) else str(e.path)
                    for e in examples
                ]
                for split, examples in lists.items()
            }
        )
        report.notes.append(
            "no manifest.json: lists, labels and files checked; train800val200 compared with "
            + (
                "train800 + val200 image by image"
                if decode
                else "train800 + val200 by labels (add --decode to compare the images)"
            )
        )
    jpeg = sum(e.path.suffix.lower() in JPEG_SUFFIXES for examples in lists.values() for e in examples)
    if jpeg:
        report.notes.append(
            f"lossy JPEG copy ({jpeg} JPEG list entries): results differ from the PNG export (one "
            "user measured about 10 points on CIFAR-100)"
        )
    used = {e.label for examples in lists.values() for e in examples if 0 <= e.label < num_classes}
    if lists and len(used) < num_classes:
        report.notes.append(f"the lists use {len(used)} of the {num_classes} classes: is this the task's folder?")
    if decode:  # every image file once (train800val200 may repeat train800's and val200's files)
        files = {e.path: e for split in LIST_NAMES for e in lists.get(split, ()) if e.path.is_file()}
        for example in tqdm(
            files.values(), desc=f"decoding {folder.name}", disable=None if progress else True, leave=False
        ):
            try:
                load_rgb(example)
            except CorruptImageError as error:
                report.problems.append(str(error))
    report.problems = list(dict.fromkeys(report.problems))  # an image decoded twice is reported once
    return report
