"""Resizing and cropping: every split yields uint8 CHW tensors; normalisation happens on
the device, with the backbone's own mean/std, so only bytes cross to it."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

from san.data.images import load_rgb
from san.data.splits import Example


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        accepted = [mode.value for mode in InterpolationMode]
        raise ValueError(f"unknown interpolation {name!r}; accepted: {accepted}") from None


def _to_uint8() -> list:
    return [v2.PILToTensor()]


def resize_transform(size: int, interpolation: str, train: bool) -> Callable:
    """VTAB-1K: a direct resize to size x size, no augmentation (as the VTAB protocol)."""
    return v2.Compose(
        [v2.Resize((size, size), interpolation=_interpolation(interpolation), antialias=True), *_to_uint8()]
    )


def resize_crop_flip_transform(size: int, interpolation: str, train: bool) -> Callable:
    """FGVC: resize to 256/224 of the size, then a random crop and flip (train) or a centre crop."""
    resize = v2.Resize(round(size * 256 / 224), interpolation=_interpolation(interpolation), antialias=True)
    if train:
        return v2.Compose([resize, v2.RandomCrop(size), v2.RandomHorizontalFlip(), *_to_uint8()])
    return v2.Compose([resize, v2.CenterCrop(size), *_to_uint8()])


TRANSFORMS: dict[str, Callable[[int, str, bool], Callable]] = {
    "resize": resize_transform,
    "resize_crop_flip": resize_crop_flip_transform,
}


def is_deterministic(name: str, train: bool) -> bool:
    """Whether a transform gives the same pixels every time (so its output can be cached)."""
    return name == "resize" or not train


def build_transform(name: str, size: int, interpolation: str, train: bool) -> Callable:
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; accepted: {sorted(TRANSFORMS)}")
    return TRANSFORMS[name](size, interpolation, train)


class ImageListDataset(Dataset):
    def __init__(self, examples: Sequence[Example], transform: Callable):
        self.examples = list(examples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        example = self.examples[index]
        return self.transform(load_rgb(example)), example.label
