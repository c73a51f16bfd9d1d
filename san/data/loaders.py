"""DataLoaders for a split role, seeded so that an epoch's order depends only on (seed, epoch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader

from san.data.cache import TensorLoader, cached_split
from san.data.preprocessing import Preprocessing
from san.data.splits import read_split
from san.data.transforms import ImageListDataset, build_transform, is_deterministic


def resolve_num_workers(setting: int | str) -> int:
    """`auto`: one worker per CPU this process may run on, less one for the training loop.

    The affinity mask is what a SLURM job's --cpus-per-task (or taskset, or a container's
    cpuset) grants; os.cpu_count() would count the whole node's cores."""
    if setting == "auto":
        return max(0, len(os.sched_getaffinity(0)) - 1)
    return int(setting)


def build_loader(
    dataset: Mapping[str, Any],
    role: str,
    preprocessing: Preprocessing,
    *,
    train: bool,
    batch_size: int,
    num_workers: int | str,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    pin_memory: bool = False,
) -> DataLoader | TensorLoader:
    """A loader for a split role. `preprocessing` is the backbone's, as plain values passed in
    by the caller: the data layer knows no models. With `cache_dir`, a split whose transform
    is deterministic (VTAB's resize; any evaluation transform) is decoded once and served
    from a tensor; random augmentation (FGVC training) keeps the DataLoader path."""
    examples = read_split(dataset, role)
    transform = build_transform(dataset["transform"], preprocessing.input_size, preprocessing.interpolation, train)
    if cache_dir is not None and is_deterministic(dataset["transform"], train):
        spec = {
            "name": dataset["transform"],
            "size": preprocessing.input_size,
            "interpolation": preprocessing.interpolation,
            "train": train,
        }
        images, labels, path = cached_split(
            examples, transform, spec, Path(cache_dir), f"{dataset['name']}-{role}", progress
        )
        return TensorLoader(images, labels, batch_size, shuffle=train, cache_file=path)
    workers = resolve_num_workers(num_workers)
    return DataLoader(
        ImageListDataset(examples, transform),
        batch_size=batch_size,
        shuffle=train,
        drop_last=False,
        num_workers=workers,
        # page-locked batches copy to the GPU asynchronously (the trainer uses non_blocking)
        pin_memory=pin_memory,
        # workers live across epochs: re-forking them every epoch costs seconds per FGVC epoch
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # The trainer reseeds this generator at every epoch: shuffling and worker seeds then
        # depend only on (seed, epoch), which makes resumed runs identical to uninterrupted ones.
        generator=torch.Generator(),
    )
