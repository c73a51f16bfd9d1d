"""DataLoaders for a split role, seeded so that an epoch's order depends only on (seed, epoch)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader

from san.backbones import DataConfig
from san.data.images import ImageListDataset, build_transform
from san.data.splits import read_split


def build_loader(dataset: Mapping[str, Any], role: str, data_config: DataConfig, *, train: bool,
                 batch_size: int, num_workers: int) -> DataLoader:
    examples = read_split(dataset, role)
    transform = build_transform(dataset["transform"], data_config.input_size, data_config.interpolation, train)
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
