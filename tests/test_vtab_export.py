"""The tfds exporter on tfds's mock data (no network, no TensorFlow), and image conversion.

tfds is an optional extra; CI installs it (it is in requirements.lock), so these run there.
Mock data ignores split slicing and sizes, which test_vtab_spec.py covers instead.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from san.data.vtab_export import export_task, to_rgb
from san.data.vtab_folder import verify_task_folder
from san.data.vtab_spec import TASKS
from san.records import read_record
from san.run import run

tfds = pytest.importorskip("tensorflow_datasets")


def test_to_rgb_tiles_grey_and_scales_binary():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    image = np.asarray(to_rgb(grey, TASKS["smallnorb_azi"]))
    assert image.shape == (3, 4, 3) and (image[..., 0] == image[..., 2]).all() and image[0, 1, 1] == 1
    mask = np.array([[0, 1], [1, 0]], dtype=np.uint8)[..., None]
    assert np.asarray(to_rgb(mask, TASKS["dsprites_loc"]))[0, 1].tolist() == [255, 255, 255]


@pytest.mark.parametrize("task, sizes", [("dsprites_loc", {"train": 737280}),
                                         ("kitti", {"train": 6347, "validation": 423, "test": 711}),
                                         ("dtd", {"train": 1880, "validation": 1880, "test": 1880})])
def test_mock_export_writes_a_readable_folder(tmp_path, task, sizes):
    with tfds.testing.mock_data(num_examples=6):
        folder = export_task(task, tmp_path / "vtab-1k", sizes=sizes, progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"]["tfds_builder"] == TASKS[task].builder
    assert manifest["source"]["slices"]["train800"] == "train[0:800]"
    assert manifest["counts"]["train800"] == 6  # mock data ignores the slice; the real export has 800
    image = Image.open(folder / "images/train800/000000.png")
    assert image.mode == "RGB" and image.format == "PNG"
    report = verify_task_folder(folder, TASKS[task].num_classes, decode=True)
    # only the counts differ from VTAB-1K's (mock sizes); labels, images and the manifest check out
    assert report.problems and all("VTAB-1K has" in problem for problem in report.problems)


def test_mock_export_trains_one_step(tmp_path, compose):
    with tfds.testing.mock_data(num_examples=8):
        folder = export_task("dsprites_loc", tmp_path / "vtab-1k", sizes={"train": 737280}, progress=False)
    cfg = compose(["backbone=test_vit", "method=ssf", "dataset=dsprites_loc", f"paths.root_dir={tmp_path}",
                   f"dataset.root={folder.parent}", "debug=fdr", "trainer.num_workers=0", "trainer.progress=false",
                   "dataset.verify=false"])  # mock data has mock counts
    assert read_record(run(cfg))["status"] == "complete"
