"""Running one training run as several local processes, as torchrun would start them: the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), one spawned
process per rank, each calling `san.run.run` on the same resolved config. The tests run it with
the gloo backend on the CPU; on a multi-GPU machine the same call trains with NCCL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, config: dict, outcomes: str, sigterm: dict | None) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    from san.run import run
    from san.trainer import Trainer

    if sigterm is not None and sigterm["rank"] == rank:
        # SIGTERM reaches this rank alone while it trains epoch `sigterm["epoch"]` (0-based), as a
        # kill reaches the processes of a job at different moments.
        original = Trainer._fit_epoch

        def fit_epoch(self, epoch, *args, **kwargs):
            if epoch == sigterm["epoch"]:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self, epoch, *args, **kwargs)

        Trainer._fit_epoch = fit_epoch
    try:
        outcome: dict[str, Any] = {"path": str(run(config))}
    except Exception as error:  # reported to the parent, which asserts on it
        outcome = {"error": type(error).__name__, "message": str(error)}
    Path(outcomes, f"rank{rank}.json").write_text(json.dumps(outcome))


def run_on_ranks(config: dict, world: int, sigterm: dict | None = None) -> list[dict[str, Any]]:
    """`run(config)` in `world` processes (rank r the r-th); per rank {"path"} or {"error", "message"}.
    `sigterm={"rank": r, "epoch": e}` sends SIGTERM to rank r as it starts epoch e."""
    with tempfile.TemporaryDirectory() as outcomes:
        mp.start_processes(
            _rank_main,
            args=(world, free_port(), config, outcomes, sigterm),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        return [json.loads(Path(outcomes, f"rank{rank}.json").read_text()) for rank in range(world)]
