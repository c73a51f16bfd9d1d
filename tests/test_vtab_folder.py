"""The VTAB-1K folder writer (lossless, atomic, with a manifest) and `san-prepare verify`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from san.cli.prepare import main as prepare
from san.data.vtab_folder import canonical_task_name, verify_task_folder, write_task_folder

CLASSES = 3


def _examples(count: int, seed: int) -> list[tuple[Image.Image, int]]:
    rng = np.random.default_rng(seed)
    return [(Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)), i % CLASSES) for i in range(count)]


@pytest.fixture
def written(tmp_path: Path) -> Path:
    splits = {"train800": _examples(800, 0), "val200": _examples(200, 1), "test": _examples(30, 2)}
    return write_task_folder(tmp_path / "vtab-1k", "cifar100", splits, CLASSES)


def test_png_round_trip_is_lossless(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    folder = write_task_folder(
        tmp_path, "t", {"train800": [(Image.fromarray(pixels), 1)], "val200": [], "test": []}, CLASSES
    )
    assert np.array_equal(np.asarray(Image.open(folder / "images/train800/000000.png")), pixels)


def test_written_folder_verifies_and_aliases_resolve(written):
    assert canonical_task_name(written.name) == "cifar"
    report = verify_task_folder(written, CLASSES, decode=True)
    assert report.ok, report.problems
    manifest = json.loads((written / "manifest.json").read_text())
    assert manifest["counts"] == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 30}
    assert manifest["class_histogram"]["test"] == [10, 10, 10]
    assert not list(written.parent.glob(".*partial"))


def _problems(folder: Path, decode: bool = False) -> str:
    return "\n".join(verify_task_folder(folder, CLASSES, decode=decode).problems)


def test_verification_names_each_bad_input(written):
    (written / "images/test/000003.png").write_bytes((written / "images/test/000003.png").read_bytes()[:40])
    assert "000003.png" in _problems(written, decode=True)  # truncated image, named

    lines = (written / "test.txt").read_text().splitlines()
    lines[4] = "images/test/999999.png 1"
    lines[5] = lines[5].rsplit(" ", 1)[0] + " 7"
    (written / "test.txt").write_text("\n".join(lines) + "\n")
    problems = _problems(written)
    assert "test.txt:5: image" in problems and "does not exist" in problems  # a line pointing nowhere
    assert "test.txt:6: label 7 outside 0..2" in problems
    assert "test.txt: sha256 differs from" in problems  # manifest mismatch

    train = (written / "train800.txt").read_text().splitlines()
    (written / "train800.txt").write_text("\n".join(train[:-1]) + "\n")
    problems = _problems(written)
    assert "train800.txt: 799 lines, VTAB-1K has 800" in problems
    # train800val200 still lists the 800th train image (label 1); lines align until there
    assert (
        "train800val200.txt: its labels are not those of train800 + val200 (1 more of label(s) [1] in "
        "train800val200; first difference in list order at "
    ) in problems
    assert problems.endswith("train800val200.txt:800)") or "train800val200.txt:800)\n" in problems


def test_jpeg_copies_are_reported_as_lossy(written):
    for line in (written / "val200.txt").read_text().splitlines()[:3]:
        Image.open(written / line.split()[0]).save(written / line.split()[0].replace(".png", ".jpg"))
    text = (written / "val200.txt").read_text().replace("000000.png", "000000.jpg")
    (written / "val200.txt").write_text(text)
    report = verify_task_folder(written, CLASSES)
    assert any("lossy JPEG" in note for note in report.notes)


def test_an_interrupted_export_leaves_nothing_that_verifies(tmp_path):
    def broken():
        yield from _examples(5, 0)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_task_folder(tmp_path, "dtd", {"train800": broken(), "val200": [], "test": []}, CLASSES)
    assert not (tmp_path / "dtd").exists()
    with pytest.raises(SystemExit, match="no dataset folders"):
        prepare(["verify", str(tmp_path)])


def test_san_prepare_verify_cli(tmp_path, capsys):
    # a real task name (through its alias) takes its class count from the VTAB spec: 100 for cifar
    splits = {"train800": _examples(800, 0), "val200": _examples(200, 1), "test": _examples(30, 2)}
    written = write_task_folder(tmp_path / "vtab-1k", "cifar100", splits, 100)
    prepare(["verify", str(written.parent)])
    assert "OK   cifar100 (= cifar)" in capsys.readouterr().out
    (written / "val200.txt").write_text("images/val200/000000.png 1\n")
    with pytest.raises(SystemExit, match="1 dataset folder"):
        prepare(["verify", str(written.parent)])
    assert "val200.txt: 1 lines, VTAB-1K has 200" in capsys.readouterr().out


def test_readers_find_a_copy_under_another_repositorys_name(tmp_path):
    from san.data.splits import read_split

    splits = {"train800": _examples(800, 0), "val200": _examples(200, 1), "test": _examples(4, 2)}
    write_task_folder(tmp_path, "oxford_pet", splits, 37)
    dataset = {
        "name": "oxford_iiit_pet",
        "format": "vtab_folder",
        "root": str(tmp_path),
        "folder": "oxford_iiit_pet",
        "num_classes": 37,
        "splits": {"test": "test"},
    }
    examples = read_split(dataset, "test")
    assert len(examples) == 4 and "oxford_pet" in str(examples[0].path)
