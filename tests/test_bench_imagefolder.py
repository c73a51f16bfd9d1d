"""san-bench's ImageFolder data-path row: images/s through the loader a GIC run builds."""

from __future__ import annotations

import torch

from san.bench import imagefolder_images_per_s, to_markdown
from san.testing.imagenet_releases import wnids, write_class_folders


def test_the_imagefolder_row_times_the_runs_own_loader(tmp_path):
    folder = write_class_folders(tmp_path / "train", wnids(3), per_class=8)
    row = imagefolder_images_per_s(folder, size=32, batch_size=4, workers=1, device=torch.device("cpu"), batches=3)
    assert row["images"] == 24 and row["workers"] == 1 and row["persistent_workers"] is True
    assert row["pin_memory"] is False  # pinned only when batches go to a GPU
    assert row["images_per_s"] > 0 and row["images_per_s_second_epoch"] > 0
    table = to_markdown(
        {"device": "cpu", "precision": "float32", "batch_size": 4, "rows": [], "imagefolder_data_path": row}
    )
    assert "ImageFolder data path" in table and "1 workers" in table
