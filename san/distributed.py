"""Data-parallel training across processes: who this process is, and the few collectives the
trainer and the runner need.

A run becomes data-parallel when its launcher says so in the environment, never through a config
setting, so one command line trains on one GPU or eight:

- torchrun (`torchrun --nproc_per_node 8 -m san.cli.train ...`) sets RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
- SLURM (`srun`, or Hydra's submitit launcher with `slurm.tasks_per_node`) sets SLURM_PROCID,
  SLURM_LOCALID and, inside a job step, SLURM_STEP_NUM_TASKS; the address is the step's first
  node and the port is derived from the job id, so every task computes the same pair. An
  `sbatch` script or `salloc` shell outside `srun` has no job step and runs as one process (its
  SLURM_NTASKS says what was allocated, not how many processes were started).

With neither, `join_process_group` yields a context of world size 1 that creates no process
group: a single process runs exactly as it always did (VTAB-1K and FGVC runs, several per GPU).

The backend follows the device: NCCL on CUDA (one GPU per process, the LOCAL_RANK-th visible
one), gloo on the CPU (what the tests run).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import re
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from san.errors import ConfigError, UserError

# Ports derived from a SLURM job id fall in [BASE, BASE + SPAN): above the well-known and
# registered ranges most services use, below Linux's default ephemeral range (32768-60999).
SLURM_PORT_BASE = 15_000
SLURM_PORT_SPAN = 15_000
# How long init_process_group waits for every process (a task that never starts fails here,
# with a message, instead of hanging the others until the job's time limit).
JOIN_TIMEOUT = datetime.timedelta(minutes=10)


class DistributedSetupError(UserError, RuntimeError):
    """The environment names a process group this process cannot join."""


@dataclass(frozen=True)
class Placement:
    """Where this process sits in its job: rank among world_size processes, local_rank on its node."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def first_hostname(nodelist: str) -> str:
    """The first host of a SLURM node list (`gpu[003-004,9],cpu1` -> `gpu003`): the address
    every task of a job step agrees on without talking to the others."""
    match = re.match(r"([^,\[]+)(?:\[([^\]\-,]+))?", nodelist.strip())
    if match is None:
        raise DistributedSetupError(f"cannot read the first host of the SLURM node list {nodelist!r}")
    prefix, first_number = match.groups()
    return prefix + (first_number or "")


def placement_from_environment(environ: Mapping[str, str] | None = None) -> Placement | None:
    """This process's place in a multi-process job, or None for a single process."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" in env:
        world = int(env["WORLD_SIZE"])
        if world <= 1:
            return None
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in env]
        if missing:
            raise DistributedSetupError(
                f"WORLD_SIZE={world} and RANK are set but {missing} are not: launch with torchrun "
                "(`torchrun --nproc_per_node N -m san.cli.train ...`), which sets all of them"
            )
        if "LOCAL_RANK" not in env:
            raise DistributedSetupError(
                f"WORLD_SIZE={world} and RANK are set but LOCAL_RANK is not, so every process would take the "
                "first GPU: launch with torchrun (`torchrun --nproc_per_node N -m san.cli.train ...`), which sets it"
            )
        return Placement(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env["LOCAL_RANK"]),
            master_addr=env["MASTER_ADDR"],
            master_port=int(env["MASTER_PORT"]),
            launcher="torchrun",
        )
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        world = int(env["SLURM_STEP_NUM_TASKS"])
        if world <= 1:
            return None
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise DistributedSetupError("SLURM_STEP_NUM_TASKS > 1 but no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST is set")
        # the job and its step: two steps of one allocation (two runs side by side) get two ports
        step = int(env.get("SLURM_JOB_ID", "0")) * 64 + int(env.get("SLURM_STEP_ID", "0") or 0)
        port = env.get("MASTER_PORT") or SLURM_PORT_BASE + step % SLURM_PORT_SPAN
        return Placement(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_hostname(nodelist),
            master_port=int(port),
            launcher="slurm",
        )
    return None


def gpu_index(local_rank: int) -> int:
    """The GPU a process takes: its local rank among the node's GPUs, or the only one it sees
    when the launcher binds one GPU per task (SLURM --gpus-per-task, --gpu-bind)."""
    return 0 if torch.cuda.device_count() == 1 else local_rank


class ProcessGroup:
    """This process's view of its run: rank and world size, and the collectives the trainer uses.
    With world size 1 every collective returns its input and nothing is communicated."""

    def __init__(self, placement: Placement | None = None, backend: str | None = None):
        self.placement = placement
        self.backend = backend

    @property
    def rank(self) -> int:
        return self.placement.rank if self.placement else 0

    @property
    def world_size(self) -> int:
        return self.placement.world_size if self.placement else 1

    @property
    def local_rank(self) -> int:
        return self.placement.local_rank if self.placement else 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the record, metrics.csv and checkpoints."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: its LOCAL_RANK-th GPU when the run is on CUDA."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", gpu_index(self.local_rank))
        return device

    def per_rank_batch(self, total: int, setting: str = "trainer.batch_size") -> int:
        """The share of a total batch each rank takes (the recipes' learning rates are for the total)."""
        if total % self.world_size:
            raise ConfigError(
                f"{setting}={total} is the total batch over all {self.world_size} processes and must divide "
                f"evenly among them; choose a multiple of {self.world_size} or another process count"
            )
        return total // self.world_size

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (a new tensor; the input is left as it was)."""
        if not self.active:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is true on any: decisions all ranks must take together."""
        if not self.active:
            return flag
        value = torch.tensor([int(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def from_main(self, value):
        """Rank 0's value of a small picklable object, on every rank."""
        if not self.active:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def data_parallel(self, module: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
        """`module` wrapped for data-parallel training: its trainable tensors start as rank 0's and
        their gradients are averaged over ranks in every backward. Buffers are not synchronised at
        each forward (`broadcast_buffers` below, when they are read)."""
        no_forward_sync = (
            {"forward_sync_buffers": False}  # torch >= 2.14's name; broadcast_buffers is deprecated there
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
            else {"broadcast_buffers": False}
        )
        return DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, **no_forward_sync
        )

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers on every rank (BatchNorm's running statistics), as DDP's
        broadcast_buffers does before each forward, done once when they are read."""
        if not self.active:
            return
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)

    def summary(self) -> dict:
        """What the record says about how the run was spread over processes."""
        if not self.active:
            return {"world_size": 1, "backend": None, "launcher": None}
        return {"world_size": self.world_size, "backend": self.backend, "launcher": self.placement.launcher}


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def join_process_group(device: torch.device, environ: Mapping[str, str] | None = None) -> Iterator[ProcessGroup]:
    """The process group the environment describes (see the module docstring), joined for the
    duration of a run and left afterwards; a ProcessGroup of world size 1 without one."""
    placement = placement_from_environment(environ)
    if placement is None:
        yield ProcessGroup()
        return
    if dist.is_initialized():  # joined by the caller (a script of its own around run())
        yield ProcessGroup(placement, dist.get_backend())
        return
    backend = backend_for(device)
    if backend == "nccl":
        if gpu_index(placement.local_rank) >= torch.cuda.device_count():
            raise DistributedSetupError(
                f"local rank {placement.local_rank} has no GPU: this node shows {torch.cuda.device_count()}; "
                "start one process per GPU (torchrun --nproc_per_node, slurm.tasks_per_node = slurm.gpus_per_node)"
            )
        torch.cuda.set_device(gpu_index(placement.local_rank))
    os.environ.setdefault("MASTER_ADDR", placement.master_addr)
    os.environ.setdefault("MASTER_PORT", str(placement.master_port))
    try:
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=placement.rank,
            world_size=placement.world_size,
            timeout=JOIN_TIMEOUT,
        )
    except (RuntimeError, ValueError) as error:
        raise DistributedSetupError(
            f"rank {placement.rank} of {placement.world_size} could not join the {backend} process group at "
            f"{placement.master_addr}:{placement.master_port} ({placement.launcher}): {error}. Check that every "
            "process was started and that the port is free"
        ) from error
    try:
        yield ProcessGroup(placement, backend)
    finally:
        dist.destroy_process_group()
