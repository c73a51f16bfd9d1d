"""What both folder verifiers check against a `manifest.json` written by an exporter or builder."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Mapping


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_problems(manifest: Mapping, manifest_path: Path, sizes: Mapping[str, int], split_file: Callable[[str], Path],
                      hashes_key: str, num_classes: int, unit: str) -> list[str]:
    """Split sizes, split-file hashes (under `hashes_key`) and the class count, each against the manifest."""
    problems = []
    for split, count in manifest.get("counts", {}).items():
        if split in sizes and sizes[split] != count:
            problems.append(f"{split_file(split)}: {sizes[split]:,} {unit}, manifest says {count:,}")
    for split, digest in manifest.get(hashes_key, {}).items():
        path = split_file(split)
        if path.is_file() and sha256_file(path) != digest:
            problems.append(f"{path}: sha256 differs from {manifest_path}")
    if manifest.get("num_classes") not in (None, num_classes):
        problems.append(f"{manifest_path}: num_classes {manifest['num_classes']}, expected {num_classes}")
    return problems
