"""Decoding an image file, and naming the file when it cannot be decoded. PIL only: the
folder checks (`san-prepare verify`) use it without loading torch."""

from __future__ import annotations

from PIL import Image, UnidentifiedImageError

from san.data.splits import DatasetError, Example


class CorruptImageError(DatasetError):
    pass


def load_rgb(example: Example) -> Image.Image:
    try:
        with Image.open(example.path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise CorruptImageError(f"{example.source}: cannot decode image {str(example.path)!r} ({error})") from error
