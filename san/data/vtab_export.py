"""`san-prepare vtab`: VTAB-1K from tensorflow-datasets into the folder format, losslessly.

Each task's tfds source, version pattern, split slices and label rule come from
`vtab_spec` (the VTAB reference code's choices). The split sizes that the percentage
slices need are read from the tfds builder. Images are written as PNG in tfds order by
the shared folder writer (staging folder + rename: an interrupted export leaves nothing
that passes verification), with a manifest recording the builder, version and slices.
tensorflow-datasets is an optional extra (`pip install '.[tfds]'`); TensorFlow is not
needed: examples are read through `tfds.data_source`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from san.data.splits import DatasetError
from san.data.vtab_folder import write_task_folder
from san.data.vtab_spec import TASKS, TaskSpec, as_tfds_split, resolve_slices, vtab_label


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError("san-prepare vtab needs tensorflow-datasets: pip install 'san-peft-bench[tfds]' "
                          "(or pip install tensorflow-datasets)") from None
    return tfds


def to_rgb(image: np.ndarray, spec: TaskSpec) -> Image.Image:
    """A tfds image array as an RGB PIL image: single channels tiled, binary masks to 0/255."""
    pixels = np.asarray(image)
    if spec.binary:
        pixels = pixels * 255
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def split_sizes(spec: TaskSpec, data_dir: str | None) -> dict[str, int]:
    builder = _tfds().builder(spec.builder, data_dir=data_dir)
    sizes = {name: info.num_examples for name, info in builder.info.splits.items()}
    if not sizes:
        hint = spec.manual_download or f"run `tfds build {spec.builder.split(':')[0]}` (or let tfds download it)"
        raise DatasetError(f"{spec.name}: tfds knows no split sizes for {spec.builder} in "
                           f"{data_dir or 'the default tfds folder'}; {hint}")
    return sizes


def _examples(task: str, spec: TaskSpec, split: str, data_dir: str | None, progress: bool) -> Iterator:
    source = _tfds().data_source(spec.builder, split=split, data_dir=data_dir)
    for example in tqdm(source, desc=f"{task} {split}", disable=None if progress else True, leave=False):
        yield to_rgb(example["image"], spec), vtab_label(task, example)


def export_task(task: str, out_root: str | Path, data_dir: str | None = None,
                sizes: Mapping[str, int] | None = None, progress: bool = True) -> Path:
    """Export one task; `sizes` overrides the builder's split sizes (tests on mock data)."""
    if task not in TASKS:
        raise KeyError(f"unknown VTAB task {task!r}; accepted: {sorted(TASKS)}")
    spec = TASKS[task]
    slices = resolve_slices(task, sizes or split_sizes(spec, data_dir))
    splits = {role: _examples(task, spec, as_tfds_split(piece), data_dir, progress) for role, piece in slices.items()}
    source: dict[str, Any] = {"tfds_builder": spec.builder, "slices": {r: as_tfds_split(p) for r, p in slices.items()},
                              "label_rule": spec.label, "tfds_version": _tfds().__version__}
    return write_task_folder(Path(out_root), task, splits, spec.num_classes, {"source": source})


def export_vtab(out_root: str | Path, tasks: list[str] | None = None, data_dir: str | None = None,
                progress: bool = True) -> list[Path]:
    """Every task (or `tasks`); a task whose folder is already complete is skipped (resume)."""
    written = []
    for task in tasks or list(TASKS):
        final = Path(out_root) / task
        if (final / "manifest.json").is_file():
            print(f"{task}: already exported ({final}); delete it to export again")
            written.append(final)
            continue
        written.append(export_task(task, out_root, data_dir, progress=progress))
        print(f"{task}: {written[-1]}")
    return written
