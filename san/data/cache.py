"""Decode and resize a split once; train and evaluate from one uint8 tensor.

VTAB-1K splits are small (800-1,000 training images) and their transform is
deterministic (a direct resize), so decoding JPEG/PNG with PIL at every step is pure
overhead. A split is decoded once through the very same transform the loader path uses
and stored as raw uint8 N x 3 x H x W (`<name>.u8`) beside a small JSON header with the
labels (`<name>.json`). The file's name carries a hash of everything that determines its
content: the list (paths and labels), each image file's size and modification time, the
transform and its parameters, and the versions of the libraries that decode and resize
(Pillow, torchvision). Change any of them and a new file is built; the old one is never
read again.

At real scale (a VTAB test split at 224 px is up to 11 GB: dsprites), the build writes
each image straight into a file-backed array, so memory holds one image, not the split
(three times over, as tensor + serialised buffer + its copy); readers memory-map the
file, and the trainer copies a split to the GPU only when it fits
`trainer.cache_device_budget`. Concurrent runs of one task build it once: the builder
holds a lock, the others wait for it and read its file.

Batches come in the same order as the DataLoader path (the same generator and
`torch.randperm`), so a run gives the same result with and without the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import PIL
import torch
import torchvision
from tqdm.auto import tqdm

from san.atomic import atomic_write_bytes
from san.data.images import load_rgb
from san.data.splits import Example
from san.locks import file_lock

CACHE_FORMAT = 2


def cache_key(examples: Sequence[Example], transform_spec: Mapping[str, Any]) -> str:
    identity = {
        "format": CACHE_FORMAT,
        "transform": dict(transform_spec),
        # the decoder and the resize kernels: a new release may change pixels
        "pillow": PIL.__version__,
        "torchvision": torchvision.__version__,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for example in examples:
        stat = Path(example.path).stat()
        digest.update(f"{example.path}\t{example.label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _decode_into(
    examples: Sequence[Example],
    transform: Callable,
    target_for_shape: Callable[[tuple], Any],
    progress: bool,
    description: str,
):
    """Decode every example into the array `target_for_shape(shape)` returns, one image at a time."""
    target = None
    for index, example in enumerate(tqdm(examples, desc=description, disable=None if progress else True, leave=False)):
        image = transform(load_rgb(example))
        if target is None:
            target = target_for_shape((len(examples), *image.shape))
        target[index] = image.numpy() if isinstance(target, np.ndarray) else image
    return target


def decode_split(
    examples: Sequence[Example], transform: Callable, progress: bool = True, description: str = "decoding"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The split in memory (one preallocated tensor, no list of images to stack)."""
    images = _decode_into(
        examples, transform, lambda shape: torch.empty(shape, dtype=torch.uint8), progress, description
    )
    return images, torch.tensor([e.label for e in examples], dtype=torch.long)


def _read(data_path: Path, header_path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not header_path.is_file():
        return None
    header = json.loads(header_path.read_text())
    shape = tuple(header["shape"])
    count = int(np.prod(shape))
    if not data_path.is_file() or data_path.stat().st_size != count:
        return None  # a header without its full data file: rebuild
    # shared=False maps the file copy-on-write: pages are read on demand, nothing is loaded up front
    images = torch.from_file(str(data_path), shared=False, size=count, dtype=torch.uint8).view(shape)
    return images, torch.tensor(header["labels"], dtype=torch.long)


def cached_split(
    examples: Sequence[Example],
    transform: Callable,
    transform_spec: Mapping[str, Any],
    cache_dir: Path,
    name: str,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, Path]:
    """(images uint8 NCHW, memory-mapped; labels; the cache's data file), built when missing."""
    stem = f"{name}-{cache_key(examples, transform_spec)}"
    cache_dir = Path(cache_dir)
    data_path, header_path = cache_dir / f"{stem}.u8", cache_dir / f"{stem}.json"
    found = _read(data_path, header_path)
    if found is not None:
        return (*found, data_path)
    with file_lock(cache_dir / f".{stem}.lock", wait=True):
        found = _read(data_path, header_path)  # another run may have built it while this one waited
        if found is not None:
            return (*found, data_path)
        partial = cache_dir / f".{stem}.u8.partial"
        try:
            images = _decode_into(
                examples,
                transform,
                lambda shape: np.memmap(partial, mode="w+", dtype=np.uint8, shape=shape),
                progress,
                f"caching {name}",
            )
            images.flush()
            shape = list(images.shape)
            del images
            with open(partial, "rb+") as stream:
                os.fsync(stream.fileno())
            os.replace(partial, data_path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        # The header goes last: a data file without one is never read.
        header = {
            "format": CACHE_FORMAT,
            "shape": shape,
            "labels": [e.label for e in examples],
            "transform": dict(transform_spec),
        }
        atomic_write_bytes(header_path, json.dumps(header).encode())
    found = _read(data_path, header_path)
    assert found is not None
    return (*found, data_path)


@dataclass
class _Sized:
    size: int

    def __len__(self) -> int:
        return self.size


class TensorLoader:
    """Batches of a split held as one tensor; the DataLoader interface the trainer uses.

    A data-parallel process (`world` > 1) reads positions rank, rank + world, ... of the epoch's
    order, as san.data.loaders.ShardSampler does on the DataLoader path."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        cache_file: Path | None = None,
        rank: int = 0,
        world: int = 1,
    ):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle = batch_size, shuffle
        self.rank, self.world = rank, world
        self.generator = torch.Generator()
        self.dataset = _Sized(len(labels))
        self.cache_file = cache_file

    def to_device(self, device: torch.device, budget_bytes: int | None = None) -> bool:
        """Keep the whole split on the device (no host-to-device copy per step) when it fits
        `budget_bytes`; otherwise it stays memory-mapped on the host and each batch is copied.
        Returns whether it moved."""
        if budget_bytes is not None and self.images.numel() > budget_bytes:
            return False
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return True

    def __len__(self) -> int:
        return (len(range(self.rank, len(self.labels), self.world)) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        count = len(self.labels)
        order = None
        if self.shuffle:
            # DataLoader's iterator first draws its workers' base seed from the generator, then its
            # RandomSampler draws the permutation: draw the same two, in the same order.
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
            order = torch.randperm(count, generator=self.generator).to(self.labels.device)
        if self.world > 1:
            if order is None:
                order = torch.arange(count, device=self.labels.device)
            order = order[self.rank :: self.world]
            count = len(order)
        for start in range(0, count, self.batch_size):
            if order is None:
                yield self.images[start : start + self.batch_size], self.labels[start : start + self.batch_size]
            else:
                index = order[start : start + self.batch_size]
                yield self.images[index], self.labels[index]
