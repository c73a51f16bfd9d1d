"""Experiment loggers. Records and the per-epoch metrics.csv are always written by the
run itself; a logger only mirrors the epoch rows somewhere else, and is never required."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping


class Logger:
    def log_epoch(self, row: Mapping[str, Any]) -> None:
        pass

    def finish(self, record: Mapping[str, Any]) -> None:
        pass


class WandbLogger(Logger):
    """Weights & Biases, offline unless the user says otherwise (no network, no login)."""

    def __init__(self, settings: Mapping[str, Any], run_dir: Path, record: Mapping[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ImportError("logger=wandb needs the wandb package: pip install 'san-peft-bench[wandb]'") from None
        mode = os.environ.get("WANDB_MODE") or settings["mode"]
        self.run = wandb.init(
            project=settings["project"],
            entity=settings.get("entity"),
            mode=mode,
            dir=str(run_dir),
            name=f"{record['task']}/{record['method']['name']}/{record['stage']}/seed{record['seed']}",
            group=settings.get("group"),
            id=f"{record['identity']}-{record['stage']}-seed{record['seed']}",
            resume="allow",
            config=record["config"],
            reinit="finish_previous",
        )

    def log_epoch(self, row):
        if self.run is not None:
            self.run.log(dict(row), step=int(row["epoch"]))

    def finish(self, record):
        if self.run is not None:
            self.run.summary.update({"status": record.get("status"), **record.get("metrics", {}).get("final", {})})
            self.run.finish()


def build_logger(settings: Mapping[str, Any], run_dir: Path, record: Mapping[str, Any]) -> Logger:
    name = settings["name"]
    if name == "csv":
        return Logger()
    if name == "wandb":
        return WandbLogger(settings, run_dir, record)
    raise ValueError(f"unknown logger {name!r}; accepted: ['csv', 'wandb']")
