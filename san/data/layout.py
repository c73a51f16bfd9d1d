"""What kind of VTAB-1K folder this is, read from its split lists alone (no image is opened).

Two layouts are common: this suite's export, where train800val200.txt lists the files of
train800 and val200 again, and NOAH's exporter (the JPEG release SSF, NOAH and V-PETL train
on), which writes train800val200 as its own copies, `images/train800val200/000000.jpg ...`.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Mapping, Sequence

LIST_NAMES = ("train800", "val200", "train800val200", "test")
JPEG_SUFFIXES = {".jpg", ".jpeg"}


def relative_paths(list_text: str) -> list[str]:
    """The image column of a split list's text (lines `<relative path> <label>`)."""
    return [line.rsplit(maxsplit=1)[0] for line in list_text.splitlines() if len(line.split()) >= 2]


def _noah_names(split: str, paths: Sequence[str]) -> bool:
    """NOAH's exporter names the i-th line's image `images/<split>/<i:06d>.jpg`."""
    return all(
        PurePosixPath(path).parent == PurePosixPath("images", split) and PurePosixPath(path).stem == f"{i:06d}"
        for i, path in enumerate(paths)
    )


def detect_layout(paths: Mapping[str, Sequence[str]]) -> str:
    """`<jpeg|png|mixed>_<noah|suite|other>_layout` from each split's relative image paths.

    noah: every split, train800val200 included, has its own `images/<split>/NNNNNN.<ext>` files;
    suite: train800val200 lists exactly the files of train800 and val200; other: anything else.
    """
    suffixes = {PurePosixPath(path).suffix.lower() for split_paths in paths.values() for path in split_paths}
    kind = "jpeg" if suffixes and suffixes <= JPEG_SUFFIXES else "png" if suffixes == {".png"} else "mixed"
    joined = list(paths.get("train800val200", []))
    parts = list(paths.get("train800", [])) + list(paths.get("val200", []))
    if joined and sorted(joined) == sorted(parts):
        return f"{kind}_suite_layout"
    if all(_noah_names(split, split_paths) for split, split_paths in paths.items()):
        return f"{kind}_noah_layout"
    return f"{kind}_other_layout"
