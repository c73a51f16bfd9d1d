"""Stand-ins for ImageNet and its robustness sets in their released layouts, for the GIC tests:
ImageFolder trees of `.JPEG` files (`train/<wnid>/`, ImageNet-A/R's `<wnid>/`, ImageNet-C's
`<corruption>/<severity>/<wnid>/`), the flat validation folder the ILSVRC2012 tar unpacks to,
and a devkit with a real `data/meta.mat` (a MATLAB struct array written by scipy, fields as
the devkit's) and `data/ILSVRC2012_validation_ground_truth.txt`. An image's brightness encodes
its class, so a model can learn it.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image
from scipy.io import savemat

SIZE = (12, 10)  # (width, height)
# The devkit's meta.mat `synsets` fields, in its order (torchvision reads ILSVRC2012_ID, WNID, words
# and num_children from them).
SYNSET_FIELDS = (
    "ILSVRC2012_ID",
    "WNID",
    "words",
    "gloss",
    "num_children",
    "children",
    "wordnet_height",
    "num_train_images",
)


def write_image(path: Path, class_index: int, rng: np.random.Generator, size: tuple[int, int] = SIZE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    pixels = np.clip(30 + (50 * class_index) % 200 + rng.integers(-12, 12, size=(height, width, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path, format="JPEG", quality=90)


def wnids(count: int) -> list[str]:
    """`count` made-up wnids, sorted (real ones look the same: n + 8 digits)."""
    return [f"n{1440764 + 1000 * i:08d}" for i in range(count)]


def write_class_folders(
    folder: Path,
    classes: Sequence[str],
    per_class: int | Sequence[int],
    seed: int = 0,
    suffix: str = ".JPEG",
    size: tuple[int, int] = SIZE,
) -> Path:
    """`folder/<class>/<class>_<i>.JPEG` of `size` (width, height) images, as ImageNet's train folder names them."""
    rng = np.random.default_rng(seed)
    counts = [per_class] * len(classes) if isinstance(per_class, int) else list(per_class)
    for index, (name, count) in enumerate(zip(classes, counts)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            write_image(folder / name / f"{name}_{i}{suffix}", index, rng, size=size)
    return folder


def write_imagenet(root: Path, classes: Sequence[str], train: int | Sequence[int], val: int, seed: int = 0) -> Path:
    """`root/train/<wnid>/` and `root/val/<wnid>/`: the layout SSF's README and timm read."""
    write_class_folders(root / "train", classes, train, seed)
    write_class_folders(root / "val", classes, val, seed + 1)
    return root


def write_imagenet_c(
    root: Path, corruptions: Sequence[str], severities: Sequence[int], classes: Sequence[str], per_class: int
) -> Path:
    for c_index, corruption in enumerate(corruptions):
        for severity in severities:
            write_class_folders(root / corruption / str(severity), classes, per_class, seed=100 * c_index + severity)
    return root


def write_devkit(
    root: Path, classes: Sequence[str], ground_truth: Sequence[str], seed: int = 0, archive: bool = False
) -> Path:
    """`root/ILSVRC2012_devkit_t12/data/{meta.mat, ILSVRC2012_validation_ground_truth.txt}` (or its
    .tar.gz). As in the real devkit, ILSVRC2012_IDs 1..N are the leaf synsets in an order that is
    not the sorted wnid order, and non-leaf synsets (num_children > 0) follow with higher IDs."""
    order = np.random.default_rng(seed).permutation(len(classes))
    id_of = {classes[j]: i + 1 for i, j in enumerate(order)}
    rows = [
        (id_of[w], w, f"class {w}", "a leaf", 0, np.zeros((0,), dtype=np.uint8), 0, 1300)
        for w in sorted(classes, key=id_of.get)
    ]
    children = np.arange(1, len(classes) + 1)
    rows.append((len(classes) + 1, "n00001740", "entity", "the root", len(classes), children, 19, 0))
    synsets = np.array(rows, dtype=[(field, "O") for field in SYNSET_FIELDS]).reshape(-1, 1)
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    savemat(data / "meta.mat", {"synsets": synsets})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{id_of[w]}\n" for w in ground_truth))
    if not archive:
        return root / "ILSVRC2012_devkit_t12"
    path = root / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(path, "w:gz") as bundle:
        bundle.add(root / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    return path


def write_flat_val(folder: Path, ground_truth: Sequence[str], classes: Sequence[str], seed: int = 0) -> Path:
    """ILSVRC2012_val_<n:08d>.JPEG for n = 1.., as ILSVRC2012_img_val.tar unpacks; image n shows
    class ground_truth[n - 1]."""
    rng = np.random.default_rng(seed)
    index: Mapping[str, int] = {name: i for i, name in enumerate(classes)}
    for number, wnid in enumerate(ground_truth, start=1):
        write_image(folder / f"ILSVRC2012_val_{number:08d}.JPEG", index[wnid], rng)
    return folder
