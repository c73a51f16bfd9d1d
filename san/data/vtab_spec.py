"""VTAB-1K as data: each task's tfds source, split slices, label rule and versions.

Facts from the VTAB reference code (google-research/task_adaptation), as summarised in
the project's reference notes. Slices are written the way that code computes them: a
percentage boundary T is `percent * num_examples // 100` of the named tfds split, so
"train[T:T+200], T = 90%" on a 3,060-image train split is train[2754:2954]. The exporter
(`san-prepare vtab`) reads the split sizes from the tfds builder and resolves the slices
with `resolve_slices`; the label rules below turn a tfds example into the VTAB label.

Versions: `reference_version` is the pattern the reference code loads, `vpt_version` the
exact version VPT used (VPT's VTAB_SETUP.md, tfds 4.4.0+nightly). `choose_version` picks
VPT's version where the installed tfds can load or build it and otherwise the version the
installed tfds builds, and says why; the exporter records the choice in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping

from san.data.errors import DatasetError

# Folder names other repositories use for the same tasks -> this suite's names.
ALIASES = {
    "cifar100": "cifar",
    "cifar-100": "cifar",
    "flowers102": "oxford_flowers102",
    "oxford_flowers": "oxford_flowers102",
    "pets": "oxford_iiit_pet",
    "oxford_pet": "oxford_iiit_pet",
    "svhn_cropped": "svhn",
    "camelyon": "patch_camelyon",
    "retinopathy": "diabetic_retinopathy",
    "resisc": "resisc45",
    "clevr_distance": "clevr_dist",
    "dsprites_location": "dsprites_loc",
    "dsprites_orientation": "dsprites_ori",
    "smallnorb_azimuth": "smallnorb_azi",
    "smallnorb_elevation": "smallnorb_ele",
}
# VPT's VTAB_SETUP.md: "Here are what we used for VPT" (tfds 4.4.0+nightly).
VPT_TFDS = "4.4.0+nightly"


@dataclass(frozen=True)
class Slice:
    """`split[start:stop]`; a bound is an int, a `"<p>%"` string (p% of the split, floored) or
    `("<p>%", offset)` (that boundary plus offset); None is the split's end."""

    split: str
    start: Any = 0
    stop: Any = None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    tfds_name: str  # tfds dataset (with its config where it has one), e.g. "sun397/tfds"
    reference_version: str  # the version (pattern) the VTAB reference code loads
    vpt_version: str  # the exact version VPT used (VTAB_SETUP.md)
    slices: Mapping[str, Slice]
    num_classes: int
    label: str  # a key of LABEL_RULES
    test_count: int  # test images at VPT's versions: what the published VTAB-1K copies hold
    id_feature: str | None = None  # the tfds feature naming the source image (what VPT's split file lists)
    grey: bool = False  # single-channel images tiled to RGB (dsprites, smallnorb)
    binary: bool = False  # 0/1 pixel values scaled to 0/255 (dsprites)
    manual_download: str | None = None  # what tfds cannot download by itself, and where it goes


def _pct_val(split: str, percent: int) -> Slice:
    return Slice(split, (f"{percent}%", 0), (f"{percent}%", 200))


_TRAIN800 = Slice("train", 0, 800)
_VALIDATION200 = Slice("validation", 0, 200)
_RESISC45_MANUAL = (
    "tfds cannot download RESISC45: download NWPU-RESISC45.rar (OneDrive link in tfds's resisc45 instructions: "
    "https://1drv.ms/u/s!AmgKYzARBl5ca3HNaHIlzp_IXjs) and extract it into <tfds-dir>/downloads/manual/ so that "
    "<tfds-dir>/downloads/manual/NWPU-RESISC45/<class>/*.jpg exist"
)
_RETINOPATHY_MANUAL = (
    "tfds cannot download the Kaggle files: `kaggle competitions download -c diabetic-retinopathy-detection`, "
    "then in <tfds-dir>/downloads/manual/: `cat train.zip.* > train.zip; cat test.zip.* > test.zip`, unzip "
    "train.zip into train/, test.zip into test/, sample.zip into sample/, and unzip trainLabels.csv.zip "
    "(tfds's diabetic_retinopathy_detection instructions; VPT notes all five train.zip parts are needed); "
    "btgraham-300 needs OpenCV (pip install opencv-python-headless)"
)
_SUN397_MANUAL = (
    "sun397 downloads SUN397.tar.gz (39 GB) and Partitions.zip from vision.princeton.edu; if that server "
    "fails, fetch both files by hand and put them in <tfds-dir>/downloads/manual/ under those names (tfds "
    "uses a manually placed file named as in its checksums). Needs OpenCV (pip install opencv-python-headless)"
)

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec(
            "caltech101",
            "caltech101",
            "3.*.*",
            "3.0.1",
            {"train800": _TRAIN800, "val200": _pct_val("train", 90), "test": Slice("test")},
            102,
            "label",
            test_count=6084,
            id_feature="image/file_name",
        ),
        TaskSpec(
            "cifar",
            "cifar100",
            "3.*.*",
            "3.0.2",
            {"train800": _TRAIN800, "val200": Slice("train", 45000, 45200), "test": Slice("test")},
            100,
            "label",
            test_count=10000,
            id_feature="id",
        ),
        TaskSpec(
            "dtd",
            "dtd",
            "3.*.*",
            "3.0.1",
            {"train800": _TRAIN800, "val200": _VALIDATION200, "test": Slice("test")},
            47,
            "label",
            test_count=1880,
            id_feature="file_name",
        ),
        TaskSpec(
            "oxford_flowers102",
            "oxford_flowers102",
            "2.*.*",
            "2.1.1",
            {"train800": _TRAIN800, "val200": _VALIDATION200, "test": Slice("test")},
            102,
            "label",
            test_count=6149,
            id_feature="file_name",
        ),
        TaskSpec(
            "oxford_iiit_pet",
            "oxford_iiit_pet",
            "3.*.*",
            "3.2.0",
            {"train800": _TRAIN800, "val200": _pct_val("train", 80), "test": Slice("test")},
            37,
            "label",
            test_count=3669,
            id_feature="file_name",
        ),
        TaskSpec(
            "svhn",
            "svhn_cropped",
            "3.*.*",
            "3.0.0",
            {"train800": _TRAIN800, "val200": _pct_val("train", 90), "test": Slice("test")},
            10,
            "label",
            test_count=26032,
            id_feature="id",
        ),
        TaskSpec(
            "sun397",
            "sun397/tfds",
            "4.*.*",
            "4.0.0",
            {"train800": _TRAIN800, "val200": _VALIDATION200, "test": Slice("test")},
            397,
            "label",
            test_count=21750,
            id_feature="file_name",
            manual_download=_SUN397_MANUAL,
        ),
        TaskSpec(
            "patch_camelyon",
            "patch_camelyon",
            "2.*.*",
            "2.0.0",
            {"train800": _TRAIN800, "val200": _VALIDATION200, "test": Slice("test")},
            2,
            "label",
            test_count=32768,
            id_feature="id",
        ),
        TaskSpec(
            "eurosat",
            "eurosat/rgb",
            "2.*.*",
            "2.0.0",
            {"train800": _TRAIN800, "val200": _pct_val("train", 60), "test": Slice("train", "80%")},
            10,
            "label",
            test_count=5400,
            id_feature="filename",
        ),
        TaskSpec(
            "resisc45",
            "resisc45",
            "3.*.*",
            "3.0.0",
            {"train800": _TRAIN800, "val200": _pct_val("train", 60), "test": Slice("train", "80%")},
            45,
            "label",
            test_count=6300,
            id_feature="filename",
            manual_download=_RESISC45_MANUAL,
        ),
        TaskSpec(
            "diabetic_retinopathy",
            "diabetic_retinopathy_detection/btgraham-300",
            "3.*.*",
            "3.0.0",
            {"train800": _TRAIN800, "val200": _VALIDATION200, "test": Slice("test")},
            5,
            "label",
            test_count=42670,
            id_feature="name",
            manual_download=_RETINOPATHY_MANUAL,
        ),
        TaskSpec(
            "clevr_count",
            "clevr",
            "3.*.*",
            "3.1.0",
            {"train800": _TRAIN800, "val200": Slice("train", 63000, 63200), "test": Slice("validation")},
            8,
            "clevr_count",
            test_count=15000,
            id_feature="file_name",
        ),
        TaskSpec(
            "clevr_dist",
            "clevr",
            "3.*.*",
            "3.1.0",
            {"train800": _TRAIN800, "val200": Slice("train", 63000, 63200), "test": Slice("validation")},
            6,
            "clevr_distance",
            test_count=15000,
            id_feature="file_name",
        ),
        TaskSpec(
            "dmlab",
            "dmlab",
            "2.0.1",
            "2.0.1",
            {"train800": _TRAIN800, "val200": _VALIDATION200, "test": Slice("test")},
            6,
            "label",
            test_count=22735,
            id_feature="filename",
        ),
        # The reference code pins kitti 3.1.0, which no longer builds; VPT used 3.2.0 (task_adaptation issue 18).
        TaskSpec(
            "kitti",
            "kitti",
            "3.2.0",
            "3.2.0",
            {"train800": _TRAIN800, "val200": _VALIDATION200, "test": Slice("test")},
            4,
            "kitti_distance",
            test_count=711,
            id_feature="image/file_name",
        ),
        TaskSpec(
            "dsprites_loc",
            "dsprites",
            "2.*.*",
            "2.0.0",
            {"train800": _TRAIN800, "val200": Slice("train", 589824, 590024), "test": Slice("train", 663552)},
            16,
            "dsprites_location",
            test_count=73728,
            grey=True,
            binary=True,
        ),
        TaskSpec(
            "dsprites_ori",
            "dsprites",
            "2.*.*",
            "2.0.0",
            {"train800": _TRAIN800, "val200": Slice("train", 589824, 590024), "test": Slice("train", 663552)},
            16,
            "dsprites_orientation",
            test_count=73728,
            grey=True,
            binary=True,
        ),
        TaskSpec(
            "smallnorb_azi",
            "smallnorb",
            "2.*.*",
            "2.0.0",
            {"train800": _TRAIN800, "val200": Slice("test", 0, 200), "test": Slice("test", "50%")},
            18,
            "smallnorb_azimuth",
            test_count=12150,
            grey=True,
        ),
        TaskSpec(
            "smallnorb_ele",
            "smallnorb",
            "2.*.*",
            "2.0.0",
            {"train800": _TRAIN800, "val200": Slice("test", 0, 200), "test": Slice("test", "50%")},
            9,
            "smallnorb_elevation",
            test_count=12150,
            grey=True,
        ),
    ]
}


class TfdsVersionError(DatasetError):
    """A tfds version was asked for that the installed tfds can neither load nor build."""


@dataclass(frozen=True)
class VersionChoice:
    version: str
    reason: str  # why this version, in words (printed and recorded in the manifest)


def _parse(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _matches(version: str, pattern: str) -> bool:
    return all(want in ("*", have) for have, want in zip(version.split("."), pattern.split(".")))


def choose_version(
    spec: TaskSpec,
    buildable: Collection[str],
    prepared: Collection[str],
    requested: str | None = None,
    tfds_version: str = "the installed tfds",
) -> VersionChoice:
    """The tfds version to export `spec` from.

    `buildable`: versions the installed tfds can generate (its canonical version and its
    newest); `prepared`: versions already on disk in the tfds data dir (tfds loads any of
    them from their files). Order: an explicit request (an error if unavailable); VPT's
    version; the newest prepared version matching the reference pattern; the version the
    installed tfds builds by default (`buildable`'s first).
    """
    available = sorted(set(buildable) | set(prepared), key=_parse)
    if requested is not None:
        if requested in available:
            return VersionChoice(requested, f"requested with --tfds-version (VPT used {spec.vpt_version})")
        raise TfdsVersionError(
            f"{spec.name}: {spec.tfds_name}:{requested} is neither prepared in the tfds data dir nor buildable by "
            f"tensorflow-datasets {tfds_version}; available: {', '.join(available) or 'none'} (buildable: "
            f"{', '.join(buildable) or 'none'}; prepared: {', '.join(prepared) or 'none'}). Pick one of them with "
            f"--tfds-version {spec.name}=<version>, or prepare {requested} with the tfds release that still builds it"
        )
    if spec.vpt_version in available:
        return VersionChoice(spec.vpt_version, "VPT's version")
    on_disk = [v for v in sorted(prepared, key=_parse, reverse=True) if _matches(v, spec.reference_version)]
    if on_disk:
        return VersionChoice(on_disk[0], f"already prepared; VPT used {spec.vpt_version}, which is not available")
    if buildable:
        default = list(buildable)[0]
        pattern = (
            ""
            if _matches(default, spec.reference_version)
            else f", outside the reference code's {spec.reference_version}"
        )
        return VersionChoice(
            default,
            f"the only one tensorflow-datasets {tfds_version} builds{pattern}; VPT used "
            f"{spec.vpt_version}, which it can neither build nor find prepared",
        )
    raise TfdsVersionError(
        f"{spec.name}: tensorflow-datasets {tfds_version} offers no version of {spec.tfds_name} "
        f"(nothing prepared, nothing buildable); install a tfds release that has it"
    )


def _bound(bound: Any, size: int, default: int) -> int:
    if bound is None:
        return default
    if isinstance(bound, tuple):
        return _bound(bound[0], size, default) + bound[1]
    if isinstance(bound, str):
        return int(bound.rstrip("%")) * size // 100
    return int(bound)


def _spec(task: str | TaskSpec) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else TASKS[task]


def resolve_slices(task: str | TaskSpec, split_sizes: Mapping[str, int]) -> dict[str, tuple[str, int, int]]:
    """{role: (tfds split, start, stop)} with every bound an index; errors name the task."""
    spec = _spec(task)
    task = spec.name
    resolved = {}
    for role, piece in spec.slices.items():
        if piece.split not in split_sizes:
            raise DatasetError(
                f"{task}: tfds split {piece.split!r} has no size; known: {sorted(split_sizes)}. "
                f"VTAB-1K reads {spec.tfds_name} with that split: export another tfds version "
                f"(--tfds-version {task}=<version>) or prepare the builder again"
            )
        size = split_sizes[piece.split]
        start, stop = _bound(piece.start, size, 0), _bound(piece.stop, size, size)
        if not 0 <= start < stop <= size:
            raise DatasetError(
                f"{task}: {role} slice {piece.split}[{start}:{stop}] is outside a split of {size}; "
                f"this {spec.tfds_name} is not the dataset VTAB-1K was defined on: export another tfds "
                f"version (--tfds-version {task}=<version>) or prepare the builder again"
            )
        resolved[role] = (piece.split, start, stop)
    return resolved


def as_tfds_split(piece: tuple[str, int, int]) -> str:
    split, start, stop = piece
    return f"{split}[{start}:{stop}]"


# --- label rules: a tfds example (a dict of numpy values) -> the VTAB label -------------------
def _largest_threshold_below(value: float, thresholds: list[float]) -> int:
    return max(i for i, t in enumerate(thresholds) if t < value)


def clevr_count(example: Mapping[str, Any]) -> int:
    return len(example["objects"]["size"]) - 3


CLEVR_DISTANCE_THRESHOLDS = [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0]


def clevr_distance(example: Mapping[str, Any]) -> int:
    depth = min(float(coords[2]) for coords in example["objects"]["pixel_coords"])
    return _largest_threshold_below(depth, CLEVR_DISTANCE_THRESHOLDS)


KITTI_THRESHOLDS = [-100.0, 8.0, 20.0, 999.0]


def kitti_distance(example: Mapping[str, Any]) -> int:
    """Distance bin of the closest vehicle (object type < 3); 1000 when there is none."""
    objects = example["objects"]
    depths = [float(location[2]) for kind, location in zip(objects["type"], objects["location"]) if int(kind) < 3]
    return _largest_threshold_below(min(depths + [1000.0]), KITTI_THRESHOLDS)


def dsprites_location(example: Mapping[str, Any]) -> int:
    return int(example["label_x_position"]) // 2  # 32 positions -> 16 classes


def dsprites_orientation(example: Mapping[str, Any]) -> int:
    return int(int(example["label_orientation"]) / 2.5)  # 40 orientations -> 16 classes (floor)


LABEL_RULES: dict[str, Callable[[Mapping[str, Any]], int]] = {
    "label": lambda example: int(example["label"]),
    "clevr_count": clevr_count,
    "clevr_distance": clevr_distance,
    "kitti_distance": kitti_distance,
    "dsprites_location": dsprites_location,
    "dsprites_orientation": dsprites_orientation,
    "smallnorb_azimuth": lambda example: int(example["label_azimuth"]),
    "smallnorb_elevation": lambda example: int(example["label_elevation"]),
}


def vtab_label(task: str | TaskSpec, example: Mapping[str, Any]) -> int:
    spec = _spec(task)
    label = LABEL_RULES[spec.label](example)
    if not 0 <= label < spec.num_classes:
        raise DatasetError(
            f"{spec.name}: label {label} outside 0..{spec.num_classes - 1}, by the {spec.label!r} rule "
            f"on a {spec.tfds_name} example: its tfds version labels differently; export another "
            f"(--tfds-version {spec.name}=<version>)"
        )
    return label
