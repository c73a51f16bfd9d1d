"""The five FGVC datasets as data, and readers for their official release files.

VPT introduced the train/val/test json splits every PEFT paper uses, but its split files
are no longer downloadable. The official releases have a train and a test split (Oxford
Flowers also a val split); VPT carved val out of the official train split. Its sizes
follow one rule, val = ceil(10% of the official train split), which the table below
derives rather than states (CUB 5,994 -> 5,394 + 600, NABirds 23,929 -> 21,536 + 2,393,
Dogs 12,000 -> 10,800 + 1,200, Cars 8,144 -> 7,329 + 815; Flowers keeps its official
1,020 / 1,020 / 6,149). Which images VPT put in val is not recoverable from the paper, so
a carved split matches VPT's sizes, not its membership; pass VPT's own json files to use
those.

A reader turns an extracted official release into a `SourceListing`: the image folders
to place in the dataset folder and the official splits as (json key, official class id)
in the release's own order. Json keys are relative to the dataset's `image_root`, as in
VPT's files; labels are the official class ids (the training reader re-indexes them).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from san.data.errors import DatasetError

VAL_FRACTION = 0.1


class SourceError(DatasetError):
    """An official release is missing a file, or a file does not say what the release says."""


def val_size(official_train: int) -> int:
    """VPT's val size: ceil(10%) of the official train split."""
    return math.ceil(VAL_FRACTION * official_train)


@dataclass(frozen=True)
class FgvcSpec:
    name: str  # the dataset config (configs/dataset/<name>.yaml) and its folder under data/fgvc
    short: str  # the name VPT and the papers use
    num_classes: int
    image_root: str  # json keys are relative to <dataset folder>/<image_root>
    source_format: str  # key of SOURCE_READERS
    official_files: tuple[str, ...]  # what to download, named as the release names them
    official_counts: Mapping[str, int]  # the release's own splits
    official_val: bool  # the release has a val split (Flowers); otherwise val is carved from train

    @property
    def counts(self) -> dict[str, int]:
        """VPT's split sizes, derived from the release's by the carve-out rule."""
        if self.official_val:
            return dict(self.official_counts)
        val = val_size(self.official_counts["train"])
        return {"train": self.official_counts["train"] - val, "val": val, "test": self.official_counts["test"]}


SPECS: dict[str, FgvcSpec] = {
    spec.name: spec
    for spec in [
        FgvcSpec("cub", "cub", 200, "images", "cub_txt", ("CUB_200_2011.tgz",), {"train": 5994, "test": 5794}, False),
        FgvcSpec(
            "nabirds", "nabirds", 555, "images", "cub_txt", ("nabirds.tar.gz",), {"train": 23929, "test": 24633}, False
        ),
        FgvcSpec(
            "oxford_flowers",
            "flowers",
            102,
            "",
            "flowers_mat",
            ("102flowers.tgz", "imagelabels.mat", "setid.mat"),
            {"train": 1020, "val": 1020, "test": 6149},
            True,
        ),
        FgvcSpec(
            "stanford_dogs",
            "dogs",
            120,
            "Images",
            "dogs_mat",
            ("images.tar", "lists.tar"),
            {"train": 12000, "test": 8580},
            False,
        ),
        FgvcSpec(
            "stanford_cars",
            "cars",
            196,
            "",
            "cars_mat",
            ("cars_train.tgz", "cars_test.tgz", "car_devkit.tgz", "cars_test_annos_withlabels.mat"),
            {"train": 8144, "test": 8041},
            False,
        ),
    ]
}

# Folder names other repositories use for the same datasets.
ALIASES = {
    "CUB_200_2011": "cub",
    "CUB": "cub",
    "NABirds": "nabirds",
    "OxfordFlowers": "oxford_flowers",
    "flowers": "oxford_flowers",
    "StanfordDogs": "stanford_dogs",
    "Stanford-dogs": "stanford_dogs",
    "dogs": "stanford_dogs",
    "StanfordCars": "stanford_cars",
    "Stanford-cars": "stanford_cars",
    "cars": "stanford_cars",
}


def spec_for(name: str) -> FgvcSpec:
    """The spec for a config name or a short name (cub, nabirds, flowers, dogs, cars)."""
    by_short = {spec.short: spec for spec in SPECS.values()}
    spec = SPECS.get(name) or by_short.get(name)
    if spec is None:
        raise KeyError(f"unknown FGVC dataset {name!r}; accepted: {sorted(set(SPECS) | set(by_short))}")
    return spec


@dataclass
class SourceListing:
    image_dirs: dict[str, Path]  # folder relative to the dataset folder -> where it is in the release
    splits: dict[str, list[tuple[str, int]]]  # "train", "test" (and "val") -> (json key, official class id)
    metadata_files: list[Path]


def _find(roots: list[Path], name: str, want_dir: bool = False) -> Path | None:
    """`name` in a root or up to three folders below it (releases nest differently when re-packed)."""
    for root in roots:
        for depth in range(4):
            for candidate in sorted(root.glob("/".join(["*"] * depth + [name]))):
                if candidate.is_dir() == want_dir and not any(
                    part.startswith(".") for part in candidate.relative_to(root).parts[:-1]
                ):
                    return candidate
    return None


def _require(roots: list[Path], spec: FgvcSpec, name: str, want_dir: bool = False, beside: Path | None = None) -> Path:
    path = (beside / name) if beside is not None else _find(roots, name, want_dir)
    if path is None or not path.exists():
        where = str(beside) if beside is not None else " or ".join(str(root) for root in roots)
        raise SourceError(
            f"{spec.short}: {name}{'/' if want_dir else ''} not found in {where}; the official "
            f"release files are {', '.join(spec.official_files)} (README, section 'Data')"
        )
    return path


def _whitespace_table(path: Path, columns: int) -> list[tuple[str, ...]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns - 1)
        if len(parts) != columns:
            raise SourceError(f"{path}:{number}: expected {columns} space-separated fields, got {line!r}")
        rows.append(tuple(parts))
    return rows


def read_cub_txt(roots: list[Path], spec: FgvcSpec) -> SourceListing:
    """CUB-200-2011 and NABirds: images.txt, image_class_labels.txt, train_test_split.txt by image id."""
    images_txt = _require(roots, spec, "images.txt")
    base = images_txt.parent
    labels_txt = _require(roots, spec, "image_class_labels.txt", beside=base)
    split_txt = _require(roots, spec, "train_test_split.txt", beside=base)
    image_dir = _require(roots, spec, "images", want_dir=True, beside=base)
    labels = dict(_whitespace_table(labels_txt, 2))
    is_train = dict(_whitespace_table(split_txt, 2))
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for image_id, relative in _whitespace_table(images_txt, 2):
        if image_id not in labels or image_id not in is_train:
            missing = labels_txt if image_id not in labels else split_txt
            raise SourceError(f"{missing}: no entry for image id {image_id} (listed in {images_txt})")
        if is_train[image_id] not in ("0", "1"):
            raise SourceError(f"{split_txt}: image id {image_id} has is_training_image {is_train[image_id]!r}")
        splits["train" if is_train[image_id] == "1" else "test"].append((relative, int(labels[image_id])))
    return SourceListing({"images": image_dir}, splits, [images_txt, labels_txt, split_txt])


def _load_mat(path: Path) -> dict:
    from scipy.io import loadmat

    try:
        return loadmat(path)
    except Exception as error:  # scipy raises several types for a damaged or foreign file
        raise SourceError(f"{path}: cannot read as a MATLAB file ({error})") from error


def _mat_field(table: dict, key: str, path: Path) -> np.ndarray:
    if key not in table:
        raise SourceError(f"{path}: no variable {key!r}; it holds {sorted(k for k in table if not k.startswith('__'))}")
    return table[key]


def _scalar(cell) -> object:
    """MATLAB cells and struct fields arrive as nested 1-element arrays."""
    while isinstance(cell, np.ndarray):
        if cell.size != 1:
            raise SourceError(f"expected a single value, got an array of shape {cell.shape}")
        cell = cell.ravel()[0]
    return cell


def read_flowers_mat(roots: list[Path], spec: FgvcSpec) -> SourceListing:
    """Oxford Flowers 102: jpg/image_%05d.jpg, imagelabels.mat (labels), setid.mat (trnid, valid, tstid)."""
    labels_mat = _require(roots, spec, "imagelabels.mat")
    setid_mat = _require(roots, spec, "setid.mat")
    image_dir = _require(roots, spec, "jpg", want_dir=True)
    labels = _mat_field(_load_mat(labels_mat), "labels", labels_mat).ravel()
    setid = _load_mat(setid_mat)
    splits = {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        ids = [int(i) for i in _mat_field(setid, key, setid_mat).ravel()]
        outside = [i for i in ids if not 1 <= i <= len(labels)]
        if outside:
            raise SourceError(f"{setid_mat}: {key} holds image id {outside[0]}, {labels_mat} labels 1..{len(labels)}")
        splits[split] = [(f"jpg/image_{i:05d}.jpg", int(labels[i - 1])) for i in ids]
    return SourceListing({"jpg": image_dir}, splits, [labels_mat, setid_mat])


def read_dogs_mat(roots: list[Path], spec: FgvcSpec) -> SourceListing:
    """Stanford Dogs: Images/<synset>-<breed>/*.jpg; train_list.mat / test_list.mat (file_list, labels)."""
    image_dir = _require(roots, spec, "Images", want_dir=True)
    splits, metadata = {}, []
    for split in ("train", "test"):
        path = _require(roots, spec, f"{split}_list.mat")
        table = _load_mat(path)
        files = _mat_field(table, "file_list", path).ravel()
        labels = _mat_field(table, "labels", path).ravel()
        if len(files) != len(labels):
            raise SourceError(f"{path}: {len(files)} files but {len(labels)} labels")
        splits[split] = [(str(_scalar(f)), int(_scalar(label))) for f, label in zip(files, labels)]
        metadata.append(path)
    return SourceListing({"Images": image_dir}, splits, metadata)


def read_cars_mat(roots: list[Path], spec: FgvcSpec) -> SourceListing:
    """Stanford Cars: cars_train/, cars_test/, devkit/cars_train_annos.mat and cars_test_annos_withlabels.mat
    (the devkit's cars_test_annos.mat has no labels)."""
    splits, metadata, image_dirs = {}, [], {}
    for split, annos_name in (("train", "cars_train_annos.mat"), ("test", "cars_test_annos_withlabels.mat")):
        path = _require(roots, spec, annos_name)
        annotations = _mat_field(_load_mat(path), "annotations", path).ravel()
        if annotations.dtype.names is None or not {"class", "fname"} <= set(annotations.dtype.names):
            raise SourceError(
                f"{path}: 'annotations' has no class/fname fields (the devkit's "
                f"cars_test_annos.mat has no labels; cars_test_annos_withlabels.mat does)"
            )
        folder = f"cars_{split}"
        image_dirs[folder] = _require(roots, spec, folder, want_dir=True)
        splits[split] = [(f"{folder}/{_scalar(row['fname'])}", int(_scalar(row["class"]))) for row in annotations]
        metadata.append(path)
    return SourceListing(image_dirs, splits, metadata)


SOURCE_READERS: dict[str, Callable[[list[Path], FgvcSpec], SourceListing]] = {
    "cub_txt": read_cub_txt,
    "flowers_mat": read_flowers_mat,
    "dogs_mat": read_dogs_mat,
    "cars_mat": read_cars_mat,
}


def read_source(roots: list[Path], spec: FgvcSpec) -> SourceListing:
    listing = SOURCE_READERS[spec.source_format](roots, spec)
    for split, entries in listing.splits.items():
        repeated = [key for key, times in Counter(key for key, _ in entries).items() if times > 1]
        if repeated:
            duplicate = repeated[0]
            raise SourceError(f"{spec.short}: image {duplicate!r} is listed twice in the official {split} split")
    return listing
