"""`san-prepare verify --vpt-splits`: an export against VPT's vtab_trainval_splits.json.

The file lists, per dataset, the tfds file names of the 1,000 training images VPT used; the
exporter keeps the same tfds attribute for train800 and val200 in its manifest (tested on real
tfds files in test_vtab_export.py), so the two can be compared image by image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from san.cli.prepare import main as prepare
from san.data.errors import DatasetError
from san.data.vpt_splits import _tasks_for_key, load_vpt_splits
from san.data.vtab_folder import write_task_folder


def _export_with_ids(root: Path, task: str, num_classes: int) -> list[str]:
    """A task folder as `san-prepare vtab` writes it, with tfds file names; returns train800 + val200's names."""
    pixel = Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8))
    names = {
        "train800": [f"{task}_{i:05d}.jpg" for i in range(800)],
        "val200": [f"{task}_{i:05d}.jpg" for i in range(5000, 5200)],
    }
    splits = {
        split: [(pixel, i % num_classes, name) for i, name in enumerate(split_names)]
        for split, split_names in names.items()
    }
    splits["test"] = [(pixel, i % num_classes) for i in range(4)]
    write_task_folder(root, task, splits, num_classes, {"source": {"tfds_builder": f"{task}:3.0.1"}})
    return names["train800"] + names["val200"]


def test_keys_as_vpt_and_tfds_name_them():
    assert _tasks_for_key("vtab-caltech101") == ["caltech101"]
    assert _tasks_for_key("cifar(num_classes=100)") == ["cifar"]
    assert _tasks_for_key('vtab-clevr(task="count_all")') == ["clevr_count"]
    assert _tasks_for_key('clevr(task="closest_object_distance")') == ["clevr_dist"]
    assert _tasks_for_key("diabetic_retinopathy_detection/btgraham-300") == ["diabetic_retinopathy"]
    assert _tasks_for_key("oxford_iiit_pet:3.2.0") == ["oxford_iiit_pet"]
    assert _tasks_for_key("smallnorb") == ["smallnorb_azi", "smallnorb_ele"]
    assert _tasks_for_key("imagenet") == []


def test_verify_reports_how_many_images_differ(tmp_path, capsys):
    root = tmp_path / "vtab-1k"
    dtd = _export_with_ids(root, "dtd", 47)
    eurosat = _export_with_ids(root, "eurosat", 10)
    (root / "eurosat" / "manifest.json").unlink()  # a copy from elsewhere: no tfds names recorded
    vpt = {
        "vtab-dtd": {"train": dtd[:797] + ["other_1.jpg", "other_2.jpg", "other_3.jpg"], "val": dtd[800:]},
        "eurosat/rgb": eurosat,
        "sun397": ["a.jpg"],
    }
    split_file = tmp_path / "vtab_trainval_splits.json"
    split_file.write_text(json.dumps(vpt))
    with pytest.raises(SystemExit):  # eurosat's copy has no manifest and 4 test images instead of 5,400
        prepare(["verify", str(root), "--vpt-splits", str(split_file)])
    out = capsys.readouterr().out
    assert "dtd: 3 of VPT's 1000 images differ from this export's 1000 (train800 + val200 of dtd:3.0.1)" in out
    assert "eurosat: cannot compare" in out
    assert "sun397" not in out.split("tasks):")[1]  # in the file, but no folder here


def test_same_images_in_another_order(tmp_path):
    from san.data.vpt_splits import compare_with_vpt

    names = _export_with_ids(tmp_path, "dtd", 47)
    assert compare_with_vpt(tmp_path / "dtd", "dtd", names).endswith(
        "0 of VPT's 1000 images differ from this export's 1000 (train800 + val200 of dtd:3.0.1, same order)"
    )
    assert compare_with_vpt(tmp_path / "dtd", "dtd", names[::-1]).endswith("another order)")


def test_an_unusable_split_file_is_a_named_error(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"imagenet": ["a.jpg"]}))
    with pytest.raises(DatasetError, match=r"splits\.json: entry 'imagenet' names no VTAB task"):
        load_vpt_splits(path)
    path.write_text(json.dumps({"dtd": 3}))
    with pytest.raises(DatasetError, match=r"entry 'dtd' is neither a list of file names"):
        load_vpt_splits(path)
    with pytest.raises(DatasetError, match="no such file"):
        load_vpt_splits(tmp_path / "missing.json")
