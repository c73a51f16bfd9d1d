"""Time `san-prepare fgvc` on a full-size stand-in for an official FGVC release.

The real archives cannot be downloaded on an offline machine, so this writes a release
with the real dataset's layout, file formats, class count and split sizes, filled with
photo-sized synthetic JPEGs, packs it into the official archive names, and times the
build from the archives (unpack, place, hash, write) and a verification pass. The
archive is about as large as the real one when --image-size matches the real photos.

    python scripts/time_fgvc_build.py --dataset cub --work /tmp/fgvc_timing

Writes results/bench/fgvc_build_<dataset>.json and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from san.data.fgvc_folder import build_fgvc, verify_fgvc_folder
from san.data.fgvc_sources import spec_for
from san.testing import fgvc_releases


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="cub", choices=["cub", "nabirds", "flowers", "dogs", "cars"])
    parser.add_argument("--work", default="/tmp/fgvc_timing", help="scratch folder (deleted at the end)")
    parser.add_argument("--image-size", default="500x375", help="WIDTHxHEIGHT of the synthetic photos")
    parser.add_argument("--out", default="results/bench", help="where the JSON summary goes")
    args = parser.parse_args()

    spec = spec_for(args.dataset)
    size = tuple(int(v) for v in args.image_size.split("x"))
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    counts = spec.official_counts
    started = time.perf_counter()
    extracted = fgvc_releases.write_release(
        spec, work / "release", spec.num_classes, counts["train"], counts["test"], size=size
    )
    archives = fgvc_releases.pack_release(spec.name, extracted, work / "downloads")
    shutil.rmtree(work / "release")
    prepared_s = time.perf_counter() - started
    archive_bytes = _folder_bytes(archives) if archives.is_dir() else archives.stat().st_size

    started = time.perf_counter()
    folder = build_fgvc(spec, archives, work / "fgvc" / spec.name)
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    report = verify_fgvc_folder(folder, spec.num_classes, spec.counts, spec.image_root, progress=True)
    verify_s = time.perf_counter() - started
    started = time.perf_counter()
    decoded = verify_fgvc_folder(folder, spec.num_classes, spec.counts, spec.image_root, decode=True, progress=True)
    decode_s = time.perf_counter() - started

    summary = {
        "dataset": spec.name,
        "images": sum(spec.counts.values()),
        "image_size": list(size),
        "archive_bytes": archive_bytes,
        "build_from_archives_s": round(build_s, 1),
        "verify_s": round(verify_s, 2),
        "verify_decode_s": round(decode_s, 1),
        "verified_ok": report.ok and decoded.ok,
        "problems": report.problems[:5],
        "counts": json.loads((folder / "manifest.json").read_text())["counts"],
        "stand_in_written_s": round(prepared_s, 1),
        "cpu_count": os.cpu_count(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fgvc_build_{spec.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"{spec.name}: {summary['images']:,} images, archive {archive_bytes / 1e9:.2f} GB: build {build_s:.1f} s, "
        f"verify {verify_s:.2f} s, verify --decode {decode_s:.1f} s, ok={summary['verified_ok']}, "
        f"counts {summary['counts']}"
    )


if __name__ == "__main__":
    main()
