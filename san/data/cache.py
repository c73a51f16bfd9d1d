"""Decode and resize a split once; train and evaluate from one uint8 tensor.

VTAB-1K splits are small (800-1,000 training images) and their transform is
deterministic (a direct resize), so decoding JPEG/PNG with PIL at every step is pure
overhead. A split is decoded once through the very same transform the loader path uses,
stored as a uint8 N x 3 x H x W tensor file, and served in batches from memory (or from
the GPU, where the trainer moves it once). The file's name carries a hash of everything
that determines its content: the list (paths and labels), each image file's size and
modification time, the transform and its parameters. Change any of them and a new file
is built; the old one is never read again.

Batches come in the same order as the DataLoader path (the same generator and
`torch.randperm`), so a run gives the same result with and without the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from san.data.images import load_rgb
from san.data.splits import Example
from san.records import atomic_write_bytes

CACHE_FORMAT = 1


def cache_key(examples: Sequence[Example], transform_spec: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "transform": dict(transform_spec)},
                                       sort_keys=True).encode())
    for example in examples:
        stat = Path(example.path).stat()
        digest.update(f"{example.path}\t{example.label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def decode_split(examples: Sequence[Example], transform: Callable, progress: bool = True,
                 description: str = "decoding") -> tuple[torch.Tensor, torch.Tensor]:
    images = [transform(load_rgb(example))
              for example in tqdm(examples, desc=description, disable=None if progress else True, leave=False)]
    return torch.stack(images), torch.tensor([e.label for e in examples], dtype=torch.long)


def cached_split(examples: Sequence[Example], transform: Callable, transform_spec: Mapping[str, Any],
                 cache_dir: Path, name: str, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, Path]:
    """(images uint8 NCHW, labels, cache file), building the file when it does not exist."""
    path = Path(cache_dir) / f"{name}-{cache_key(examples, transform_spec)}.pt"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return stored["images"], stored["labels"], path
    images, labels = decode_split(examples, transform, progress, f"caching {name}")
    buffer = io.BytesIO()
    torch.save({"images": images, "labels": labels}, buffer)
    atomic_write_bytes(path, buffer.getvalue())  # a crash mid-write leaves no partial cache file
    return images, labels, path


@dataclass
class _Sized:
    size: int

    def __len__(self) -> int:
        return self.size


class TensorLoader:
    """Batches of a split held as one tensor; the DataLoader interface the trainer uses."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool,
                 cache_file: Path | None = None):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle = batch_size, shuffle
        self.generator = torch.Generator()
        self.dataset = _Sized(len(labels))
        self.cache_file = cache_file

    def to_device(self, device: torch.device) -> None:
        """Keep the whole split on the device: no host-to-device copy per step."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        count = len(self.labels)
        order = None
        if self.shuffle:
            # DataLoader's iterator first draws its workers' base seed from the generator, then its
            # RandomSampler draws the permutation: draw the same two, in the same order.
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
            order = torch.randperm(count, generator=self.generator).to(self.labels.device)
        for start in range(0, count, self.batch_size):
            if order is None:
                yield self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]
            else:
                index = order[start:start + self.batch_size]
                yield self.images[index], self.labels[index]
