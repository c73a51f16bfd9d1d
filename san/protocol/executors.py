"""Running a batch of jobs: here, in local worker processes, or through a Hydra launcher.

Every executor has the same contract: a job whose record is complete is skipped; a job
that fails is retried `retries` more times and then reported; a job another process
holds (run lock) is waited for and counted as done elsewhere. Each job writes its own
record, so the outcome is always read back from disk, whatever ran it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from san.atomic import atomic_write_bytes
from san.locks import RunBusyError, run_lock
from san.protocol.plan import Job
from san.records import read_record
from san.run import run_and_report
from san.trainer import TrainingInterrupted


@dataclass
class Outcome:
    job: Job
    status: str  # skipped | ran | failed | done_elsewhere
    attempts: int = 0
    error: str | None = None
    log: str | None = None


def record_status(job: Job) -> str:
    if not job.record_path.is_file():
        return "missing"
    return read_record(job.record_path).get("status", "unknown")


def _wait_for_other_process(job: Job) -> None:
    with run_lock(job.run_dir, wait=True):
        pass


def _finish(jobs: Sequence[Job], attempts: dict[int, int], logs: dict[int, str], busy: set[int]) -> list[Outcome]:
    outcomes = []
    for index, job in enumerate(jobs):
        status = record_status(job)
        if status != "complete":
            _wait_for_other_process(job)  # a concurrent sweep may still be on it
            status = record_status(job)
        error = None
        if status != "complete" and job.record_path.is_file():
            error = read_record(job.record_path).get("error", {}).get("message")
        ran = "done_elsewhere" if index in busy else "ran"
        outcomes.append(
            Outcome(
                job,
                ran if status == "complete" else "failed",
                attempts.get(index, 0),
                error or (None if status == "complete" else f"record status {status!r}"),
                logs.get(index),
            )
        )
    return outcomes


class Executor:
    def __init__(self, retries: int, work_dir: Path, progress: bool = True):
        self.retries = retries
        self.work_dir = work_dir
        self.progress = progress

    def execute(self, jobs: Sequence[Job], stage: str) -> list[Outcome]:
        skipped = [job for job in jobs if record_status(job) == "complete"]
        pending = [job for job in jobs if record_status(job) != "complete"]
        outcomes = [Outcome(job, "skipped") for job in skipped]
        if pending:
            bar = tqdm(
                total=len(jobs),
                initial=len(skipped),
                desc=f"sweep {stage}",
                unit="run",
                disable=None if self.progress else True,
                dynamic_ncols=True,
                position=0,
            )
            attempts: dict[int, int] = {}
            logs: dict[int, str] = {}
            self.busy: set[int] = set()  # indices another process held when this one tried
            todo = list(range(len(pending)))
            for _ in range(self.retries + 1):
                for index in todo:
                    attempts[index] = attempts.get(index, 0) + 1
                self._run_batch(pending, todo, stage, bar, logs)
                todo = [i for i in todo if record_status(pending[i]) != "complete"]
                if not todo:
                    break
            bar.close()
            outcomes += _finish(pending, attempts, logs, self.busy)
        return outcomes

    def _run_batch(self, jobs: Sequence[Job], indices: list[int], stage: str, bar: tqdm, logs: dict[int, str]) -> None:
        raise NotImplementedError


class InProcessExecutor(Executor):
    """One run after another in this process (the default; what tests and CPUs use)."""

    def _run_batch(self, jobs, indices, stage, bar, logs):
        for index in indices:
            job = jobs[index]
            bar.set_postfix_str(job.label())
            tqdm.write(f"-> {job.label()}")
            try:
                _, trained = run_and_report(job.config)
                if trained:
                    self.busy.discard(index)
                else:  # another process completed it after this sweep listed it
                    self.busy.add(index)
            except RunBusyError:
                self.busy.add(index)
                tqdm.write(f"   busy in another process, will wait for it: {job.run_dir}")
            except TrainingInterrupted:
                # SIGTERM (preemption, the time limit): the run checkpointed; starting the next one
                # would only be killed by the SIGKILL that follows. The same command resumes.
                raise
            except Exception as error:  # recorded in the run's record; the sweep goes on
                tqdm.write(f"   failed ({type(error).__name__}: {error}); record: {job.record_path}")
            bar.update(1)


def write_jobs_file(path: Path, jobs: Sequence[Job]) -> Path:
    entries = [{"label": job.label(), "run_dir": str(job.run_dir), "config": job.config} for job in jobs]
    atomic_write_bytes(path, (json.dumps(entries, indent=1, default=str) + "\n").encode())
    return path


def _auto_devices() -> list[str]:
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] or ["cpu"]


class ParallelExecutor(Executor):
    """Worker processes on this machine: `runs_per_device` runs per GPU (or on the CPU)."""

    def __init__(
        self, retries, work_dir, devices: Sequence[str] | str = "auto", runs_per_device: int = 1, progress: bool = True
    ):
        super().__init__(retries, work_dir, progress)
        self.devices = _auto_devices() if devices == "auto" else [str(d) for d in devices]
        self.slots = [device for device in self.devices for _ in range(runs_per_device)]

    def _run_batch(self, jobs, indices, stage, bar, logs):
        jobs_file = write_jobs_file(self.work_dir / f"jobs-{stage}.json", jobs)
        (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        waiting = list(indices)
        running: dict[int, tuple[subprocess.Popen, str, Any]] = {}
        free = list(self.slots)
        while waiting or running:
            while waiting and free:
                index, device = waiting.pop(0), free.pop(0)
                log_path = self.work_dir / "logs" / f"{stage}-{index:04d}.log"
                env = dict(os.environ)
                if device != "cpu":
                    env["CUDA_VISIBLE_DEVICES"] = device
                log = open(log_path, "ab")
                process = subprocess.Popen(
                    [sys.executable, "-m", "san.cli.job", "--jobs", str(jobs_file), "--index", str(index)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
                running[index] = (process, device, log)
                logs[index] = str(log_path)
            for index, (process, device, log) in list(running.items()):
                if process.poll() is not None:
                    log.close()
                    free.append(device)
                    del running[index]
                    bar.update(1)
                    if process.returncode:
                        tqdm.write(f"   failed: {jobs[index].label()} (log: {logs[index]})")
            time.sleep(0.2)


class HydraLauncherExecutor(Executor):
    """Hands the batch to Hydra's launcher (submitit_slurm, submitit_local, ...).

    Hydra's launchers wait for the whole batch; each job reads its entry from the jobs
    file and writes its own record, and the outcome is read back from the records.
    """

    def __init__(self, retries, work_dir, launcher: str, shared_overrides: Sequence[str], progress: bool = True):
        super().__init__(retries, work_dir, progress)
        self.launcher = launcher
        # The jobs' own configs come resolved from the jobs file; the launcher's process only
        # needs what configures the launch itself.
        launch_keys = ("paths.", "slurm.", "hydra.launcher.", "launcher.")
        self.shared_overrides = [o for o in shared_overrides if o.split("=", 1)[0].lstrip("+~").startswith(launch_keys)]

    def _run_batch(self, jobs, indices, stage, bar, logs):
        jobs_file = write_jobs_file(self.work_dir / f"jobs-{stage}.json", jobs)
        hydra_dir = self.work_dir / "hydra" / stage
        command = [
            sys.executable,
            "-m",
            "san.cli.hydra_job",
            "--multirun",
            f"launcher={self.launcher}",
            *self.shared_overrides,
            f"+jobs_file={jobs_file}",
            f"+job_index={','.join(str(i) for i in indices)}",
            f"hydra.sweep.dir={hydra_dir}",
        ]
        tqdm.write(f"   handing {len(indices)} run(s) to Hydra's {self.launcher} launcher; logs under {hydra_dir}")
        completed = subprocess.run(command)
        if completed.returncode:
            tqdm.write(f"   the launcher reported failures (exit {completed.returncode}); checking records")
        for index in indices:
            logs[index] = str(hydra_dir)
        bar.update(len(indices))


def build_executor(
    launcher: dict[str, Any], retries: int, work_dir: Path, shared_overrides: Sequence[str], progress: bool = True
) -> Executor:
    kind = launcher["executor"]
    if kind == "in_process":
        return InProcessExecutor(retries, work_dir, progress)
    if kind == "parallel":
        return ParallelExecutor(retries, work_dir, launcher["devices"], launcher["runs_per_device"], progress)
    if kind == "hydra":
        return HydraLauncherExecutor(retries, work_dir, launcher["name"], shared_overrides, progress)
    raise ValueError(f"unknown launcher.executor {kind!r}; accepted: ['in_process', 'parallel', 'hydra']")
