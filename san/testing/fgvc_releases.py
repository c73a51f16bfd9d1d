"""Stand-ins for the five official FGVC releases, in their own file layouts and formats
(text tables, MATLAB files, archives named as the originals), so that `san-prepare fgvc`
is tested on what users download (tests/test_fgvc.py) and timed at full size without the
real downloads (scripts/time_fgvc_build.py). A release has `classes` classes and `train`
official train images (Flowers: train and val each) and `test` test images, dealt to the
classes in turn; an image's brightness encodes its class so that a model can learn it.
"""

from __future__ import annotations

import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat
from tqdm.auto import tqdm

from san.data.fgvc_sources import SPECS, FgvcSpec

TINY = (10, 12)  # (width, height) of test images


def _image(path: Path, label_index: int, rng: np.random.Generator, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    if size == TINY:
        noise = rng.integers(-15, 15, size=(height, width, 3))
    else:  # photo-like: smooth shading plus fine grain, so JPEG sizes are those of real photos
        ramp = np.linspace(-40, 40, width)[None, :, None] + np.linspace(-30, 30, height)[:, None, None]
        noise = ramp + rng.normal(0, 12, size=(height, width, 3))
    pixels = np.clip(30 + (60 * label_index) % 190 + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def _layout(classes: int, train: int, test: int) -> list[tuple[int, str]]:
    """(class index, official split) per image, classes dealt in turn as in the real tables."""
    return [(i % classes, split) for split, count in (("train", train), ("test", test)) for i in range(count)]


def _tar(archive: Path, base: Path, members: list[str]) -> None:
    with tarfile.open(archive, "w:gz" if archive.name.endswith(("gz", ".tgz")) else "w") as bundle:
        for member in members:
            bundle.add(base / member, arcname=member)


def cub_release(
    root: Path,
    classes: int = 4,
    train: int = 20,
    test: int = 8,
    seed: int = 0,
    folder: str = "CUB_200_2011",
    class_ids: list[int] | None = None,
    size: tuple[int, int] = TINY,
) -> Path:
    """CUB-200-2011's layout (NABirds uses the same tables, with its own class ids and folder)."""
    rng = np.random.default_rng(seed)
    base = root / folder
    ids = class_ids or list(range(1, classes + 1))
    images, labels, splits = [], [], []
    for number, (c, split) in enumerate(
        tqdm(_layout(classes, train, test), desc=f"write {folder}", disable=size == TINY), start=1
    ):
        relative = f"{ids[c]:03d}.Bird_{ids[c]}/Bird_{ids[c]}_{number:04d}.jpg"
        _image(base / "images" / relative, c, rng, size)
        images.append(f"{number} {relative}")
        labels.append(f"{number} {ids[c]}")
        splits.append(f"{number} {1 if split == 'train' else 0}")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels), ("train_test_split.txt", splits)):
        (base / name).write_text("\n".join(lines) + "\n")
    (base / "classes.txt").write_text("".join(f"{i} {i:03d}.Bird_{i}\n" for i in ids))
    return base


def flowers_release(
    root: Path, classes: int = 4, train: int = 12, test: int = 16, seed: int = 0, size: tuple[int, int] = TINY
) -> Path:
    """Oxford Flowers 102: jpg/image_%05d.jpg, imagelabels.mat, setid.mat (train and val of `train` each)."""
    rng = np.random.default_rng(seed)
    layout = [
        (i % classes, split)
        for split, count in (("trnid", train), ("valid", train), ("tstid", test))
        for i in range(count)
    ]
    order = rng.permutation(len(layout))  # the release's image ids are not grouped by split
    labels = np.zeros(len(layout), dtype=np.uint8)
    setid = {"trnid": [], "valid": [], "tstid": []}
    for image_id, position in enumerate(order, start=1):
        c, split = layout[position]
        labels[image_id - 1] = c + 1
        setid[split].append(image_id)
        _image(root / "jpg" / f"image_{image_id:05d}.jpg", c, rng, size)
    savemat(root / "imagelabels.mat", {"labels": labels[None, :]})
    savemat(root / "setid.mat", {key: np.array(ids, dtype=np.uint16)[None, :] for key, ids in setid.items()})
    return root


def dogs_release(
    root: Path, classes: int = 4, train: int = 20, test: int = 8, seed: int = 0, size: tuple[int, int] = TINY
) -> Path:
    """Stanford Dogs: Images/<synset>-<breed>/<synset>_<n>.jpg, train_list.mat / test_list.mat."""
    rng = np.random.default_rng(seed)
    lists: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for number, (c, split) in enumerate(_layout(classes, train, test)):
        synset = f"n020{85620 + c}"
        relative = f"{synset}-Breed_{c}/{synset}_{number}.jpg"
        _image(root / "Images" / relative, c, rng, size)
        lists[split].append((relative, c + 1))
    for split, entries in lists.items():
        files = np.empty((len(entries), 1), dtype=object)
        annotations = np.empty((len(entries), 1), dtype=object)
        for i, (relative, _) in enumerate(entries):
            files[i, 0] = np.array([relative])
            annotations[i, 0] = np.array([relative[:-4]])
        labels = np.array([[label] for _, label in entries], dtype=np.float64)
        savemat(root / f"{split}_list.mat", {"file_list": files, "annotation_list": annotations, "labels": labels})
    return root


def _cars_annotations(entries: list[tuple[str, int]], with_class: bool) -> np.ndarray:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
    table = np.zeros((1, len(entries)), dtype=[(name, "O") for name in fields])
    for i, (fname, label) in enumerate(entries):
        for name in fields[:4]:
            table[0, i][name] = np.array([[3]], dtype=np.uint8)
        if with_class:
            table[0, i]["class"] = np.array([[label]], dtype=np.uint8)
        table[0, i]["fname"] = np.array([fname])
    return table


def cars_release(
    root: Path, classes: int = 4, train: int = 20, test: int = 8, seed: int = 0, size: tuple[int, int] = TINY
) -> Path:
    """Stanford Cars: cars_train/, cars_test/, devkit/*.mat and cars_test_annos_withlabels.mat."""
    rng = np.random.default_rng(seed)
    entries: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for c, split in _layout(classes, train, test):
        fname = f"{len(entries[split]) + 1:05d}.jpg"
        _image(root / f"cars_{split}" / fname, c, rng, size)
        entries[split].append((fname, c + 1))
    (root / "devkit").mkdir()
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _cars_annotations(entries["train"], True)})
    savemat(root / "devkit" / "cars_test_annos.mat", {"annotations": _cars_annotations(entries["test"], False)})
    savemat(root / "cars_test_annos_withlabels.mat", {"annotations": _cars_annotations(entries["test"], True)})
    return root


def pack_release(name: str, extracted: Path, downloads: Path) -> Path:
    """The official archives of a release written by the functions above, in `downloads`."""
    downloads.mkdir(parents=True, exist_ok=True)
    if name == "cub":
        _tar(downloads / "CUB_200_2011.tgz", extracted.parent, ["CUB_200_2011"])
        return downloads / "CUB_200_2011.tgz"
    if name == "nabirds":
        _tar(downloads / "nabirds.tar.gz", extracted.parent, ["nabirds"])
        return downloads / "nabirds.tar.gz"
    if name == "oxford_flowers":
        _tar(downloads / "102flowers.tgz", extracted, ["jpg"])
        for mat in ("imagelabels.mat", "setid.mat"):
            (downloads / mat).write_bytes((extracted / mat).read_bytes())
    elif name == "stanford_dogs":
        _tar(downloads / "images.tar", extracted, ["Images"])
        _tar(downloads / "lists.tar", extracted, ["train_list.mat", "test_list.mat"])
    elif name == "stanford_cars":
        for folder in ("cars_train", "cars_test"):
            _tar(downloads / f"{folder}.tgz", extracted, [folder])
        _tar(downloads / "car_devkit.tgz", extracted, ["devkit"])
        (downloads / "cars_test_annos_withlabels.mat").write_bytes(
            (extracted / "cars_test_annos_withlabels.mat").read_bytes()
        )
    return downloads


NABIRDS_IDS = [295, 313, 817, 1010]  # NABirds' leaf classes are not numbered 1..C


RELEASE_FOLDERS = {"cub": "CUB_200_2011", "nabirds": "nabirds"}  # the folder a cub_txt archive unpacks to


def write_release(
    spec: FgvcSpec,
    root: Path,
    classes: int,
    train: int,
    test: int,
    size: tuple[int, int] = TINY,
    class_ids: list[int] | None = None,
) -> Path:
    """An extracted release in `spec`'s official format under `root`; returns the folder to pass as --src."""
    root.mkdir(parents=True, exist_ok=True)
    writers = {
        "cub_txt": lambda: cub_release(
            root, classes, train, test, folder=RELEASE_FOLDERS[spec.name], class_ids=class_ids, size=size
        ),
        "flowers_mat": lambda: flowers_release(root, classes, train, test, size=size),
        "dogs_mat": lambda: dogs_release(root, classes, train, test, size=size),
        "cars_mat": lambda: cars_release(root, classes, train, test, size=size),
    }
    return writers[spec.source_format]()


def make_release(name: str, root: Path, classes: int = 4) -> tuple[Path, FgvcSpec]:
    """A tiny extracted release of `name` under `root`, and the spec scaled to its size."""
    train, test = 5 * classes, 2 * classes
    path = write_release(
        SPECS[name], root, classes, train, test, class_ids=NABIRDS_IDS[:classes] if name == "nabirds" else None
    )
    counts = (
        {"train": train, "val": train, "test": test} if SPECS[name].official_val else {"train": train, "test": test}
    )
    return path, replace(SPECS[name], num_classes=classes, official_counts=counts)
