"""The decoded-split cache: same pixels and batch order as the DataLoader path, and a new
file whenever the list, an image or the transform changes."""

from __future__ import annotations

import os

import torch
from conftest import tiny_dataset
from torch.utils.data import DataLoader

from san.data.cache import TensorLoader
from san.data.loaders import build_loader
from san.data.preprocessing import Preprocessing

PREPROCESSING = Preprocessing(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")


def _batches(loader, seed: int) -> list:
    loader.generator.manual_seed(seed)
    return [(images.clone(), labels.clone()) for images, labels in loader]


def test_cached_split_is_bit_identical_to_the_loader_path_in_the_same_order(tiny_task, tmp_path):
    options = dict(train=True, batch_size=5, num_workers=0)
    plain = build_loader(tiny_dataset(tiny_task), "train", PREPROCESSING, **options)
    cached = build_loader(tiny_dataset(tiny_task), "train", PREPROCESSING, cache_dir=tmp_path / "cache", **options)
    assert isinstance(plain, DataLoader) and isinstance(cached, TensorLoader)
    for seed in (0, 7):
        expected, got = _batches(plain, seed), _batches(cached, seed)
        assert len(expected) == len(got) == len(plain)
        for (a_images, a_labels), (b_images, b_labels) in zip(expected, got):
            assert a_images.dtype == b_images.dtype == torch.uint8
            assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)


def test_cache_is_reused_and_invalidated_by_list_image_or_transform(tiny_task, tmp_path):
    cache = tmp_path / "cache"

    def cache_file(task_dataset, preprocessing=PREPROCESSING):
        loader = build_loader(
            task_dataset, "val", preprocessing, train=False, batch_size=4, num_workers=0, cache_dir=cache
        )
        return loader.cache_file

    first = cache_file(tiny_dataset(tiny_task))
    stamp = first.stat().st_mtime_ns
    assert cache_file(tiny_dataset(tiny_task)) == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt

    other_size = Preprocessing(24, (0.5,) * 3, (0.5,) * 3, "bicubic")
    assert cache_file(tiny_dataset(tiny_task), other_size) != first
    assert cache_file(tiny_dataset(tiny_task, "resize_crop_flip")) != first

    lines = (tiny_task / "val200.txt").read_text().splitlines()
    path, label = lines[0].split()
    (tiny_task / "val200.txt").write_text("\n".join([f"{path} {(int(label) + 1) % 4}", *lines[1:]]) + "\n")
    relabelled = cache_file(tiny_dataset(tiny_task))
    assert relabelled != first

    image = tiny_task / path
    image.write_bytes(image.read_bytes())  # same bytes, new modification time: rebuilt to be safe
    os.utime(image, ns=(stamp + 10**9, stamp + 10**9))
    assert cache_file(tiny_dataset(tiny_task)) != relabelled


def test_random_augmentation_keeps_the_dataloader_path(tiny_task, tmp_path):
    loader = build_loader(
        tiny_dataset(tiny_task, "resize_crop_flip"),
        "train",
        PREPROCESSING,
        train=True,
        batch_size=4,
        num_workers=0,
        cache_dir=tmp_path / "cache",
    )
    assert isinstance(loader, DataLoader)


def test_bench_measures_ratios_side_by_side(tiny_task):
    from san.bench import run_bench, to_markdown

    results = run_bench(
        ["test_vit"],
        ["ssf", "vpt_shallow"],
        batch_size=8,
        steps=1,
        warmup=0,
        input_size=None,
        task_dir=tiny_task,
        workers=0,
    )
    ssf, vpt = results["rows"]
    assert ssf["train_images_per_s"] > 0 and ssf["reference_pipeline_images_per_s"] > 0
    assert ssf["speedup_vs_reference"] == ssf["train_images_per_s"] / ssf["reference_pipeline_images_per_s"]
    assert ssf["merged_vs_plain"] > 0 and vpt["inference_merged"] is None  # VPT cannot merge
    assert results["data_path"]["cached_tensor"] > 0
    assert "| test_vit | ssf |" in to_markdown(results)
