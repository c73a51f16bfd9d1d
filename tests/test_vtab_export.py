"""The tfds exporter on real tfds files: version resolution, ArrayRecord and TFRecord, slicing, PNG and JPEG.

The data comes from a tiny tfds builder the tests prepare themselves (tests/tfds_tiny.py):
ArrayRecord is generated here without TensorFlow; TFRecord needs TensorFlow to write, so the
no-TensorFlow path reads a committed fixture that TensorFlow wrote, and the TensorFlow path
(`as_dataset`) runs only where TensorFlow is installed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

import tfds_tiny  # noqa: E402  (registers the tiny builder with tfds)

from san.data.manifest import data_fingerprint  # noqa: E402
from san.data.vtab_export import TfdsDataError, export_task, export_vtab, has_tensorflow, resolve_source, to_rgb  # noqa: E402
from san.data.vtab_folder import verify_task_folder  # noqa: E402
from san.data.vtab_spec import TASKS, TfdsVersionError, choose_version  # noqa: E402
from san.records import read_record  # noqa: E402
from san.run import run  # noqa: E402

TINY_COUNTS = {"train800": 800, "val200": 200, "train800val200": 1000, "test": 400}
# What tensorflow-datasets 4.9.10 (requirements.lock) resolves on an empty data dir: VPT's version
# where 4.9.10 builds it, else the version it builds (caltech101, oxford_iiit_pet, svhn, kitti).
RESOLVED_4_9_10 = {
    "caltech101": "3.0.2",
    "cifar": "3.0.2",
    "dtd": "3.0.1",
    "oxford_flowers102": "2.1.1",
    "oxford_iiit_pet": "4.0.0",
    "svhn": "3.1.0",
    "sun397": "4.0.0",
    "patch_camelyon": "2.0.0",
    "eurosat": "2.0.0",
    "resisc45": "3.0.0",
    "diabetic_retinopathy": "3.0.0",
    "clevr_count": "3.1.0",
    "clevr_dist": "3.1.0",
    "dmlab": "2.0.1",
    "kitti": "3.3.0",
    "dsprites_loc": "2.0.0",
    "dsprites_ori": "2.0.0",
    "smallnorb_azi": "2.0.0",
    "smallnorb_ele": "2.0.0",
}


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory) -> Path:
    """tiny_vtab/vtab prepared as ArrayRecord (what `tfds build --file_format array_record` writes)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    tfds_tiny.prepare(str(data_dir))
    return data_dir


def test_to_rgb_tiles_grey_and_scales_binary():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    image = np.asarray(to_rgb(grey, TASKS["smallnorb_azi"]))
    assert image.shape == (3, 4, 3) and (image[..., 0] == image[..., 2]).all() and image[0, 1, 1] == 1
    mask = np.array([[0, 1], [1, 0]], dtype=np.uint8)[..., None]
    assert np.asarray(to_rgb(mask, TASKS["dsprites_loc"]))[0, 1].tolist() == [255, 255, 255]


def test_all_19_builders_resolve_with_the_pinned_tfds(tmp_path):
    assert tfds.__version__ == "4.9.10", "requirements.lock pins tensorflow-datasets 4.9.10; update RESOLVED_4_9_10"
    resolved = {}
    for task, spec in TASKS.items():
        source = resolve_source(spec, str(tmp_path))
        builder = tfds.builder(f"{spec.tfds_name}:{source.version}", data_dir=str(tmp_path))
        assert str(builder.version) == source.version and not builder.is_prepared()
        resolved[task] = source.version
        if source.version == spec.vpt_version:
            assert source.reason == "VPT's version"
        else:
            assert f"VPT used {spec.vpt_version}" in source.reason
    assert resolved == RESOLVED_4_9_10
    assert "outside the reference code's 3.*.*" in resolve_source(TASKS["oxford_iiit_pet"], str(tmp_path)).reason


def test_an_unprepared_task_names_the_commands_that_prepare_it(tmp_path):
    with pytest.raises(TfdsDataError) as error:
        export_vtab(tmp_path / "out", ["svhn", "resisc45"], str(tmp_path))
    message = str(error.value)
    assert "2 task(s) not exported" in message
    assert f"tfds build svhn_cropped:3.1.0 --data_dir {tmp_path} --file_format array_record" in message
    assert "NWPU-RESISC45.rar" in message and f"{tmp_path}/downloads/manual/" in message
    assert "pip install tensorflow-cpu apache-beam mlcroissant" in message
    assert not (tmp_path / "out" / "svhn").exists()


def test_version_choice_rules():
    spec = TASKS["caltech101"]  # reference 3.*.*, VPT 3.0.1
    assert choose_version(spec, ["3.0.2"], ["3.0.1"]).version == "3.0.1"  # VPT's, prepared by an older tfds
    assert choose_version(spec, ["3.0.2"], ["3.0.0"]).version == "3.0.0"  # what is on disk, in the pattern
    choice = choose_version(spec, ["3.0.2"], [])
    assert choice.version == "3.0.2" and "VPT used 3.0.1" in choice.reason and "outside" not in choice.reason
    assert choose_version(spec, ["3.0.2"], [], requested="3.0.2").version == "3.0.2"
    with pytest.raises(TfdsVersionError, match=r"caltech101:3\.0\.0 .* available: 3\.0\.1, 3\.0\.2"):
        choose_version(spec, ["3.0.2"], ["3.0.1"], requested="3.0.0")


def _lines(folder: Path, split: str) -> list[str]:
    return (folder / f"{split}.txt").read_text().splitlines()


def test_arrayrecord_export_slices_like_tfds(tiny_tfds, tmp_path):
    folder = export_task(tfds_tiny.SPEC, tmp_path / "vtab-1k", str(tiny_tfds), progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    source = manifest["source"]
    assert source["tfds_builder"] == "tiny_vtab/vtab:1.0.0" and source["tfds_version_reason"] == "VPT's version"
    # eurosat's slices on a 2,000-image train split: val200 at 60%, test from 80%
    assert source["slices"] == {"train800": "train[0:800]", "val200": "train[1200:1400]", "test": "train[1600:2000]"}
    assert manifest["counts"] == TINY_COUNTS and manifest["data_variant"] == "png_lossless"
    # the same examples, in the same order, as indexing the whole split through tfds itself
    whole = tfds.builder("tiny_vtab/vtab:1.0.0", data_dir=str(tiny_tfds)).as_data_source(split="train")
    expected = [whole[i] for i in range(1200, 1400)]
    assert manifest["source_ids"]["val200"] == [e["file_name"].decode() for e in expected]
    assert [int(line.split()[1]) for line in _lines(folder, "val200")] == [int(e["label"]) for e in expected]
    assert np.array_equal(np.asarray(Image.open(folder / "images/val200/000007.png")), expected[7]["image"])
    assert _lines(folder, "train800val200") == _lines(folder, "train800") + _lines(folder, "val200")
    assert verify_task_folder(folder, 3, decode=True, expected_counts=TINY_COUNTS).ok
    assert data_fingerprint(folder)["tfds_builder"] == "tiny_vtab/vtab:1.0.0"


def test_jpeg_export_is_noahs_layout(tiny_tfds, tmp_path):
    folder = export_task(tfds_tiny.SPEC, tmp_path / "vtab-1k", str(tiny_tfds), image_format="jpeg", progress=False)
    assert _lines(folder, "train800")[3] == f"images/train800/000003.jpg {_lines(folder, 'train800')[3].split()[1]}"
    assert _lines(folder, "train800val200")[800].startswith("images/train800val200/000800.jpg ")
    copy, original = folder / "images/train800val200/000805.jpg", folder / "images/val200/000005.jpg"
    assert copy.read_bytes() == original.read_bytes()  # its own file, encoded from the same pixels
    # PIL's default quality, as NOAH's `Image.fromarray(image).save(path)`: the same quantisation tables
    default = io.BytesIO()
    Image.open(original).convert("RGB").save(default, format="JPEG")
    assert Image.open(original).quantization == Image.open(default).quantization
    report = verify_task_folder(folder, 3, expected_counts=TINY_COUNTS)
    assert report.ok, report.problems
    assert report.variant == "jpeg_noah" and data_fingerprint(folder)["variant"] == "jpeg_noah"


def test_requested_version_that_does_not_exist_lists_the_available_ones(tiny_tfds, tmp_path):
    with pytest.raises(TfdsVersionError, match=r"tiny_vtab/vtab:0\.9\.0 .* available: 1\.0\.0"):
        export_task(tfds_tiny.SPEC, tmp_path, str(tiny_tfds), version="0.9.0", progress=False)


@pytest.mark.skipif(has_tensorflow(), reason="checks the message shown where TensorFlow is missing")
def test_tfrecord_without_tensorflow_gives_the_conversion_command(tmp_path):
    data_dir = tmp_path / "tfds"
    shutil.copytree(Path(__file__).parent / "golden" / "tfds_tfrecord", data_dir)  # written by TensorFlow
    spec = dataclasses.replace(tfds_tiny.SPEC, tfds_name="tiny_vtab/small")
    with pytest.raises(TfdsDataError) as error:
        export_task(spec, tmp_path / "out", str(data_dir), progress=False)
    message = str(error.value)
    assert "is TFRecord" in message
    assert (
        f"tfds convert_format --dataset_version_dir {data_dir}/tiny_vtab/small/1.0.0 --out_file_format array_record"
    ) in message
    assert not (tmp_path / "out").exists()


def test_tfrecord_with_tensorflow_reads_like_arrayrecord(tiny_tfds, tmp_path):
    pytest.importorskip("tensorflow")
    tfrecord_dir = tmp_path / "tfds"
    tfds_tiny.prepare(str(tfrecord_dir), file_format="tfrecord")
    from_tfrecord = export_task(tfds_tiny.SPEC, tmp_path / "a", str(tfrecord_dir), progress=False)
    from_arrayrecord = export_task(tfds_tiny.SPEC, tmp_path / "b", str(tiny_tfds), progress=False)
    for split in ("train800", "val200", "test"):
        assert _lines(from_tfrecord, split) == _lines(from_arrayrecord, split)
    assert (from_tfrecord / "images/test/000123.png").read_bytes() == (
        from_arrayrecord / "images/test/000123.png"
    ).read_bytes()


@pytest.mark.slow
def test_an_export_trains_one_step(tiny_tfds, tmp_path, compose):
    folder = export_task(tfds_tiny.SPEC, tmp_path / "vtab-1k", str(tiny_tfds), progress=False)
    counts = ", ".join(f"{split}: {count}" for split, count in TINY_COUNTS.items())
    cfg = compose(
        [
            "backbone=test_vit",
            "method=ssf",
            "dataset=eurosat",
            f"paths.root_dir={tmp_path}",
            f"dataset.root={folder.parent}",
            f"dataset.folder={folder.name}",
            "dataset.num_classes=3",
            f"+dataset.expected_counts={{{counts}}}",
            "debug=fdr",
            "trainer.num_workers=0",
            "trainer.progress=false",
        ]
    )
    record = read_record(run(cfg))
    assert record["status"] == "complete" and record["dataset_check"]["checked"]
