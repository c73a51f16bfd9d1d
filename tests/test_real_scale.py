"""What real scale needs and a tiny CPU run hides: a run identity that follows the data's
content rather than its path, one test evaluation per final run, small checkpoints that
resume exactly and cannot run code, locks on file systems without flock, a decoded-split
cache built once under a lock and memory-mapped, and FLOP counts that are measured."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLASSES, TINY_SIZES, tiny_dataset, tiny_overrides, write_tiny_vtab_task
from helpers import without_timings
from torch import nn

from san.config import compose_config
from san.identity import identity, resolved, run_dir_for
from san.locks import LockBusy, RunBusyError, file_lock, run_lock
from san.records import read_record
from san.run import run
from san.trainer import CheckpointError, Trainer


def _config(tmp_path, task, *extra):
    return resolved(compose_config(tiny_overrides(tmp_path, task, *extra)))


# --- identity ------------------------------------------------------------------------------
def test_moving_data_and_results_keeps_the_run_identity(tmp_path, tiny_task):
    moved = tmp_path / "elsewhere" / "vtab-1k"
    shutil.copytree(tiny_task.parent, moved)
    here = _config(tmp_path, tiny_task)
    there = _config(tmp_path / "other_results", moved / tiny_task.name, "paths.data_dir=/somewhere/else")
    assert identity(here) == identity(there)
    # the run directory moves with the results directory, under the same identity
    assert run_dir_for(here).relative_to(tmp_path) == run_dir_for(there).relative_to(tmp_path / "other_results")


@pytest.mark.parametrize(
    "neutral",
    [
        "trainer.eval_every=5",
        "trainer.nan_check_every=3",
        "trainer.device=cpu",
        "trainer.progress=true",
        "trainer.checkpoint_every_minutes=1",
    ],
)
def test_result_neutral_settings_are_not_identity(tmp_path, tiny_task, neutral):
    assert identity(_config(tmp_path, tiny_task)) == identity(_config(tmp_path, tiny_task, neutral))


def test_result_settings_are_identity(tmp_path, tiny_task):
    base = identity(_config(tmp_path, tiny_task))
    assert base != identity(_config(tmp_path, tiny_task, "optim.lr=0.02"))
    assert base != identity(_config(tmp_path, tiny_task, "trainer.label_smoothing=0.1"))


@pytest.mark.slow
def test_a_different_copy_of_a_task_is_a_different_run(tmp_path, tiny_task):
    other = write_tiny_vtab_task(tmp_path / "other_copy", name=tiny_task.name, seed=1)
    lines = (other / "val200.txt").read_text().splitlines()
    (other / "val200.txt").write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same images, other order
    first = run(compose_config(tiny_overrides(tmp_path, tiny_task, "trainer.epochs=1")))
    second_cfg = compose_config(tiny_overrides(tmp_path, other, "trainer.epochs=1"))
    assert run_dir_for(resolved(second_cfg)) != first.parent
    second = run(second_cfg)  # trains, rather than reporting the first copy's record as its own
    assert read_record(second)["data"] != read_record(first)["data"]


# --- evaluation policy ---------------------------------------------------------------------------
@pytest.mark.slow
def test_final_run_reads_test_once_and_tune_runs_evaluate_at_the_end(tmp_path, tiny_task):
    final = read_record(run(compose_config(tiny_overrides(tmp_path, tiny_task, "protocol=final", "trainer.epochs=3"))))
    assert final["cost"]["evaluations"] == 1
    assert final["cost"]["eval_images"] == TINY_SIZES["test"]  # the tiny test split, once
    assert [("test_top1" in row) for row in final["metrics"]["per_epoch"]] == [False, False, True]
    curve = read_record(
        run(compose_config(tiny_overrides(tmp_path, tiny_task, "trainer.epochs=4", "trainer.eval_every=2")))
    )
    assert [("val_top1" in row) for row in curve["metrics"]["per_epoch"]] == [False, True, False, True]


def test_experiment_defaults_evaluate_once():
    for experiment in ("vtab", "fgvc", "demo"):
        config = compose_config([f"experiment={experiment}"])
        assert config.trainer.eval_every == 0, experiment


# --- checkpoints ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_checkpoint_holds_only_trainable_tensors_and_their_state(tmp_path, tiny_task):
    config = _config(
        tmp_path,
        tiny_task,
        "method=bitfit",
        "trainer.epochs=2",
        "trainer.checkpoint_every_epochs=1",
        "trainer.keep_checkpoint=true",
    )
    record = read_record(run(config))
    assert record["cost"]["checkpoints_written"] == 1  # after epoch 1; the last epoch ends in the record
    state = torch.load(run_dir_for(config) / "checkpoint.pt", weights_only=True)
    trainable = record["params"]["trainable"]
    stored = sum(t.numel() for t in state["model"].values() if t.is_floating_point())
    buffers = stored - trainable
    assert 0 <= buffers < trainable  # bitfit + head; no frozen weight is stored
    moments = sum(v.numel() for s in state["optimizer"]["state"].values() for v in s.values() if v.ndim)
    assert moments == 2 * trainable  # AdamW's two moments for each trainable tensor, nothing else


@pytest.mark.slow
def test_default_policy_checkpoints_by_time_not_every_epoch(tmp_path, tiny_task):
    record = read_record(run(compose_config(tiny_overrides(tmp_path, tiny_task, "trainer.epochs=3"))))
    assert record["cost"]["checkpoints_written"] == 0  # three fast epochs are far under 5 minutes


@pytest.mark.slow
def test_sigterm_checkpoints_the_epoch_and_resume_equals_the_uninterrupted_run(tmp_path, tiny_task, monkeypatch):
    extra = ("method=full", "trainer.epochs=3")
    reference = read_record(run(compose_config(tiny_overrides(tmp_path / "ref", tiny_task, *extra))))
    cfg = compose_config(tiny_overrides(tmp_path / "int", tiny_task, *extra))
    original = Trainer._fit_epoch

    def preempted_in_first_epoch(self, epoch, *args, **kwargs):
        if epoch == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # what SLURM sends at preemption
        return original(self, epoch, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_fit_epoch", preempted_in_first_epoch)
    from san.trainer import TrainingInterrupted

    with pytest.raises(TrainingInterrupted, match="run the same command again"):
        run(cfg)
    run_dir = run_dir_for(resolved(cfg))
    assert read_record(run_dir / "record.json")["status"] == "interrupted"
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the run
    monkeypatch.setattr(Trainer, "_fit_epoch", original)
    resumed = read_record(run(cfg))
    assert resumed["cost"]["resumed_from_epoch"] == 1
    assert without_timings(resumed["metrics"]["per_epoch"]) == without_timings(reference["metrics"]["per_epoch"])


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch planted-code-ran",))


def test_a_planted_pickle_checkpoint_is_refused_not_run(tmp_path, tiny_task, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(tiny_overrides(tmp_path, tiny_task))
    run_dir = run_dir_for(resolved(cfg))
    run_dir.mkdir(parents=True)
    torch.save({"identity": identity(resolved(cfg)), "epoch": 1, "payload": _RunsCode()}, run_dir / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"not loaded.*rm .*checkpoint.pt"):
        run(cfg)
    assert not (tmp_path / "planted-code-ran").exists()


# --- locks ---------------------------------------------------------------------------------------
def test_lock_falls_back_to_a_lock_file_where_flock_is_unsupported(tmp_path, monkeypatch):
    import san.locks as locks

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")  # Lustre mounted without flock

    monkeypatch.setattr(locks.fcntl, "flock", no_flock)
    with file_lock(tmp_path / ".lock") as mechanism:
        assert mechanism == "lock_file"
        assert (tmp_path / ".lock.held").is_file()
        with pytest.raises(LockBusy):
            with file_lock(tmp_path / ".lock"):
                pass
    assert not (tmp_path / ".lock.held").exists()
    with run_lock(tmp_path / "run"):
        with pytest.raises(RunBusyError):
            with run_lock(tmp_path / "run"):
                pass


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path, monkeypatch):
    import san.locks as locks

    monkeypatch.setattr(locks.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOLCK, "no locks")))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    held = tmp_path / ".lock.held"
    held.write_text(json.dumps({"host": locks.socket.gethostname(), "pid": int(dead.stdout), "since": 0}))
    with file_lock(tmp_path / ".lock") as mechanism:
        assert mechanism == "lock_file"
        assert json.loads(held.read_text())["pid"] == os.getpid()  # taken over: it names this process now


def test_waiting_for_a_lock_file_gets_it_when_released(tmp_path, monkeypatch):
    import san.locks as locks

    monkeypatch.setattr(locks.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.EOPNOTSUPP, "no")))
    order = []
    with file_lock(tmp_path / ".lock"):
        waiter = threading.Thread(
            target=lambda: (file_lock(tmp_path / ".lock", wait=True, poll_s=0.01).__enter__(), order.append("waiter"))
        )
        waiter.start()
        time.sleep(0.1)
        order.append("holder releases")
    waiter.join(timeout=5)
    assert order == ["holder releases", "waiter"]


# --- the decoded-split cache ---------------------------------------------------------------------
CACHE_IMAGE_SIZE = 16  # the workers' Preprocessing size


def _cache_worker(task: str, cache: str) -> None:
    from san.data.loaders import build_loader
    from san.data.preprocessing import Preprocessing

    dataset = tiny_dataset(Path(task))
    build_loader(
        dataset,
        "test",
        Preprocessing(CACHE_IMAGE_SIZE, (0.5,) * 3, (0.5,) * 3, "bicubic"),
        train=False,
        batch_size=4,
        num_workers=0,
        cache_dir=cache,
        progress=False,
    )


def test_concurrent_runs_build_the_cache_once_and_read_it_memory_mapped(tiny_task, tmp_path, monkeypatch):
    import multiprocessing

    import san.data.cache as cache_module

    cache = tmp_path / "cache"
    context = multiprocessing.get_context("fork")
    builds = context.Value("i", 0)
    original = cache_module._decode_into

    def counting(*args, **kwargs):
        with builds.get_lock():
            builds.value += 1
        time.sleep(0.5)  # long enough for the other process to find the lock taken
        return original(*args, **kwargs)

    monkeypatch.setattr(cache_module, "_decode_into", counting)
    workers = [context.Process(target=_cache_worker, args=(str(tiny_task), str(cache))) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert builds.value == 1
    data_files = list(cache.glob("*.u8"))
    assert len(data_files) == 1 and not list(cache.glob("*.partial"))
    images, labels, path = cache_module._read(data_files[0], data_files[0].with_suffix(".json")) + (None,)
    count, size = TINY_SIZES["test"], CACHE_IMAGE_SIZE
    assert images.shape == (count, 3, size, size)
    assert labels.tolist() == [i % TINY_CLASSES for i in range(count)]  # write_tiny_vtab_task's labels
    # memory-mapped from the file (Linux lists the mapping), not read into memory
    assert str(data_files[0]) in open("/proc/self/maps").read()


def test_cache_key_follows_the_decoder_and_resize_versions(tiny_task, monkeypatch):
    import PIL

    from san.data.cache import cache_key
    from san.data.splits import read_split

    dataset = tiny_dataset(tiny_task)
    examples = read_split(dataset, "test")
    before = cache_key(examples, {"size": 16})
    monkeypatch.setattr(PIL, "__version__", "0.0.0")
    assert cache_key(examples, {"size": 16}) != before


def test_a_split_over_the_device_budget_stays_on_the_host():
    from san.data.cache import TensorLoader

    loader = TensorLoader(torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.zeros(10, dtype=torch.long), 4, False)
    assert loader.to_device(torch.device("cpu"), budget_bytes=100) is False  # 480 bytes > 100
    assert loader.to_device(torch.device("cpu"), budget_bytes=10_000) is True


# --- efficiency figures --------------------------------------------------------------------------
def test_training_flops_are_counted_per_method():
    from san.efficiency import run_flops

    def counts(method):
        config = resolved(compose_config(["backbone=test_vit", f"method={method}"]))
        config["dataset"]["num_classes"] = 10
        return run_flops(config)

    linear, bitfit, full = counts("linear"), counts("bitfit"), counts("full")
    assert linear["counted_on"] == "meta"
    # no backward through the backbone: only the head's weight gradient is added
    assert (
        0
        < linear["train_flops_per_image"] - linear["forward_flops_per_image"]
        < 0.01 * linear["forward_flops_per_image"]
    )
    assert 1.5 < bitfit["train_flops_per_image"] / bitfit["forward_flops_per_image"] < 2.5  # activation grads only
    assert 2.5 < full["train_flops_per_image"] / full["forward_flops_per_image"] < 3.5  # + weight grads


def test_depthwise_convolution_backward_is_not_counted_as_dense():
    from san.efficiency import count_flops, count_training_flops

    conv = nn.Sequential(nn.Conv2d(3, 64, 1), nn.Conv2d(64, 64, 3, padding=1, groups=64))
    for parameter in conv[0].parameters():
        parameter.requires_grad_(False)
    total_forward = count_flops(conv, 8, "cpu")
    depthwise = 2 * 64 * 9 * 8 * 8
    # backward: the depthwise conv's weight gradient (= its forward); no input gradient, since
    # nothing before it is trainable (torch's own formula would add 64x the weight gradient)
    assert count_training_flops(conv, 8, "cpu") == total_forward + depthwise
    conv[0].weight.requires_grad_(True)  # now the depthwise conv's input gradient is needed too
    assert count_training_flops(conv, 8, "cpu") == total_forward + 2 * depthwise + 2 * 3 * 64 * 8 * 8


def test_a_batchnorm_on_a_one_pixel_map_is_counted_on_two_images():
    """In training mode BatchNorm refuses one value per channel (EfficientNet at 32 px ends on a
    1x1 map); the count falls back to two images, halved, and equals the hand count."""
    from san.efficiency import count_flops, count_training_flops

    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 5))
    for parameter in model[0].parameters():
        parameter.requires_grad_(False)
    conv, linear = 2 * 3 * 16 * 8, 2 * 8 * 5
    assert count_flops(model, 4, "cpu") == conv + linear
    # backward: the Linear's weight and input gradients, the frozen conv's nothing
    assert count_training_flops(model, 4, "cpu") == conv + 3 * linear


@pytest.mark.slow
def test_records_carry_their_own_flops_and_a_known_or_unknown_peak(tmp_path, tiny_task):
    from san.efficiency import model_flop_utilisation

    overrides = tiny_overrides(tmp_path, tiny_task, "method=bitfit", "trainer.epochs=1", "trainer.device=cpu")
    record = read_record(run(compose_config(overrides)))
    efficiency = record["efficiency"]
    assert efficiency["train_flops_per_image"] > efficiency["forward_flops_per_image"] > 0
    assert record["cost"]["model_flop_utilisation"] is None  # a CPU has no listed peak
    assert model_flop_utilisation(1e9, 1000, "NVIDIA H100 80GB HBM3") == pytest.approx(1e12 / 989.4e12)
    assert model_flop_utilisation(1e9, 1000, "NVIDIA H100 80GB HBM3 (some new variant)") is None
