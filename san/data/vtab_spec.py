"""VTAB-1K as data: each task's tfds source, split slices and label rule.

Facts from the VTAB reference code (google-research/task_adaptation), as summarised in
the project's reference notes. Slices are written the way that code computes them: a
percentage boundary T is `percent * num_examples // 100` of the named tfds split, so
"train[T:T+200], T = 90%" on a 3,060-image train split is train[2754:2954]. The exporter
(`san-prepare vtab`) reads the split sizes from the tfds builder and resolves the slices
with `resolve_slices`; the label rules below turn a tfds example into the VTAB label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

ROLES = ("train800", "val200", "test")
# Folder names other repositories use for the same tasks -> this suite's names.
ALIASES = {"cifar100": "cifar", "cifar-100": "cifar", "flowers102": "oxford_flowers102",
           "oxford_flowers": "oxford_flowers102", "pets": "oxford_iiit_pet", "oxford_pet": "oxford_iiit_pet",
           "svhn_cropped": "svhn", "camelyon": "patch_camelyon", "retinopathy": "diabetic_retinopathy",
           "resisc": "resisc45", "clevr_distance": "clevr_dist", "dsprites_location": "dsprites_loc",
           "dsprites_orientation": "dsprites_ori", "smallnorb_azimuth": "smallnorb_azi",
           "smallnorb_elevation": "smallnorb_ele"}


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
    builder: str  # tfds name and version pattern, as the reference code loads it
    slices: Mapping[str, Slice]
    num_classes: int
    label: str  # a key of LABEL_RULES
    grey: bool = False  # single-channel images tiled to RGB (dsprites, smallnorb)
    binary: bool = False  # 0/1 pixel values scaled to 0/255 (dsprites)
    manual_download: str | None = None


def _pct_val(split: str, percent: int) -> Slice:
    return Slice(split, (f"{percent}%", 0), (f"{percent}%", 200))


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec("caltech101", "caltech101:3.*.*", {"train800": Slice("train", 0, 800), "val200": _pct_val("train", 90),
                                                "test": Slice("test")}, 102, "label"),
    TaskSpec("cifar", "cifar100:3.*.*", {"train800": Slice("train", 0, 800), "val200": Slice("train", 45000, 45200),
                                         "test": Slice("test")}, 100, "label"),
    TaskSpec("dtd", "dtd:3.*.*", {"train800": Slice("train", 0, 800), "val200": Slice("validation", 0, 200),
                                  "test": Slice("test")}, 47, "label"),
    TaskSpec("oxford_flowers102", "oxford_flowers102:2.*.*", {"train800": Slice("train", 0, 800),
                                                              "val200": Slice("validation", 0, 200),
                                                              "test": Slice("test")}, 102, "label"),
    TaskSpec("oxford_iiit_pet", "oxford_iiit_pet:3.*.*", {"train800": Slice("train", 0, 800),
                                                          "val200": _pct_val("train", 80), "test": Slice("test")},
             37, "label"),
    TaskSpec("svhn", "svhn_cropped:3.*.*", {"train800": Slice("train", 0, 800), "val200": _pct_val("train", 90),
                                            "test": Slice("test")}, 10, "label"),
    TaskSpec("sun397", "sun397/tfds:4.*.*", {"train800": Slice("train", 0, 800), "val200": Slice("validation", 0, 200),
                                             "test": Slice("test")}, 397, "label"),
    TaskSpec("patch_camelyon", "patch_camelyon:2.*.*", {"train800": Slice("train", 0, 800),
                                                        "val200": Slice("validation", 0, 200),
                                                        "test": Slice("test")}, 2, "label"),
    TaskSpec("eurosat", "eurosat/rgb:2.*.*", {"train800": Slice("train", 0, 800), "val200": _pct_val("train", 60),
                                              "test": Slice("train", "80%")}, 10, "label"),
    TaskSpec("resisc45", "resisc45:3.*.*", {"train800": Slice("train", 0, 800), "val200": _pct_val("train", 60),
                                            "test": Slice("train", "80%")}, 45, "label",
             manual_download="download NWPU-RESISC45.rar from the dataset's page and place it in "
                             "<tfds-dir>/downloads/manual/ (tfds's resisc45 instructions)"),
    TaskSpec("diabetic_retinopathy", "diabetic_retinopathy_detection/btgraham-300:3.*.*",
             {"train800": Slice("train", 0, 800), "val200": Slice("validation", 0, 200), "test": Slice("test")},
             5, "label", manual_download="download the Kaggle 'diabetic-retinopathy-detection' files into "
                                         "<tfds-dir>/downloads/manual/ (tfds's diabetic_retinopathy_detection instructions)"),
    TaskSpec("clevr_count", "clevr:3.*.*", {"train800": Slice("train", 0, 800), "val200": Slice("train", 63000, 63200),
                                            "test": Slice("validation")}, 8, "clevr_count"),
    TaskSpec("clevr_dist", "clevr:3.*.*", {"train800": Slice("train", 0, 800), "val200": Slice("train", 63000, 63200),
                                           "test": Slice("validation")}, 6, "clevr_distance"),
    TaskSpec("dmlab", "dmlab:2.0.1", {"train800": Slice("train", 0, 800), "val200": Slice("validation", 0, 200),
                                      "test": Slice("test")}, 6, "label"),
    TaskSpec("kitti", "kitti:3.2.0", {"train800": Slice("train", 0, 800), "val200": Slice("validation", 0, 200),
                                      "test": Slice("test")}, 4, "kitti_distance"),
    TaskSpec("dsprites_loc", "dsprites:2.*.*", {"train800": Slice("train", 0, 800),
                                                "val200": Slice("train", 589824, 590024),
                                                "test": Slice("train", 663552)}, 16, "dsprites_location", grey=True, binary=True),
    TaskSpec("dsprites_ori", "dsprites:2.*.*", {"train800": Slice("train", 0, 800),
                                                "val200": Slice("train", 589824, 590024),
                                                "test": Slice("train", 663552)}, 16, "dsprites_orientation", grey=True,
             binary=True),
    TaskSpec("smallnorb_azi", "smallnorb:2.*.*", {"train800": Slice("train", 0, 800), "val200": Slice("test", 0, 200),
                                                  "test": Slice("test", "50%")}, 18, "smallnorb_azimuth", grey=True),
    TaskSpec("smallnorb_ele", "smallnorb:2.*.*", {"train800": Slice("train", 0, 800), "val200": Slice("test", 0, 200),
                                                  "test": Slice("test", "50%")}, 9, "smallnorb_elevation", grey=True),
]}


def _bound(bound: Any, size: int, default: int) -> int:
    if bound is None:
        return default
    if isinstance(bound, tuple):
        return _bound(bound[0], size, default) + bound[1]
    if isinstance(bound, str):
        return int(bound.rstrip("%")) * size // 100
    return int(bound)


def resolve_slices(task: str, split_sizes: Mapping[str, int]) -> dict[str, tuple[str, int, int]]:
    """{role: (tfds split, start, stop)} with every bound an index; errors name the task."""
    spec = TASKS[task]
    resolved = {}
    for role, piece in spec.slices.items():
        if piece.split not in split_sizes:
            raise KeyError(f"{task}: tfds split {piece.split!r} has no size; known: {sorted(split_sizes)}")
        size = split_sizes[piece.split]
        start, stop = _bound(piece.start, size, 0), _bound(piece.stop, size, size)
        if not 0 <= start < stop <= size:
            raise ValueError(f"{task}: {role} slice {piece.split}[{start}:{stop}] is outside a split of {size}")
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


def vtab_label(task: str, example: Mapping[str, Any]) -> int:
    spec = TASKS[task]
    label = LABEL_RULES[spec.label](example)
    if not 0 <= label < spec.num_classes:
        raise ValueError(f"{task}: label {label} outside 0..{spec.num_classes - 1}")
    return label
