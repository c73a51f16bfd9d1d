"""VTAB-1K folders as users hold them: NOAH's release (JPEG, train800val200 as its own copies) and this
suite's export (PNG, train800val200 listing the same files), good and damaged, through `san-train`
(`san.run.run`) and `san-prepare verify`.

NOAH's exporter (ZhangYuanhan-AI/NOAH, data/vtab-source/get_vtab1k.py) writes, per split in the
order train800, val200, test, train800val200: `images/<split>/<i:06d>.jpg` saved with
`Image.fromarray(image).save(path)` (PIL's default JPEG quality) and a list line
`images/<split>/<i:06d>.jpg <label>`; `write_noah_task` does the same.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CLASSES, tiny_overrides
from PIL import Image

from san.cli.prepare import main as prepare
from san.data.checks import FOLDER_CHECKS
from san.data.manifest import data_fingerprint
from san.data.vtab_folder import verify_task_folder, write_task_folder
from san.data.vtab_spec import TASKS
from san.records import read_record
from san.run import DatasetVerificationError, run

SIZES = {"train800": 16, "val200": 8, "test": 8}
COUNTS = {**SIZES, "train800val200": 24}


def _image(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A smooth random pattern whose brightness says the label (so a run can learn it)."""
    pattern = Image.fromarray(rng.integers(0, 60, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    return np.clip(np.asarray(pattern, dtype=np.int16) + 30 + 45 * label, 0, 255).astype(np.uint8)


def write_noah_task(
    root: Path,
    name: str,
    num_classes: int = TINY_CLASSES,
    sizes: dict = SIZES,
    seed: int = 0,
    suffix: str = ".jpg",
    copy_quality: int | None = None,
) -> Path:
    """A task folder exactly as NOAH's exporter writes it; `copy_quality` re-encodes train800val200 differently."""
    rng = np.random.default_rng(seed)
    pixels = {
        split: [(_image(i % num_classes, rng, 8 if count > 100 else 32), i % num_classes) for i in range(count)]
        for split, count in sizes.items()
    }
    pixels["train800val200"] = pixels["train800"] + pixels["val200"]
    task = root / name
    for split in ("train800", "val200", "test", "train800val200"):
        (task / "images" / split).mkdir(parents=True)
        with open(task / f"{split}.txt", "w") as lines:
            for i, (image, label) in enumerate(pixels[split]):
                image_path = f"images/{split}/{i:06d}{suffix}"
                lines.write(f"{image_path} {label}\n")
                if split == "train800val200" and copy_quality is not None:
                    Image.fromarray(image).save(task / image_path, quality=copy_quality)
                else:
                    Image.fromarray(image).save(task / image_path)
    return task


def write_suite_task(root: Path, name: str, variant: str = "png_lossless", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    splits = {
        split: [(Image.fromarray(_image(i % TINY_CLASSES, rng)), i % TINY_CLASSES) for i in range(count)]
        for split, count in SIZES.items()
    }
    return write_task_folder(root, name, splits, TINY_CLASSES, variant=variant)


def _counts_override() -> str:
    return "+dataset.expected_counts={" + ", ".join(f"{k}: {v}" for k, v in COUNTS.items()) + "}"


def _train(tmp_path: Path, task: Path, compose, *extra: str) -> dict:
    cfg = compose(tiny_overrides(tmp_path, task, "dataset.verify=true", _counts_override(), "debug=fdr", *extra))
    return read_record(run(cfg))


def _refused(tmp_path: Path, task: Path, compose) -> str:
    with pytest.raises(DatasetVerificationError) as error:
        _train(tmp_path, task, compose, "overwrite=true")
    return str(error.value)


def test_noah_and_suite_layouts_train(tmp_path, compose):
    noah = write_noah_task(tmp_path / "noah", "tiny")
    record = _train(tmp_path, noah, compose)
    assert record["status"] == "complete" and record["splits"]["fit_images"] == 16
    assert any("lossy JPEG" in note for note in record["dataset_check"]["notes"])
    suite = write_suite_task(tmp_path / "suite", "tiny")
    assert _train(tmp_path, suite, compose, "protocol=final")["splits"]["fit_images"] == 24  # train800val200


def _edit_line(path: Path, number: int, new_label: int) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = f"{lines[number - 1].rsplit(maxsplit=1)[0]} {new_label}"
    path.write_text("\n".join(lines) + "\n")


def _damage_missing_image(task: Path) -> str:
    (task / "images/train800/000003.jpg").unlink()
    return r"train800\.txt:4: image .*000003\.jpg' does not exist"


def _damage_truncated_jpeg(task: Path) -> str:
    image = task / "images/test/000002.jpg"
    image.write_bytes(image.read_bytes()[:-200])
    return r"test\.txt:3: image .*000002\.jpg': truncated JPEG"


def _damage_label_out_of_range(task: Path) -> str:
    _edit_line(task / "val200.txt", 2, 9)
    return r"val200\.txt:2: label 9 outside 0\.\.3"


def _damage_short_split(task: Path) -> str:
    lines = (task / "train800.txt").read_text().splitlines()
    (task / "train800.txt").write_text("\n".join(lines[:-1]) + "\n")
    return r"train800\.txt: 15 lines, expected 16"


def _damage_trainval_labels(task: Path) -> str:
    _edit_line(task / "train800val200.txt", 6, 3)  # was 1 (5 % 4): the multiset of labels changes
    return r"train800val200\.txt: its labels are not those of train800 \+ val200 .*first difference .*:6\)"


@pytest.mark.parametrize(
    "damage",
    [
        _damage_missing_image,
        _damage_truncated_jpeg,
        _damage_label_out_of_range,
        _damage_short_split,
        _damage_trainval_labels,
    ],
)
def test_a_damaged_noah_folder_is_refused_naming_file_and_line(tmp_path, compose, damage):
    task = write_noah_task(tmp_path / "noah", "tiny")
    expected = damage(task)
    message = _refused(tmp_path, task, compose)
    assert re.search(expected, message), message


def test_a_wrong_class_count_is_refused(tmp_path, compose):
    task = write_suite_task(tmp_path / "suite", "tiny")
    manifest = (task / "manifest.json").read_text().replace('"num_classes": 4', '"num_classes": 5')
    (task / "manifest.json").write_text(manifest)
    assert "manifest.json: num_classes 5, expected 4" in _refused(tmp_path, task, compose)


def test_train800val200_is_checked_by_content_not_by_path(tmp_path, capsys):
    noah = write_noah_task(tmp_path / "vtab-1k", "tiny", copy_quality=95)  # copies re-encoded: other bytes
    assert (noah / "images/train800val200/000000.jpg").read_bytes() != (
        noah / "images/train800/000000.jpg"
    ).read_bytes()
    report = verify_task_folder(noah, TINY_CLASSES, decode=True, expected_counts=COUNTS)
    assert report.ok, report.problems  # same pixels within the JPEG tolerance
    assert report.variant == "external:jpeg_noah_layout"
    # a copy replaced by another image with the same label (test's 5th image: label 1, as line 6's)
    shutil.copy(noah / "images/test/000005.jpg", noah / "images/train800val200/000005.jpg")
    assert verify_task_folder(noah, TINY_CLASSES, expected_counts=COUNTS).ok  # labels alone cannot tell
    problems = verify_task_folder(noah, TINY_CLASSES, decode=True, expected_counts=COUNTS).problems
    assert problems == [
        f"{noah}/train800val200.txt:6: image '{noah}/images/train800val200/000005.jpg' is none of "
        "the train800/val200 images with label 1 (train800val200 must be train800 + val200)"
    ]


def test_a_manifest_makes_runs_check_train800val200_by_content(tmp_path, compose):
    task = write_suite_task(tmp_path / "suite", "tiny", variant="jpeg_noah")
    assert _train(tmp_path, task, compose)["status"] == "complete"
    shutil.copy(task / "images/test/000001.jpg", task / "images/train800val200/000017.jpg")  # label 1 both
    assert "train800val200.txt:18: image" in _refused(tmp_path, task, compose)


def test_interleaved_train800val200_is_accepted(tmp_path):
    """tf.data interleaves the two slices of train800val200 in blocks; the set is what matters."""
    noah = write_noah_task(tmp_path / "vtab-1k", "tiny")
    lines = (noah / "train800val200.txt").read_text().splitlines()
    blocks = lines[:2] + lines[16:18] + lines[2:16] + lines[18:]
    (noah / "train800val200.txt").write_text("\n".join(blocks) + "\n")
    report = verify_task_folder(noah, TINY_CLASSES, decode=True, expected_counts=COUNTS)
    assert report.ok, report.problems
    assert any("another order" in note for note in report.notes)


@pytest.mark.slow
def test_noah_layout_with_all_19_task_names_verifies_and_trains(tmp_path, compose):
    root = tmp_path / "vtab-1k"
    sizes = {"train800": 4, "val200": 2, "test": 2}
    counts = "+dataset.expected_counts={train800: 4, val200: 2, train800val200: 6, test: 2}"
    for task, spec in TASKS.items():
        write_noah_task(root, task, spec.num_classes, sizes, suffix=".png" if task == "dtd" else ".jpg")
        cfg = compose([f"dataset={task}", f"paths.data_dir={tmp_path}", counts])
        report = FOLDER_CHECKS["vtab_folder"](dict(cfg.dataset))
        assert report.ok, (task, report.problems)
        assert report.variant == ("external:png_noah_layout" if task == "dtd" else "external:jpeg_noah_layout")
    cfg = compose(
        [
            "backbone=test_vit",
            "method=linear",
            "dataset=smallnorb_ele",
            f"paths.root_dir={tmp_path}",
            f"paths.data_dir={tmp_path}",
            counts,
            "debug=fdr",
            "trainer.num_workers=0",
            "trainer.progress=false",
        ]
    )
    record = read_record(run(cfg))
    assert record["status"] == "complete" and record["dataset_check"]["ok"]


def test_san_prepare_verify_a_full_size_noah_task(tmp_path, capsys):
    """VTAB-1K's own counts (800/200/1000 and kitti's 711 test images) through the CLI, as a user runs it."""
    sizes = {"train800": 800, "val200": 200, "test": TASKS["kitti"].test_count}
    task = write_noah_task(tmp_path / "vtab-1k", "kitti", TASKS["kitti"].num_classes, sizes)
    prepare(["verify", str(task.parent), "--decode"])
    assert "OK   kitti  [external:jpeg_noah_layout]" in capsys.readouterr().out
    lines = (task / "test.txt").read_text().splitlines()
    (task / "test.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(SystemExit, match="1 dataset folder"):
        prepare(["verify", str(task.parent)])
    assert "test.txt: 710 lines, VTAB-1K has 711" in capsys.readouterr().out


def test_data_fingerprint_is_cheap_and_names_the_variant(tmp_path):
    noah = write_noah_task(tmp_path / "a", "tiny")
    suite = write_suite_task(tmp_path / "b", "tiny")
    fingerprint = data_fingerprint(noah)
    assert fingerprint["variant"] == "external:jpeg_noah_layout" and fingerprint["tfds_builder"] is None
    assert sorted(fingerprint["lists_sha256"]) == ["test", "train800", "train800val200", "val200"]
    assert data_fingerprint(suite)["variant"] == "png_lossless"
    for image in (noah / "images").rglob("*.jpg"):
        image.unlink()  # no image is read
    assert data_fingerprint(noah) == fingerprint
    _edit_line(noah / "test.txt", 1, 2)
    assert data_fingerprint(noah)["lists_sha256"]["test"] != fingerprint["lists_sha256"]["test"]
