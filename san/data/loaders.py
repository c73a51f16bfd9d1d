"""DataLoaders for a split role, seeded so that an epoch's order depends only on (seed, epoch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader

from san.backbones import DataConfig
from san.data.cache import TensorLoader, cached_split
from san.data.images import ImageListDataset, build_transform, is_deterministic
from san.data.splits import read_split


def build_loader(dataset: Mapping[str, Any], role: str, data_config: DataConfig, *, train: bool,
                 batch_size: int, num_workers: int, cache_dir: str | Path | None = None,
                 progress: bool = True) -> DataLoader | TensorLoader:
    """A loader for a split role. With `cache_dir`, a split whose transform is
    deterministic (VTAB's resize; any evaluation transform) is decoded once and served
    from a tensor; random augmentation (FGVC training) keeps the DataLoader path."""
    examples = read_split(dataset, role)
    transform = build_transform(dataset["transform"], data_config.input_size, data_config.interpolation, train)
    if cache_dir is not None and is_deterministic(dataset["transform"], train):
        spec = {"name": dataset["transform"], "size": data_config.input_size,
                "interpolation": data_config.interpolation, "train": train}
        images, labels, path = cached_split(examples, transform, spec, Path(cache_dir),
                                            f"{dataset['name']}-{role}", progress)
        return TensorLoader(images, labels, batch_size, shuffle=train, cache_file=path)
    return DataLoader(
        ImageListDataset(examples, transform),
        batch_size=batch_size,
        shuffle=train,
        drop_last=False,
        num_workers=num_workers,
        persistent_workers=False,
        # The trainer reseeds this generator at every epoch: shuffling and worker seeds then
        # depend only on (seed, epoch), which makes resumed runs identical to uninterrupted ones.
        generator=torch.Generator(),
    )
