"""Evaluating a final ImageNet-1K model on the robustness sets (san/robustness.py,
protocol.extra_evaluations): the 200-class sets scored with the 1,000-way head, ImageNet-C split by
split with its mCE, on the tiny ImageFolder fixtures of san/testing/imagenet_releases.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_overrides
from omegaconf import OmegaConf

from san.backbones import create_backbone, data_config
from san.config import compose_config
from san.data.cache import TensorLoader
from san.data.hendrycks import CORRUPTIONS, SEVERITIES, corruption_split
from san.errors import ConfigError
from san.identity import identity, resolved
from san.methods.registry import build_method
from san.robustness import extra_evaluation_sets
from san.run import run
from san.testing import imagenet_releases as releases
from san.trainer import Trainer

CLASSES = releases.wnids(4)
SUBSET = [CLASSES[3], CLASSES[1]]  # an ImageNet-A-like set: 2 of the head's 4 classes, in its own order


def test_only_the_sets_classes_compete(tmp_path, tiny_task):
    """Trainer.evaluate(class_indices=...) scores the argmax over the listed logits, and its loss is
    the cross-entropy over them; checked against the model's logits computed here."""
    config = resolved(compose_config(tiny_overrides(tmp_path, tiny_task, "trainer.device=cpu")))
    torch.manual_seed(0)
    model, _ = create_backbone(config["backbone"], 4)
    preprocessing = data_config(model, 32, config["backbone"]["normalize"])
    trainer = Trainer(
        build_method("linear", model), preprocessing, config["trainer"], config["optim"], 0, tmp_path, "x"
    )
    images = torch.randint(0, 256, (24, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    labels = torch.arange(24) % 2
    indices = [3, 1]
    with torch.no_grad():
        logits = model.eval()(trainer._prepare(images))[:, indices]
    expected_top1 = 100.0 * (logits.argmax(1) == labels).sum().item() / 24
    # the subset changes the answer for this model (else the test could pass with the full argmax)
    assert expected_top1 != 100.0 * (model(trainer._prepare(images)).argmax(1) == labels).sum().item() / 24
    metrics = trainer.evaluate(TensorLoader(images, labels, 10, shuffle=False), class_indices=indices)
    assert metrics["top1"] == pytest.approx(expected_top1)
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert metrics["images"] == 24


def test_gic_asks_for_the_robustness_sets_on_final_imagenet_runs_only():
    def asked(*overrides):
        return list(compose_config(["experiment=gic", *overrides]).protocol.extra_evaluations)

    assert asked("dataset=imagenet1k", "protocol=final") == ["imagenet_a", "imagenet_r", "imagenet_c"]
    assert asked("dataset=cifar100_full", "protocol=final") == []
    assert asked("dataset=imagenet1k", "protocol=tune") == []
    config = resolved(compose_config(["experiment=gic", "dataset=imagenet1k", "protocol=final"]))
    sets = extra_evaluation_sets(config)
    assert list(sets) == ["imagenet_a", "imagenet_r", "imagenet_c"]
    assert sets["imagenet_c"]["split_summary"] == "imagenet_c_mce" and sets["imagenet_a"]["head_classes_file"]


def test_extra_evaluations_off_leave_the_identity_alone_and_misuse_is_named(tmp_path):
    config = resolved(compose_config([f"paths.root_dir={tmp_path}", "protocol=final"]))
    assert config["protocol"]["extra_evaluations"] == []
    without = json.loads(json.dumps(config))
    del without["protocol"]["extra_evaluations"]
    assert identity(without) == identity(config)
    config["protocol"]["extra_evaluations"] = ["imagenet_a"]
    assert identity(config) != identity(without)
    with pytest.raises(ConfigError, match=r"not in this run's extra_datasets"):
        extra_evaluation_sets(config)
    config["protocol"].update(evaluate="val")
    with pytest.raises(ConfigError, match=r"only a final run reads.*protocol.extra_evaluations=\[\]"):
        extra_evaluation_sets(config)


def _set_config(name: str, root: Path, **changes) -> dict:
    dataset = OmegaConf.to_container(compose_config([f"dataset={name}"]).dataset, resolve=True)
    return {**dataset, "root": str(root), **changes}


def test_a_final_imagenet_run_reports_the_robustness_sets(tmp_path):
    from san.records import read_record

    gic = tmp_path / "gic"
    imagenet = releases.write_imagenet(gic / "imagenet1k", CLASSES, [6, 6, 6, 6], val=3)
    classes_file, subset_file = tmp_path / "classes.txt", tmp_path / "subset.txt"
    classes_file.write_text("\n".join(CLASSES) + "\n")
    subset_file.write_text("\n".join(SUBSET) + "\n")
    # ImageNet-A-like: the test images of two classes, read as a 2-class set scored with the 4-way head
    for wnid in SUBSET:
        shutil.copytree(imagenet / "val" / wnid, gic / "imagenet_a" / wnid)
    # ImageNet-C-like: every corruption and severity; gaussian_noise/1 holds the test images themselves
    releases.write_imagenet_c(gic / "imagenet_c", CORRUPTIONS, SEVERITIES, CLASSES, 1)
    shutil.rmtree(gic / "imagenet_c" / "gaussian_noise" / "1")
    shutil.copytree(imagenet / "val", gic / "imagenet_c" / "gaussian_noise" / "1")

    overrides = [
        "backbone=test_vit",
        "method=linear",
        "dataset=imagenet1k",
        "protocol=final",
        f"paths.root_dir={tmp_path}",
        f"dataset.root={gic}",
        f"dataset.classes_file={classes_file}",
        f"dataset.num_classes={len(CLASSES)}",
        "dataset.carve_out.per_class=2",
        "dataset.expected_counts=null",
        "trainer.epochs=2",
        "trainer.batch_size=8",
        "trainer.eval_batch_size=8",
        "trainer.num_workers=0",
        "trainer.progress=false",
        "optim.warmup_epochs=0",
    ]
    config = resolved(compose_config(overrides))
    config["protocol"]["extra_evaluations"] = ["imagenet_a", "imagenet_c"]
    config["extra_datasets"] = {
        "imagenet_a": _set_config(
            "imagenet_a",
            gic,
            classes_file=str(subset_file),
            head_classes_file=str(classes_file),
            num_classes=2,
            expected_counts={"test": 6},
        ),
        "imagenet_c": _set_config("imagenet_c", gic, classes_file=str(classes_file), num_classes=4),
    }
    record = read_record(run(config))
    assert record["status"] == "complete"
    assert set(record["extra_evaluation_data"]) == {"imagenet_a", "imagenet_c"}
    assert all(entry["dataset_check"]["checked"] for entry in record["extra_evaluation_data"].values())

    results = record["metrics"]["extra_evaluations"]
    assert list(results) == ["imagenet_a", "imagenet_c"]
    assert results["imagenet_a"]["images"] == 6 and 0.0 <= results["imagenet_a"]["top1"] <= 100.0

    imagenet_c = results["imagenet_c"]
    splits = [corruption_split(c, s) for c in CORRUPTIONS for s in SEVERITIES]
    assert list(imagenet_c["per_split"]) == splits
    assert imagenet_c["images"] == 74 * len(CLASSES) + 3 * len(CLASSES)
    # the split holding the test images scores what the run's own test evaluation scored
    assert imagenet_c["per_split"]["gaussian_noise/1"] == record["metrics"]["final"]["test_top1"]
    # unnormalised mean error: the mean of 100 - top-1 over the 75 splits
    mean_error = sum(100.0 - top1 for top1 in imagenet_c["per_split"].values()) / len(splits)
    assert imagenet_c["mean_error"] == pytest.approx(mean_error)
    assert set(imagenet_c["corruption_error"]) == set(CORRUPTIONS) and imagenet_c["mce"] > 0
    # read once, never cached (75 splits of 50,000 images at full scale)
    cache = Path(config["paths"]["cache_dir"])
    assert not [p for p in cache.rglob("*") if "imagenet_a" in p.name or "imagenet_c" in p.name]
