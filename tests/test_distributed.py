"""Data-parallel training (san/distributed.py): who a process is from torchrun's or SLURM's
environment, how a split is shared among ranks, and whole runs on 2 CPU processes (gloo)
against the same run on 1 process.

Tolerance: a 2-process run computes each step's gradient as the mean of two half-batch means
(DDP's all-reduce) where one process takes the mean of the whole batch; the same numbers are
summed in another order, so float32 results differ in the last bits (seen: 1e-7 relative) and
Adam's normalisation can carry that through a few steps. Losses are compared at 1e-5 relative,
top-1 to within one image of the split (an argmax that sits on a near-tie may flip)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from helpers import without_timings
from torch.utils.data import DataLoader, TensorDataset

from san.config import compose_config
from san.data.cache import TensorLoader
from san.data.loaders import ShardSampler
from san.distributed import (
    SLURM_PORT_BASE,
    DistributedSetupError,
    Placement,
    ProcessGroup,
    first_hostname,
    join_process_group,
    placement_from_environment,
)
from san.errors import ConfigError
from san.identity import resolved, run_dir_for
from san.locks import LOCK_NAME, file_lock
from san.run import run

# --- who a process is -----------------------------------------------------------------------------


def test_torchrun_environment_names_the_rank():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29511"}
    assert placement_from_environment(env) == Placement(3, 4, 1, "node7", 29511, "torchrun")


def test_a_slurm_job_step_names_the_rank_and_agrees_on_the_address():
    def task(procid: int, localid: int) -> dict:
        return {
            "SLURM_JOB_ID": "123456",
            "SLURM_NTASKS": "8",
            "SLURM_STEP_NUM_TASKS": "8",
            "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(localid),
            "SLURM_STEP_NODELIST": "gpu[003-004,9],cpu1",
        }

    first, last = placement_from_environment(task(0, 0)), placement_from_environment(task(7, 3))
    assert (first.rank, first.world_size, first.local_rank) == (0, 8, 0)
    assert (last.rank, last.world_size, last.local_rank) == (7, 8, 3)
    assert first.master_addr == last.master_addr == "gpu003"
    assert first.master_port == last.master_port == SLURM_PORT_BASE + 123456 * 64 % 15_000
    assert first.launcher == "slurm"
    # a second job step of the same allocation (another run beside this one) takes another port
    assert placement_from_environment({**task(0, 0), "SLURM_STEP_ID": "1"}).master_port != first.master_port


def test_torchrun_variables_without_local_rank_are_refused():
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "node7", "MASTER_PORT": "29511"}
    with pytest.raises(DistributedSetupError, match="LOCAL_RANK"):
        placement_from_environment(env)


@pytest.mark.parametrize("visible, local_rank, expected", [(8, 3, 3), (1, 3, 0)])
def test_a_process_takes_its_local_gpu_or_the_only_one_it_sees(monkeypatch, visible, local_rank, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    group = ProcessGroup(Placement(local_rank, 8, local_rank, "n1", 1, "slurm"), "nccl")
    assert group.device(torch.device("cuda")) == torch.device("cuda", expected)


@pytest.mark.parametrize(
    "nodelist, first", [("gpu[003-004,9],cpu1", "gpu003"), ("node12", "node12"), ("a-b[7,9]", "a-b7")]
)
def test_first_hostname_of_a_slurm_node_list(nodelist, first):
    assert first_hostname(nodelist) == first


@pytest.mark.parametrize(
    "env",
    [
        {},  # a plain process
        {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "x", "MASTER_PORT": "1"},  # torchrun with one process
        # an sbatch script or salloc shell outside srun: an allocation of 4 tasks, one process started
        {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n[1-2]"},
        {"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "n1"},  # a one-task job step
    ],
)
def test_a_single_process_joins_no_group(env):
    assert placement_from_environment(env) is None
    with join_process_group(torch.device("cpu"), environ=env) as group:
        assert (group.world_size, group.rank, group.is_main, group.active) == (1, 0, True, False)
        assert not torch.distributed.is_initialized()
        assert group.summary() == {"world_size": 1, "backend": None, "launcher": None}


def test_torchrun_variables_without_an_address_are_a_named_error():
    with pytest.raises(DistributedSetupError, match=r"\['MASTER_ADDR', 'MASTER_PORT'\].*torchrun"):
        placement_from_environment({"RANK": "0", "WORLD_SIZE": "2"})


def test_the_total_batch_must_divide_among_the_processes():
    group = ProcessGroup(Placement(0, 3, 0, "localhost", 1, "torchrun"), "gloo")
    assert group.per_rank_batch(96) == 32
    with pytest.raises(ConfigError, match=r"trainer.batch_size=64 .* all 3 processes .*multiple of 3"):
        group.per_rank_batch(64)


# --- how a split is shared --------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
def test_shards_cover_the_epoch_order_once_and_batch_as_one_process_does(world):
    size, total_batch = 47, 6 * world
    order = torch.randperm(size, generator=torch.Generator().manual_seed(11)).tolist()
    shards = []
    for rank in range(world):
        sampler = ShardSampler(size, rank, world, shuffle=True, generator=torch.Generator().manual_seed(11))
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1])
    assert sorted(i for shard in shards for i in shard) == list(range(size))
    # rank r's k-th batch of 6 holds images of the single process's k-th batch of 6 x world (full batches)
    for k in range(size // total_batch):
        together = sorted(i for shard in shards for i in shard[6 * k : 6 * (k + 1)])
        assert together == sorted(order[total_batch * k : total_batch * (k + 1)])
    evaluation = [list(ShardSampler(size, r, world, False, torch.Generator())) for r in range(world)]
    assert sorted(i for shard in evaluation for i in shard) == list(range(size))


def test_the_cached_split_shares_as_the_dataloader_does():
    """TensorLoader (cached splits) and the DataLoader path give each rank the same batches."""
    images = torch.arange(23, dtype=torch.uint8).view(23, 1, 1, 1)
    labels = torch.arange(23)
    for shuffle in (True, False):
        for rank in range(2):
            cached = TensorLoader(images, labels, batch_size=4, shuffle=shuffle, rank=rank, world=2)
            generator = torch.Generator()
            loader = DataLoader(
                TensorDataset(images, labels),
                batch_size=4,
                sampler=ShardSampler(23, rank, 2, shuffle, generator),
                generator=generator,
            )
            cached.generator.manual_seed(5)
            generator.manual_seed(5)
            assert len(cached) == len(loader) == (len(range(rank, 23, 2)) + 3) // 4
            assert [b.tolist() for _, b in cached] == [b.tolist() for _, b in loader]


# --- whole runs on 2 CPU processes ------------------------------------------------------------------


def _config(root: Path, task: Path, *extra: str) -> dict:
    # augment.drop_last: data-parallel runs drop the last partial batch (the trainer says so otherwise)
    return resolved(compose_config(tiny_overrides(root, task, "method=full", "augment.drop_last=true", *extra)))


def _assert_same_metrics(rows: list[dict], reference: list[dict], images: int) -> None:
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in reference]
    for row, expected in zip(without_timings(rows), without_timings(reference)):
        assert set(row) == set(expected)
        for key, value in expected.items():
            if key.endswith("top1"):
                assert row[key] == pytest.approx(value, abs=100.0 / images)
            else:
                assert row[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize("data_cache", [True, False], ids=["cached_split", "dataloader"])
def test_two_processes_train_the_run_one_process_trains(tmp_path, tiny_task, data_cache):
    from san.testing.distributed import run_on_ranks

    extra = (f"trainer.data_cache={str(data_cache).lower()}", "trainer.eval_every=1")
    single = json.loads(run(_config(tmp_path / "one", tiny_task, *extra)).read_text())
    config = _config(tmp_path / "two", tiny_task, *extra)
    outcomes = run_on_ranks(config, world=2)

    path = run_dir_for(config) / "record.json"
    assert outcomes == [{"path": str(path)}, {"path": str(path)}]
    record = json.loads(path.read_text())
    assert record["status"] == "complete"
    assert record["distributed"] == {
        "world_size": 2,
        "backend": "gloo",
        "launcher": "torchrun",
        "batch_size_per_process": 4,
    }
    assert single["distributed"]["world_size"] == 1
    assert record["identity"] == single["identity"]  # the process count is not part of what the run is
    # every image of the split evaluated once per evaluation, none twice
    assert record["cost"]["eval_images"] == 2 * record["splits"]["evaluate_images"]
    assert record["cost"]["evaluations"] == 2
    _assert_same_metrics(record["metrics"]["per_epoch"], single["metrics"]["per_epoch"], 8)
    # rank 0 alone wrote: one record and one metrics.csv, no leftovers of a second writer
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([LOCK_NAME, "metrics.csv", "record.json"])


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_on_two_or_one_processes(tmp_path, tiny_task):
    from san.testing.distributed import run_on_ranks

    extra = ("trainer.epochs=3",)
    reference = json.loads(run(_config(tmp_path / "reference", tiny_task, *extra)).read_text())
    config = _config(tmp_path / "killed", tiny_task, *extra)
    # SIGTERM reaches rank 1 only, during the second epoch: both ranks stop after it, together
    outcomes = run_on_ranks(config, world=2, sigterm={"rank": 1, "epoch": 1})
    assert [o.get("error") for o in outcomes] == ["TrainingInterrupted", "TrainingInterrupted"]
    run_dir = run_dir_for(config)
    assert json.loads((run_dir / "record.json").read_text())["status"] == "interrupted"
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 2

    # the same checkpoint, resumed once on 2 processes and once on 1
    on_one = json.loads(json.dumps(config))
    on_one["paths"]["runs_dir"] = str(tmp_path / "copy" / "runs")
    shutil.copytree(run_dir, run_dir_for(on_one))
    resumed_on_two = run_on_ranks(config, world=2)
    assert "error" not in resumed_on_two[0], resumed_on_two
    for record in (json.loads(Path(resumed_on_two[0]["path"]).read_text()), json.loads(run(on_one).read_text())):
        assert record["status"] == "complete"
        assert record["cost"]["resumed_from_epoch"] == 2
        _assert_same_metrics(record["metrics"]["per_epoch"], reference["metrics"]["per_epoch"], 8)


@pytest.mark.slow
def test_a_busy_run_directory_stops_every_rank_and_a_partial_batch_is_a_named_error(tmp_path, tiny_task):
    from san.testing.distributed import run_on_ranks

    config = _config(tmp_path, tiny_task)
    with file_lock(run_dir_for(config) / LOCK_NAME):
        outcomes = run_on_ranks(config, world=2)
    assert [o.get("error") for o in outcomes] == ["RunBusyError", "RunBusyError"]

    config["augment"]["drop_last"] = False
    outcomes = run_on_ranks(config, world=2)
    assert [o.get("error") for o in outcomes] == ["ConfigError", "ConfigError"]
    assert "set augment.drop_last=true" in outcomes[0]["message"]
