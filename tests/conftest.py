"""Shared fixtures: a tiny dataset in the VTAB-1K folder format and config composition."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before timm / huggingface_hub are imported
os.environ.setdefault("WANDB_MODE", "disabled")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from san.config import compose_config

TINY_CLASSES = 4
TINY_SIZES = {"train800": 32, "val200": 8, "test": 16}


def write_tiny_vtab_task(root: Path, name: str = "tiny", seed: int = 0) -> Path:
    """A task whose label is readable from the image (mean brightness band), so training learns."""
    rng = np.random.default_rng(seed)
    task = root / name
    lines = {}
    for split, count in TINY_SIZES.items():
        (task / "images" / split).mkdir(parents=True)
        lines[split] = []
        for index in range(count):
            label = index % TINY_CLASSES
            base = 40 + 50 * label
            pixels = np.clip(base + rng.integers(-20, 20, size=(16, 16, 3)), 0, 255).astype(np.uint8)
            relative = f"images/{split}/{index:06d}.png"
            Image.fromarray(pixels).save(task / relative)
            lines[split].append(f"{relative} {label}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, split_lines in lines.items():
        (task / f"{split}.txt").write_text("\n".join(split_lines) + "\n")
    return task


def tiny_dataset(task: Path, transform: str = "resize", num_classes: int = TINY_CLASSES, **extra) -> dict:
    """The dataset config that reads a `write_tiny_vtab_task` folder directly (no composition)."""
    return {
        "name": "tiny",
        "format": "vtab_folder",
        "root": str(task.parent),
        "folder": task.name,
        "num_classes": num_classes,
        "transform": transform,
        "splits": {"train": "train800", "val": "val200", "trainval": "train800val200", "test": "test"},
        **extra,
    }


@pytest.fixture
def tiny_task(tmp_path: Path) -> Path:
    return write_tiny_vtab_task(tmp_path / "vtab-1k")


def tiny_overrides(tmp_path: Path, task: Path, *extra: str) -> list[str]:
    return [
        "backbone=test_vit",
        "method=linear",
        "dataset=demo_digits",
        f"paths.root_dir={tmp_path}",
        f"dataset.root={task.parent}",
        f"dataset.folder={task.name}",
        f"dataset.num_classes={TINY_CLASSES}",
        "dataset.verify=false",  # a tiny task, not VTAB-1K-sized
        "trainer.epochs=2",
        "trainer.batch_size=8",
        "trainer.eval_batch_size=16",
        "trainer.num_workers=0",
        "trainer.progress=false",
        "optim.warmup_epochs=1",
        "optim.lr=0.01",
        *extra,
    ]


@pytest.fixture
def compose():
    return compose_config
