"""VTAB-1K's split arithmetic and label rules, against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from san.config import config_dir
from san.data.errors import DatasetError
from san.data.vtab_spec import TASKS, as_tfds_split, resolve_slices, vtab_label

# tfds split sizes of the VTAB sources (tfds catalogue), the input of the arithmetic.
SIZES = {
    "caltech101": {"train": 3060, "test": 6084},
    "cifar": {"train": 50000, "test": 10000},
    "dtd": {"train": 1880, "validation": 1880, "test": 1880},
    "oxford_flowers102": {"train": 1020, "validation": 1020, "test": 6149},
    "oxford_iiit_pet": {"train": 3680, "test": 3669},
    "svhn": {"train": 73257, "test": 26032},
    "sun397": {"train": 76128, "validation": 10875, "test": 21750},
    "patch_camelyon": {"train": 262144, "validation": 32768, "test": 32768},
    "eurosat": {"train": 27000},
    "resisc45": {"train": 31500},
    "diabetic_retinopathy": {"train": 35126, "validation": 10906, "test": 42670},
    "clevr_count": {"train": 70000, "validation": 15000},
    "clevr_dist": {"train": 70000, "validation": 15000},
    "dmlab": {"train": 65550, "validation": 22628, "test": 22735},
    "kitti": {"train": 6347, "validation": 423, "test": 711},
    "dsprites_loc": {"train": 737280},
    "dsprites_ori": {"train": 737280},
    "smallnorb_azi": {"train": 24300, "test": 24300},
    "smallnorb_ele": {"train": 24300, "test": 24300},
}
# (val200, test) worked out by hand: T = percent * n // 100, as the reference code floors it.
EXPECTED = {
    "caltech101": ("train[2754:2954]", "test[0:6084]"),  # 90% of 3060
    "cifar": ("train[45000:45200]", "test[0:10000]"),
    "dtd": ("validation[0:200]", "test[0:1880]"),
    "oxford_flowers102": ("validation[0:200]", "test[0:6149]"),
    "oxford_iiit_pet": ("train[2944:3144]", "test[0:3669]"),  # 80% of 3680
    "svhn": ("train[65931:66131]", "test[0:26032]"),  # 90% of 73257, floored
    "sun397": ("validation[0:200]", "test[0:21750]"),
    "patch_camelyon": ("validation[0:200]", "test[0:32768]"),
    "eurosat": ("train[16200:16400]", "train[21600:27000]"),  # 60% and 80% of 27000
    "resisc45": ("train[18900:19100]", "train[25200:31500]"),
    "diabetic_retinopathy": ("validation[0:200]", "test[0:42670]"),
    "clevr_count": ("train[63000:63200]", "validation[0:15000]"),
    "clevr_dist": ("train[63000:63200]", "validation[0:15000]"),
    "dmlab": ("validation[0:200]", "test[0:22735]"),
    "kitti": ("validation[0:200]", "test[0:711]"),
    "dsprites_loc": ("train[589824:590024]", "train[663552:737280]"),
    "dsprites_ori": ("train[589824:590024]", "train[663552:737280]"),
    "smallnorb_azi": ("test[0:200]", "test[12150:24300]"),
    "smallnorb_ele": ("test[0:200]", "test[12150:24300]"),
}


def test_spec_covers_the_19_tasks_with_the_configs_class_counts():
    assert sorted(TASKS) == sorted(EXPECTED)
    for name, spec in TASKS.items():
        config = OmegaConf.load(f"{config_dir()}/dataset/{name}.yaml")
        assert config.num_classes == spec.num_classes, name


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_split_arithmetic(task):
    slices = resolve_slices(task, SIZES[task])
    assert as_tfds_split(slices["train800"]) == "train[0:800]"
    assert (as_tfds_split(slices["val200"]), as_tfds_split(slices["test"])) == EXPECTED[task]
    _, start, stop = slices["val200"]
    assert stop - start == 200


def test_a_slice_outside_its_split_is_a_named_error():
    with pytest.raises(DatasetError, match=r"cifar: val200 slice train.*--tfds-version cifar=<version>"):
        resolve_slices("cifar", {"train": 1000, "test": 10})
    with pytest.raises(DatasetError, match="dtd: tfds split 'validation'"):
        resolve_slices("dtd", {"train": 1880, "test": 1880})


def test_clevr_count_and_distance():
    example = {
        "objects": {
            "size": [0, 1, 1, 0, 1],
            "pixel_coords": np.array([[1, 2, 9.2], [3, 4, 12.0], [5, 6, 8.7], [0, 0, 15], [0, 0, 11]]),
        }
    }
    assert vtab_label("clevr_count", example) == 2  # 5 objects - 3
    assert vtab_label("clevr_dist", example) == 2  # closest depth 8.7: 8.5 < 8.7 <= 9
    example["objects"]["pixel_coords"][2, 2] = 7.9
    assert vtab_label("clevr_dist", example) == 0  # 0 < 7.9 <= 8
    example["objects"]["pixel_coords"] = np.array([[0, 0, 10.5]])
    assert vtab_label("clevr_dist", example) == 5


def test_kitti_closest_vehicle_distance():
    objects = {"type": [0, 3, 1, 4], "location": [[0, 0, 25.0], [0, 0, 2.0], [0, 0, 12.0], [0, 0, 1.0]]}
    assert vtab_label("kitti", {"objects": objects}) == 1  # vehicles (type < 3) at 25 and 12 m -> 8-20 m
    objects["location"][2] = [0, 0, 5.0]
    assert vtab_label("kitti", {"objects": objects}) == 0
    assert vtab_label("kitti", {"objects": {"type": [3, 5], "location": [[0, 0, 3.0], [0, 0, 4.0]]}}) == 3  # none
    assert vtab_label("kitti", {"objects": {"type": [0], "location": [[0, 0, 30.0]]}}) == 2


def test_dsprites_binning_and_smallnorb_attributes():
    assert [vtab_label("dsprites_loc", {"label_x_position": x}) for x in (0, 1, 2, 31)] == [0, 0, 1, 15]
    assert [vtab_label("dsprites_ori", {"label_orientation": o}) for o in (0, 2, 3, 5, 39)] == [0, 0, 1, 2, 15]
    example = {"label_azimuth": 17, "label_elevation": 8}
    assert (vtab_label("smallnorb_azi", example), vtab_label("smallnorb_ele", example)) == (17, 8)
    with pytest.raises(DatasetError, match="outside 0..8"):
        vtab_label("smallnorb_ele", {"label_elevation": 9})


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_published_test_sizes_follow_from_the_slices(task):
    """The test sizes a copy without a manifest is held to = the test slice of the catalogue's split sizes."""
    _, start, stop = resolve_slices(task, SIZES[task])["test"]
    assert TASKS[task].test_count == stop - start
