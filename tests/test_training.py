"""End to end: a few-step run writes a complete record; seeds reproduce; resume continues."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_overrides
from helpers import run_killed_in_second_epoch, without_timings

from san.backbones import create_backbone, data_config
from san.config import compose_config
from san.data.loaders import build_loader
from san.identity import resolved, run_dir_for
from san.methods.registry import build_method
from san.records import read_record
from san.run import run
from san.trainer import NonFiniteLossError, Trainer

REQUIRED_KEYS = {
    "status",
    "stage",
    "backbone",
    "method",
    "suite",
    "task",
    "seed",
    "metrics",
    "params",
    "cost",
    "env",
    "config",
    "preprocessing",
}


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["test_vit", "test_convnext"])
@pytest.mark.parametrize("method", ["linear", "bitfit", "full"])
def test_few_step_run_writes_complete_record(tmp_path, tiny_task, backbone, method):
    path = run(compose_config(tiny_overrides(tmp_path, tiny_task, f"backbone={backbone}", f"method={method}")))
    record = json.loads(path.read_text())
    assert REQUIRED_KEYS <= set(record)
    assert record["status"] == "complete" and record["stage"] == "tune"
    assert record["backbone"]["pretrained"] is False
    assert record["backbone"]["weights"]["source"] == "random_init"
    assert len(record["backbone"]["weights"]["sha256"]) == 64
    assert set(record["metrics"]["final"]) == {"val_top1", "val_loss"}
    assert [row["epoch"] for row in record["metrics"]["per_epoch"]] == [1, 2]
    assert 0 <= record["metrics"]["final"]["val_top1"] <= 100
    params = record["params"]
    assert params["trainable"] > params["trainable_without_head"] >= 0
    assert (params["trainable_without_head"] == 0) == (method == "linear")
    assert record["cost"]["wall_s"] > 0 and record["cost"]["peak_mem_bytes"] > 0
    assert record["env"]["packages"]["torch"] == torch.__version__.split("+")[0]
    assert record["config"]["method"]["name"] == method
    assert (path.parent / "metrics.csv").read_text().startswith("epoch,")
    assert not (path.parent / "checkpoint.pt").exists()


@pytest.mark.slow
def test_learning_happens(tmp_path, tiny_task):
    """The tiny task's label is its brightness band: a few epochs of full tuning learn it."""
    path = run(compose_config(tiny_overrides(tmp_path, tiny_task, "method=full", "trainer.epochs=6")))
    history = json.loads(path.read_text())["metrics"]["per_epoch"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


@pytest.mark.slow
def test_same_seed_same_metrics(tmp_path, tiny_task):
    first = run(compose_config(tiny_overrides(tmp_path / "a", tiny_task, "method=bitfit")))
    second = run(compose_config(tiny_overrides(tmp_path / "b", tiny_task, "method=bitfit")))
    other_seed = run(compose_config(tiny_overrides(tmp_path / "c", tiny_task, "method=bitfit", "seed=1")))
    metrics = [json.loads(p.read_text())["metrics"]["per_epoch"] for p in (first, second, other_seed)]
    assert without_timings(metrics[0]) == without_timings(metrics[1])
    assert without_timings(metrics[0]) != without_timings(metrics[2])


@pytest.mark.slow
def test_complete_run_is_skipped_on_rerun(tmp_path, tiny_task, capsys):
    cfg = compose_config(tiny_overrides(tmp_path, tiny_task))
    path = run(cfg)
    written = path.read_text()
    assert run(cfg) == path
    assert path.read_text() == written
    assert "already complete" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_after_interruption_continues_from_checkpoint(tmp_path, tiny_task):
    extra = ("method=full", "trainer.epochs=3", "trainer.checkpoint_every_epochs=1")
    reference = json.loads(run(compose_config(tiny_overrides(tmp_path / "ref", tiny_task, *extra))).read_text())

    cfg = compose_config(tiny_overrides(tmp_path / "int", tiny_task, *extra))
    run_killed_in_second_epoch(cfg)
    run_dir = run_dir_for(resolved(cfg))
    interrupted = json.loads((run_dir / "record.json").read_text())
    assert interrupted["status"] == "failed" and "simulated kill" in interrupted["error"]["message"]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1

    resumed = json.loads(run(cfg).read_text())
    assert resumed["status"] == "complete"
    assert resumed["cost"]["resumed_from_epoch"] == 1
    assert without_timings(resumed["metrics"]["per_epoch"]) == without_timings(reference["metrics"]["per_epoch"])


@pytest.mark.slow
def test_crash_leaves_failed_record(tmp_path, tiny_task):
    cfg = compose_config(tiny_overrides(tmp_path, tiny_task, "dataset.num_classes=3"))
    with pytest.raises(Exception, match="outside 0..2"):
        run(cfg)
    record = json.loads((run_dir_for(resolved(cfg)) / "record.json").read_text())
    assert record["status"] == "failed"
    assert record["error"]["type"] == "LabelRangeError"
    assert "train800.txt:" in record["error"]["message"]


def test_nan_loss_fails_clearly(tmp_path, tiny_task):
    config = resolved(compose_config(tiny_overrides(tmp_path, tiny_task, "trainer.nan_check_every=1")))
    model, _ = create_backbone(config["backbone"], 4)
    with torch.no_grad():
        model.get_classifier().weight.fill_(float("nan"))
    adapted = build_method("linear", model)
    preprocessing = data_config(model, 32)
    loader = build_loader(config["dataset"], "train", preprocessing, train=True, batch_size=8, num_workers=0)
    trainer = Trainer(adapted, preprocessing, config["trainer"], config["optim"], 0, tmp_path / "nan", "x")
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 1"):
        trainer.fit(loader, loader, "val")


@pytest.mark.slow
def test_final_protocol_reports_test_and_keeps_best_epoch_apart(tmp_path, tiny_task):
    once = json.loads(run(compose_config(tiny_overrides(tmp_path / "once", tiny_task, "protocol=final"))).read_text())
    assert "best_epoch_on_test_top1_not_for_reporting" not in once["metrics"]  # test read once: no "best" to keep
    record = json.loads(
        run(compose_config(tiny_overrides(tmp_path, tiny_task, "protocol=final", "trainer.eval_every=1"))).read_text()
    )
    assert record["stage"] == "final"
    assert set(record["metrics"]["final"]) == {"test_top1", "test_loss"}
    assert record["splits"]["fit_images"] == 40
    best = record["metrics"]["best_epoch_on_test_top1_not_for_reporting"]
    assert best == max(r["test_top1"] for r in record["metrics"]["per_epoch"])


@pytest.mark.slow
def test_wandb_logger_runs_offline_and_is_optional(tmp_path, tiny_task, monkeypatch):
    pytest.importorskip("wandb")  # an optional extra; requirements.lock installs it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    record_path = run(compose_config(tiny_overrides(tmp_path, tiny_task, "logger=wandb", "trainer.epochs=1")))
    assert read_record(record_path)["status"] == "complete"
    offline_runs = list((record_path.parent / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1


@pytest.mark.slow
def test_training_refuses_a_folder_that_fails_verification_unless_overridden(tmp_path, tiny_task):
    from san.run import DatasetVerificationError

    # the tiny task has 32 training lines, not VTAB-1K's 800
    with pytest.raises(
        DatasetVerificationError, match=r"(?s)train800.txt: 32 lines, VTAB-1K has 800.*dataset.verify=false"
    ):
        run(compose_config(tiny_overrides(tmp_path, tiny_task, "dataset.verify=true", "debug=fdr")))
    record = read_record(run(compose_config(tiny_overrides(tmp_path, tiny_task, "debug=fdr"))))
    assert record["status"] == "complete"
    assert record["dataset_check"] == {"checked": False, "reason": "dataset.verify=false"}
