"""Readers reject bad input with errors that name the file, line and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLASSES, TINY_SIZES, tiny_dataset, write_tiny_vtab_task

from san.data.demo_suite import TASKS, write_demo_suite
from san.data.images import CorruptImageError
from san.data.splits import ClassCountMismatchError, DatasetError, LabelRangeError, MissingDatasetError, read_split
from san.data.transforms import ImageListDataset, build_transform


def vtab_cfg(task: Path, num_classes: int = TINY_CLASSES) -> dict:
    return tiny_dataset(task, num_classes=num_classes, prepare_command="san-prepare demo --out somewhere")


def test_reads_all_roles(tiny_task):
    cfg = vtab_cfg(tiny_task)
    sizes = {role: len(read_split(cfg, role)) for role in ("train", "val", "trainval", "test")}
    train, val, test = TINY_SIZES["train800"], TINY_SIZES["val200"], TINY_SIZES["test"]
    assert sizes == {"train": train, "val": val, "trainval": train + val, "test": test}


def test_missing_folder_names_path_and_command(tmp_path):
    cfg = vtab_cfg(tmp_path / "nowhere" / "task")
    with pytest.raises(MissingDatasetError) as error:
        read_split(cfg, "train")
    assert str(tmp_path / "nowhere" / "task") in str(error.value)
    assert "san-prepare demo --out somewhere" in str(error.value)


def test_missing_image_names_file_and_line(tiny_task):
    (tiny_task / "images" / "train800" / "000003.png").unlink()
    with pytest.raises(DatasetError, match=r"train800\.txt:4: image .*000003\.png.* does not exist"):
        read_split(vtab_cfg(tiny_task), "train")


def test_malformed_line_names_file_and_line(tiny_task):
    list_file = tiny_task / "val200.txt"
    lines = list_file.read_text().splitlines()
    lines[1] = "images/val200/000001.png cat"
    list_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"val200\.txt:2: expected"):
        read_split(vtab_cfg(tiny_task), "val")


def test_label_outside_range(tiny_task):
    with pytest.raises(LabelRangeError, match=r"label 3 at .*train800\.txt:4 is outside 0\.\.2"):
        read_split(vtab_cfg(tiny_task, num_classes=3), "train")


def test_manifest_class_count_disagreement(tiny_task):
    (tiny_task / "manifest.json").write_text(json.dumps({"num_classes": 5}))
    with pytest.raises(ClassCountMismatchError, match="declares 5 classes"):
        read_split(vtab_cfg(tiny_task), "train")


def test_corrupt_image_names_file(tiny_task):
    bad = tiny_task / "images" / "test" / "000002.png"
    bad.write_bytes(bad.read_bytes()[:40])
    examples = read_split(vtab_cfg(tiny_task), "test")
    dataset = ImageListDataset(examples, build_transform("resize", 32, "bicubic", train=False))
    with pytest.raises(CorruptImageError, match=r"test\.txt:3: cannot decode image .*000002\.png"):
        dataset[2]


def test_reader_accepts_jpeg_and_png(tmp_path):
    task = write_tiny_vtab_task(tmp_path / "vtab-1k")
    from PIL import Image

    source = task / "images" / "test" / "000000.png"
    Image.open(source).save(task / "images" / "test" / "000000.jpg", quality=95)
    lines = (task / "test.txt").read_text().replace("000000.png", "000000.jpg")
    (task / "test.txt").write_text(lines)
    dataset = ImageListDataset(read_split(vtab_cfg(task), "test"), build_transform("resize", 24, "bicubic", False))
    image, label = dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 24) and label == 0


def fgvc_cfg(root: Path, num_classes: int) -> dict:
    return {
        "name": "birds",
        "format": "fgvc_json",
        "root": str(root),
        "folder": "birds",
        "image_root": "images",
        "num_classes": num_classes,
        "split_files": ["train", "val", "test"],
        "splits": {"train": "train", "val": "val", "trainval": ["train", "val"], "test": "test"},
    }


def write_fgvc(root: Path) -> None:
    from PIL import Image

    folder = root / "birds"
    (folder / "images" / "a").mkdir(parents=True)
    splits = {"train": {"a/1.jpg": 5, "a/2.jpg": 9}, "val": {"a/3.jpg": 5}, "test": {"a/4.jpg": 12}}
    for table in splits.values():
        for relative in table:
            Image.new("RGB", (20, 20), (10, 20, 30)).save(folder / "images" / relative)
    for name, table in splits.items():
        (folder / f"{name}.json").write_text(json.dumps(table))


def test_fgvc_json_reindexes_classes(tmp_path):
    write_fgvc(tmp_path)
    cfg = fgvc_cfg(tmp_path, 3)
    assert [e.label for e in read_split(cfg, "train")] == [0, 1]
    assert [e.label for e in read_split(cfg, "test")] == [2]
    assert len(read_split(cfg, "trainval")) == 3


def test_fgvc_class_count_disagreement(tmp_path):
    write_fgvc(tmp_path)
    with pytest.raises(ClassCountMismatchError, match="3 distinct classes"):
        read_split(fgvc_cfg(tmp_path, 200), "train")


def test_demo_suite_is_deterministic_and_readable(tmp_path):
    first = write_demo_suite(tmp_path / "a", ["shape_ori"])[0]
    second = write_demo_suite(tmp_path / "b", ["shape_ori"])[0]
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest == json.loads((second / "manifest.json").read_text())
    assert manifest["counts"] == {"train800": 800, "val200": 200, "test": 500, "train800val200": 1000}
    histograms = manifest["class_histogram"]  # per split
    assert sum(map(sum, histograms.values())) == 1500 and min(map(min, histograms.values())) > 0
    cfg = vtab_cfg(first, num_classes=TASKS["shape_ori"][1])
    assert len(read_split(cfg, "trainval")) == 1000


def test_demo_suite_rejects_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="accepted: .*digits"):
        write_demo_suite(tmp_path, ["nope"])
