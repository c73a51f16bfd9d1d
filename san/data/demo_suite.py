"""The offline demo suite: small tasks in exactly the VTAB-1K folder format.

Generated deterministically (a fixed seed per task) so that every machine gets the same
bytes. `digits` is real handwriting (scikit-learn's bundled 8x8 digits); the others are
procedural images modelled on VTAB's structured group: where a shape is (dsprites
location), how it is turned (dsprites orientation), and how many objects there are
(CLEVR count).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from san.data.vtab_folder import VTAB_COUNTS, write_task_folder

IMAGE_SIZE = 64
SPLIT_SIZES = {split: VTAB_COUNTS[split] for split in ("train800", "val200")}
PROCEDURAL_TEST_SIZE = 500
DIGITS_IMAGES = 1797  # scikit-learn's bundled 8x8 digits (load_digits): every one is used


def _background(rng: np.random.Generator) -> Image.Image:
    noise = rng.integers(0, 60, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return Image.fromarray(noise, "RGB")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(140, 256, size=3))


def _shape_location(rng: np.random.Generator) -> tuple[Image.Image, int]:
    """A shape anywhere; label = which of 8 vertical bands holds its centre."""
    image = _background(rng)
    draw = ImageDraw.Draw(image)
    radius = int(rng.integers(4, 8))
    margin = 8  # the largest radius, so every band is equally likely
    x = float(rng.uniform(margin, IMAGE_SIZE - margin))
    y = float(rng.uniform(margin, IMAGE_SIZE - margin))
    box = (x - radius, y - radius, x + radius, y + radius)
    kind = int(rng.integers(3))
    if kind == 0:
        draw.rectangle(box, fill=_colour(rng))
    elif kind == 1:
        draw.ellipse(box, fill=_colour(rng))
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=_colour(rng))
    label = min(int((x - margin) / (IMAGE_SIZE - 2 * margin) * 8), 7)
    return image, label


def _shape_orientation(rng: np.random.Generator) -> tuple[Image.Image, int]:
    """A bar through a random point; label = its angle in 8 bins over 0..180 degrees."""
    image = _background(rng)
    draw = ImageDraw.Draw(image)
    angle = float(rng.uniform(0, math.pi))
    length = float(rng.uniform(14, 24))
    cx, cy = rng.uniform(22, IMAGE_SIZE - 22, size=2)
    dx, dy = math.cos(angle) * length, -math.sin(angle) * length
    draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=_colour(rng), width=int(rng.integers(3, 6)))
    label = min(int(angle / math.pi * 8), 7)
    return image, label


def _object_count(rng: np.random.Generator) -> tuple[Image.Image, int]:
    """1 to 6 separated discs; label = count - 1."""
    image = _background(rng)
    draw = ImageDraw.Draw(image)
    count = int(rng.integers(1, 7))
    centres: list[tuple[float, float]] = []
    while len(centres) < count:
        x, y = rng.uniform(6, IMAGE_SIZE - 6, size=2)
        if all((x - a) ** 2 + (y - b) ** 2 > 12**2 for a, b in centres):
            centres.append((float(x), float(y)))
    for x, y in centres:
        radius = float(rng.uniform(3, 5))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=_colour(rng))
    return image, count - 1


def _digits(_: np.random.Generator) -> list[tuple[Image.Image, int]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    images = []
    for index in order:
        grey = (bunch.images[index] / 16.0 * 255).round().astype(np.uint8)
        image = Image.fromarray(grey, "L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST).convert("RGB")
        images.append((image, int(bunch.target[index])))
    return images


def _sampled(draw_one: Callable[[np.random.Generator], tuple[Image.Image, int]]) -> Callable:
    """A procedural task: draw train800 + val200 + test examples one at a time."""
    total = sum(SPLIT_SIZES.values()) + PROCEDURAL_TEST_SIZE
    return lambda rng: [draw_one(rng) for _ in range(total)]


# name -> (all examples in split order from a seeded generator, classes, seed)
TASKS: dict[str, tuple[Callable[[np.random.Generator], list], int, int]] = {
    "digits": (_digits, 10, 0),
    "shape_loc": (_sampled(_shape_location), 8, 1),
    "shape_ori": (_sampled(_shape_orientation), 8, 2),
    "object_count": (_sampled(_object_count), 6, 3),
}


def _examples(task: str) -> list[tuple[Image.Image, int]]:
    make_examples, _, seed = TASKS[task]
    return make_examples(np.random.default_rng(seed))


def write_task(task: str, out_root: Path) -> Path:
    """Write one task (skipped when already complete); see vtab_folder.write_task_folder."""
    final = out_root / task
    if (final / "manifest.json").is_file():
        return final
    examples = _examples(task)
    train, fit = SPLIT_SIZES["train800"], sum(SPLIT_SIZES.values())
    splits = {"train800": examples[:train], "val200": examples[train:fit], "test": examples[fit:]}
    return write_task_folder(out_root, task, splits, TASKS[task][1], {"generator": "san.data.demo_suite"})


def write_demo_suite(out_root: str | Path, tasks: list[str] | None = None) -> list[Path]:
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(tasks or []) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown demo task(s) {unknown}; accepted: {sorted(TASKS)}")
    return [write_task(task, out_root) for task in (tasks or list(TASKS))]
