"""Building and verifying FGVC dataset folders in VPT's json format.

`build_fgvc` reads an official release (archives, or the folder they were extracted to),
takes its train/test (and Flowers' val) splits, carves val out of train with a seeded
permutation unless VPT's own json files are given, places the images, and writes
train/val/test.json plus a manifest. Everything happens in a hidden staging folder that
is renamed into place at the end, so an interrupted build leaves nothing that looks
complete; the next call starts that dataset again.

`verify_fgvc_folder` checks any such folder, whoever made it: json structure, VPT's
split sizes, disjoint splits, the class count, that every image exists (and decodes,
on request), and the manifest's counts and hashes when there is one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Mapping

import numpy as np
from tqdm.auto import tqdm

from san.data.errors import DatasetError, VerifyReport
from san.data.fgvc_sources import (
    ALIASES,
    VAL_FRACTION,
    FgvcSpec,
    SourceError,
    SourceListing,
    read_source,
    spec_for,
    val_size,
)
from san.data.images import CorruptImageError, load_rgb
from san.data.manifest import manifest_problems, read_manifest, sha256_file
from san.data.splits import Example, load_split_table

SPLITS = ("train", "val", "test")
ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar", ".zip")
IMAGE_MODES = ("copy", "symlink")


def canonical_fgvc_name(folder_name: str) -> str:
    return ALIASES.get(folder_name, folder_name)


def carve_val(train: list[tuple[str, int]], val_count: int, seed: int) -> tuple[list, list]:
    """A seeded random `val_count` of the official train split as val; both keep the release's order."""
    chosen = set(np.random.default_rng(seed).permutation(len(train))[:val_count].tolist())
    return (
        [entry for i, entry in enumerate(train) if i not in chosen],
        [entry for i, entry in enumerate(train) if i in chosen],
    )


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def extract_archive(archive: Path, destination: Path, progress: bool = True) -> None:
    """Unpack a .tgz/.tar.gz/.tar/.zip; members that would land outside `destination` are refused."""
    if not hasattr(tarfile, "data_filter"):
        raise RuntimeError("unpacking releases safely needs tarfile's extraction filters: Python >= 3.10.12 or 3.11.4")
    destination.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as bundle:
                for member in tqdm(
                    bundle.infolist(), desc=f"extract {archive.name}", disable=None if progress else True
                ):
                    target = (destination / member.filename).resolve()
                    if not target.is_relative_to(destination.resolve()):
                        raise SourceError(
                            f"{archive}: member {member.filename!r} would be written outside {destination}"
                        )
                    bundle.extract(member, destination)
        else:
            with tarfile.open(archive) as bundle:
                for member in tqdm(bundle, desc=f"extract {archive.name}", disable=None if progress else True):
                    bundle.extract(member, destination, filter="data")  # refuses links and paths outside
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise SourceError(f"{archive}: cannot extract ({error}); download it again") from error


def _read_release(src: Path, spec: FgvcSpec, scratch: Path, progress: bool) -> SourceListing:
    """Read the release from `src` as is; if that fails, unpack the archives found there and read again."""
    if _is_archive(src):
        extract_archive(src, scratch, progress)
        return read_source([scratch], spec)
    if not src.is_dir():
        raise SourceError(
            f"{spec.short}: source {str(src)!r} does not exist; give the folder holding the official "
            f"files ({', '.join(spec.official_files)}) or one of the archives"
        )
    try:
        return read_source([src], spec)
    except SourceError:
        archives = sorted(path for path in src.iterdir() if _is_archive(path))
        if not archives:
            raise
    for archive in archives:
        extract_archive(archive, scratch, progress)
    return read_source([scratch, src], spec)


def check_given_splits(listing: SourceListing, tables: Mapping[str, dict[str, int]], spec: FgvcSpec) -> list[str]:
    """VPT json files against the release: train+val is the official train (and val; Flowers), test the
    official test, no image twice, and one class id per official class."""
    problems = []
    official = {split: dict(entries) for split, entries in listing.splits.items()}
    official_fit = {**official["train"], **official.get("val", {})}
    given_fit = {**tables["train"], **tables["val"]}
    overlap = tables["train"].keys() & tables["val"].keys()
    if overlap:
        problems.append(f"train.json and val.json share {len(overlap)} images (first: {sorted(overlap)[0]!r})")
    for name, given, expected in (
        ("train.json + val.json", given_fit, official_fit),
        ("test.json", tables["test"], official["test"]),
    ):
        unknown = sorted(given.keys() - expected.keys())
        absent = sorted(expected.keys() - given.keys())
        if unknown:
            problems.append(
                f"{name}: {len(unknown)} images the official split does not hold (first: {unknown[0]!r}; "
                f"official keys look like {next(iter(expected))!r})"
            )
        if absent:
            problems.append(f"{name}: {len(absent)} images of the official split missing (first: {absent[0]!r})")
    pairs = {
        (official_label, given_label)
        for table, reference in ((given_fit, official_fit), (tables["test"], official["test"]))
        for key, given_label in table.items()
        if (official_label := reference.get(key)) is not None
    }
    for side, name in ((0, "official class"), (1, "json class id")):
        seen = Counter(pair[side] for pair in pairs)
        split_up = sorted(value for value, times in seen.items() if times > 1)
        if split_up:
            problems.append(
                f"labels disagree with the release: {name} {split_up[0]} maps to several classes on the other side"
            )
    for split, count in spec.counts.items():
        if len(tables[split]) != count:
            problems.append(f"{split}.json: {len(tables[split]):,} entries, VPT's split has {count:,}")
    return problems


def _place_images(
    listing: SourceListing, keys: list[str], spec: FgvcSpec, staging: Path, scratch: Path, images: str, progress: bool
) -> None:
    """Move unpacked image folders into place; copy (or link) those of a release the user extracted."""
    to_copy = []
    for folder, source in listing.image_dirs.items():
        target = staging / folder
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.resolve().is_relative_to(scratch.resolve()):
            source.rename(target)
        elif images == "symlink":
            target.symlink_to(source.resolve(), target_is_directory=True)
        else:
            to_copy.append((folder, source))
    for key in tqdm(keys if to_copy else [], desc=f"{spec.short}: copy images", disable=None if progress else True):
        relative = Path(spec.image_root) / key
        for folder, source in to_copy:
            if relative.parts[: len(Path(folder).parts)] == Path(folder).parts:
                original = source / relative.relative_to(folder)
                if not original.is_file():
                    raise SourceError(
                        f"{spec.short}: image {str(original)!r} is listed by the release's metadata but does not exist"
                    )
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(original, staging / relative)


def _choose_splits(
    listing: SourceListing, spec: FgvcSpec, splits_dir: str | Path | None, seed: int
) -> tuple[dict[str, list[tuple[str, int]]], dict]:
    """(split -> entries, how they were chosen): VPT's files when given, else the release's, with val carved."""
    if splits_dir is not None:
        given_files = {split: Path(splits_dir) / f"{split}.json" for split in SPLITS}
        tables = {split: load_split_table(path) for split, path in given_files.items()}
        problems = check_given_splits(listing, tables, spec)
        if problems:
            raise SourceError(
                f"{spec.short}: the json files in {splits_dir} do not match the release:\n  " + "\n  ".join(problems)
            )
        return (
            {split: list(table.items()) for split, table in tables.items()},
            {
                "splits": "given",
                "given_files": {s: str(p) for s, p in given_files.items()},
                "given_sha256": {s: sha256_file(p) for s, p in given_files.items()},
            },
        )
    if "val" in listing.splits:
        return dict(listing.splits), {"splits": "official train/val/test"}
    train, val = carve_val(listing.splits["train"], val_size(len(listing.splits["train"])), seed)
    return (
        {"train": train, "val": val, "test": listing.splits["test"]},
        {
            "splits": "val carved from the official train split",
            "val_rule": f"ceil({VAL_FRACTION} * official train), numpy default_rng({seed}).permutation",
            "seed": seed,
        },
    )


def build_fgvc(
    dataset: str | FgvcSpec,
    src: str | Path,
    out: str | Path | None = None,
    splits_dir: str | Path | None = None,
    seed: int = 0,
    images: str = "copy",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Make `out` (default data/fgvc/<name>) from an official release; returns the folder.

    A folder that already has a manifest is kept (delete it or pass force=True to rebuild).
    """
    spec = dataset if isinstance(dataset, FgvcSpec) else spec_for(dataset)
    if images not in IMAGE_MODES:
        raise ValueError(f"images={images!r}; accepted: {list(IMAGE_MODES)}")
    out = Path(out) if out is not None else Path("data/fgvc") / spec.name
    if (out / "manifest.json").is_file() and not force:
        print(f"{spec.short}: already prepared ({out}); delete it (or pass --force) to build again")
        return out
    staging = out.parent / f".{out.name}.partial"
    scratch = out.parent / f".{out.name}.source"
    for leftover in (staging, scratch):
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        listing = _read_release(Path(src), spec, scratch, progress)
        entries, provenance = _choose_splits(listing, spec, splits_dir, seed)
        class_ids = sorted({label for split in SPLITS for _, label in entries[split]})
        if len(class_ids) != spec.num_classes:
            raise SourceError(
                f"{spec.short}: the release's labels hold {len(class_ids)} classes, "
                f"{spec.short} has {spec.num_classes}; is --src the right dataset?"
            )
        keys = [key for split in SPLITS for key, _ in entries[split]]
        _place_images(listing, keys, spec, staging, scratch, images, progress)
        image_digest = hashlib.sha256()
        for key in tqdm(keys, desc=f"{spec.short}: hash images", disable=None if progress else True):
            path = staging / spec.image_root / key
            if not path.is_file():
                raise SourceError(
                    f"{spec.short}: image {key!r} is listed by the release's metadata "
                    f"({', '.join(str(p) for p in listing.metadata_files)}) but is not in it"
                )
            image_digest.update(f"{key}\0{sha256_file(path)}\n".encode())
        for split in SPLITS:  # given files are kept byte for byte, so their published hashes still hold
            target = staging / f"{split}.json"
            if splits_dir is not None:
                shutil.copyfile(Path(splits_dir) / f"{split}.json", target)
            else:
                target.write_text(json.dumps(dict(entries[split])) + "\n")
        histograms = {split: [Counter(label for _, label in entries[split])[c] for c in class_ids] for split in SPLITS}
        manifest = {
            "dataset": spec.name,
            "short_name": spec.short,
            "format": "fgvc_json",
            "num_classes": spec.num_classes,
            "image_root": spec.image_root,
            "counts": {split: len(entries[split]) for split in SPLITS},
            "class_ids": class_ids,
            "class_histogram": histograms,
            "splits_sha256": {split: sha256_file(staging / f"{split}.json") for split in SPLITS},
            "images_sha256": image_digest.hexdigest(),
            "images": images if images == "symlink" else "files",
            "source": {
                "src": str(Path(src).resolve()),
                "release_files_sha256": {p.name: sha256_file(p) for p in listing.metadata_files},
                **provenance,
            },
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        elif out.exists() or out.is_symlink():
            out.unlink()
        staging.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    return out


def verify_fgvc_folder(
    folder: str | Path,
    num_classes: int,
    expected_counts: Mapping[str, int] | None = None,
    image_root: str | None = None,
    decode: bool = False,
    progress: bool = False,
) -> VerifyReport:
    """Every problem found, each naming its file (and entry)."""
    folder = Path(folder)
    report = VerifyReport(canonical_fgvc_name(folder.name), folder)
    manifest_path = folder / "manifest.json"
    manifest = read_manifest(folder)
    if image_root is None:
        image_root = (manifest or {}).get("image_root", "")
    tables: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        path = folder / f"{split}.json"
        if not path.is_file():
            report.problems.append(f"{path}: missing split file")
            continue
        try:
            tables[split] = load_split_table(path)
        except DatasetError as error:
            report.problems.append(str(error))
    for split, table in tables.items():
        if expected_counts and split in expected_counts and len(table) != expected_counts[split]:
            report.problems.append(
                f"{folder / (split + '.json')}: {len(table):,} entries, VPT's split has {expected_counts[split]:,}"
            )
    for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
        if first in tables and second in tables:
            shared = tables[first].keys() & tables[second].keys()
            if shared:
                report.problems.append(
                    f"{folder / (second + '.json')}: {len(shared)} images also in {first}.json "
                    f"(first: {sorted(shared)[0]!r})"
                )
    class_ids = {label for table in tables.values() for label in table.values()}
    if tables and len(class_ids) != num_classes:
        report.problems.append(
            f"{folder}: the split files hold {len(class_ids)} distinct classes, expected {num_classes}"
        )
    if "train" in tables:
        unseen = sorted(
            {label for split in ("val", "test") for label in tables.get(split, {}).values()}
            - set(tables["train"].values())
        )
        if unseen:
            report.problems.append(
                f"{folder / 'train.json'}: no training image of class id {unseen[0]} ({len(unseen)} such classes)"
            )
    base = folder / image_root
    for split, table in tables.items():
        for number, key in enumerate(
            tqdm(table, desc=f"{folder.name} {split}", disable=None if progress else True), start=1
        ):
            example = Example(base / key, table[key], f"{folder / (split + '.json')}:entry {number}")
            if not example.path.is_file():
                report.problems.append(f"{example.source}: image {str(example.path)!r} does not exist")
            elif decode:
                try:
                    load_rgb(example)
                except CorruptImageError as error:
                    report.problems.append(str(error))
    if manifest is not None:
        report.problems += manifest_problems(
            manifest,
            manifest_path,
            {split: len(t) for split, t in tables.items()},
            lambda split: folder / f"{split}.json",
            "splits_sha256",
            num_classes,
            "entries",
        )
    else:
        report.notes.append("no manifest.json: structure, counts and images checked, contents not hashed")
    return report
