"""DataLoaders for a split role, seeded so that an epoch's order depends only on (seed, epoch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader, Sampler

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


class ShardSampler(Sampler[int]):
    """Rank `rank`'s share of a split among `world` processes: positions rank, rank + world, ...
    of the epoch's order (a permutation drawn from `generator` when shuffling, the split's order
    otherwise). Every rank draws the same permutation (the trainer seeds the generator from
    (seed, epoch)), so the shares are disjoint and cover the split once, and rank r's k-th batch
    of b holds images of the single-process run's k-th batch of b x world; the order does not
    depend on the number of processes, so a run resumes on any."""

    def __init__(self, size: int, rank: int, world: int, shuffle: bool, generator: torch.Generator):
        self.size, self.rank, self.world = size, rank, world
        self.shuffle, self.generator = shuffle, generator

    def __iter__(self):
        # the one draw RandomSampler makes (after the DataLoader's worker seed, drawn first)
        order = torch.randperm(self.size, generator=self.generator) if self.shuffle else torch.arange(self.size)
        return iter(order[self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))


class RankWorkerSeed:
    """A DataLoader worker's seed, offset by the data-parallel rank: the ranks share the loader's
    generator (it orders the data), so their workers would otherwise draw the same random crops
    for different images (timm seeds its distributed workers with the rank too)."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        torch.manual_seed((torch.initial_seed() + self.rank * 2**32) % 2**63)


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
    shard: tuple[int, int] = (0, 1),
) -> DataLoader | TensorLoader:
    """A loader for a split role. `preprocessing` is the backbone's, as plain values passed in
    by the caller: the data layer knows no models. With `cache_dir`, a split whose transform
    is deterministic (VTAB's resize; any evaluation transform) is decoded once and served
    from a tensor; random augmentation (FGVC training) keeps the DataLoader path.

    `shard` = (rank, world): a data-parallel process reads its share (`ShardSampler`) in
    batches of `batch_size` (the per-rank batch); `len(loader.dataset)` stays the whole split's."""
    rank, world = shard
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
        return TensorLoader(images, labels, batch_size, shuffle=train, cache_file=path, rank=rank, world=world)
    workers = resolve_num_workers(num_workers)
    # The trainer reseeds this generator at every epoch: shuffling and worker seeds then
    # depend only on (seed, epoch), which makes resumed runs identical to uninterrupted ones.
    generator = torch.Generator()
    dataset = ImageListDataset(examples, transform)
    sampler = ShardSampler(len(dataset), rank, world, train, generator) if world > 1 else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train if sampler is None else None,
        sampler=sampler,
        drop_last=False,
        num_workers=workers,
        # page-locked batches copy to the GPU asynchronously (the trainer uses non_blocking)
        pin_memory=pin_memory,
        # workers live across epochs: re-forking them every epoch costs seconds per FGVC epoch
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=generator,
        worker_init_fn=RankWorkerSeed(rank) if rank else None,
    )
