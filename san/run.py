"""`run(cfg)`: one training run from a composed config to a result record.

The Hydra entry point (`san-train`) is a thin shell around this function, and tests call
it directly with configs from `hydra.compose`.
"""

from __future__ import annotations

import contextlib
import random
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from san.backbones import create_backbone, data_config
from san.data.checks import FOLDER_CHECKS
from san.data.loaders import build_loader
from san.distributed import ProcessGroup, join_process_group
from san.efficiency import model_flop_utilisation, run_flops
from san.errors import UserError
from san.identity import data_fingerprint, identity, resolved, run_dir_for
from san.literature import curve_every, curve_metrics, trainer_settings
from san.locks import RunBusyError, run_lock
from san.loggers import Logger, build_logger
from san.methods.registry import build_method_from_config, method_label, method_settings
from san.provenance import device_description, environment
from san.records import RECORD_NAME, SCHEMA_VERSION, layout_facts, read_record, write_record
from san.robustness import evaluate_extra_sets, extra_evaluation_sets
from san.trainer import (
    Trainer,
    TrainingInterrupted,
    configure_determinism,
    optimizer_state_bytes,
    peak_memory_bytes,
    resolve_device,
)


class DatasetVerificationError(UserError, ValueError):
    pass


def check_dataset(dataset: dict[str, Any]) -> dict[str, Any]:
    """Verify the dataset folder before training on it (dataset.verify=false skips, and says so)."""
    check = FOLDER_CHECKS.get(dataset.get("format"))
    if check is None:
        return {"checked": False, "reason": f"no folder check for format {dataset.get('format')!r}"}
    if not dataset.get("verify", True):
        return {"checked": False, "reason": "dataset.verify=false"}
    report = check(dataset)
    if not report.ok:
        shown = "\n  ".join(report.problems[:10])
        raise DatasetVerificationError(
            f"dataset {dataset['name']!r} failed verification ({len(report.problems)} problem(s)):\n  {shown}\n"
            f"Re-create it ({dataset.get('prepare_command')}), or set dataset.verify=false to train on it anyway"
        )
    return {"checked": True, "ok": True, "notes": report.notes}


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    configure_determinism(deterministic)


def run(cfg: DictConfig | dict[str, Any], wait_for_lock: bool = False) -> Path:
    """Train and evaluate one configuration; return the path of its record.

    The run directory is locked for the duration: if another process holds it, this
    raises `RunBusyError` (or waits for it with `wait_for_lock`, and then usually finds
    the record complete).

    Started by torchrun or as the tasks of a SLURM job step, the processes train the run
    together (san.distributed): rank 0 holds the lock and writes the record, metrics.csv and
    checkpoints; every rank returns the record's path once it is written.
    """
    return run_and_report(cfg, wait_for_lock)[0]


def run_and_report(cfg: DictConfig | dict[str, Any], wait_for_lock: bool = False) -> tuple[Path, bool]:
    """`run`, also saying whether this call trained (False: the record was already complete)."""
    config = resolved(cfg) if isinstance(cfg, DictConfig) else cfg
    run_dir = run_dir_for(config)
    with join_process_group(resolve_device(config["trainer"]["device"])) as group:
        with _run_dir_lock(group, run_dir, wait_for_lock):
            record_path = run_dir / RECORD_NAME
            complete = False
            if group.is_main and record_path.is_file() and not config["overwrite"]:
                complete = read_record(record_path).get("status") == "complete"
            if group.from_main(complete):
                if group.is_main:
                    print(f"already complete, skipping (overwrite=true to redo): {record_path}", flush=True)
                return record_path, False
            return _run_locked(config, run_dir, group), True


@contextlib.contextmanager
def _run_dir_lock(group: ProcessGroup, run_dir: Path, wait: bool):
    """The run directory's lock, taken by rank 0 for every rank of the run (the others write
    nothing there); when it is busy, every rank raises RunBusyError."""
    busy = False
    with contextlib.ExitStack() as held:
        if group.is_main:
            try:
                held.enter_context(run_lock(run_dir, wait=wait))
            except RunBusyError:
                if not group.active:
                    raise
                busy = True
        if group.from_main(busy):
            raise RunBusyError(run_dir)
        yield


def _save(run_dir: Path, record: dict[str, Any], group: ProcessGroup) -> Path:
    """Rank 0 writes the record; every rank knows its path."""
    return write_record(run_dir, record) if group.is_main else run_dir / RECORD_NAME


def _run_locked(config: dict[str, Any], run_dir: Path, group: ProcessGroup | None = None) -> Path:
    group = group or ProcessGroup()

    protocol, dataset = config["protocol"], config["dataset"]
    record: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "status": "running",
        "stage": protocol["stage"],
        **layout_facts(config),
        "backbone": {"name": config["backbone"]["name"], "timm_name": config["backbone"]["timm_name"]},
        "method": {
            "name": method_label(config["method"]),
            "registered_name": config["method"]["name"],
            "settings": method_settings(config["method"]),
        },
        "seed": config["seed"],
        "identity": identity(config),
        "data": data_fingerprint(dataset),
        # The grid point san-sweep ran (its overrides); informational, not part of the identity.
        "point": config.get("point"),
        "splits": {"fit": protocol["fit"], "evaluate": protocol["evaluate"]},
        "env": environment(),
        "config": config,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _save(run_dir, record, group)
    started = time.perf_counter()
    logger: Logger = Logger()
    try:
        if group.is_main:
            logger = build_logger(config["logger"], run_dir, record)
        # This task's own figures (VPT's prompt length, a class count: they differ per task),
        # counted on the meta device and stored here, so the report never builds a model.
        record["efficiency"] = run_flops(config)
        seed_everything(config["seed"], config["trainer"]["deterministic"])
        model, weights = create_backbone(config["backbone"], dataset["num_classes"])
        record["backbone"].update(pretrained=weights.source != "random_init", weights=weights.to_dict())
        adapted = build_method_from_config(model, config["method"])
        record["method"]["config"] = adapted.config.to_dict()
        record["params"] = adapted.parameter_counts()
        normalize = config["backbone"].get("normalize", "pretrained")
        preprocessing = data_config(model, config["backbone"]["input_size"], normalize)
        record["preprocessing"] = {**preprocessing.to_dict(), "normalize": normalize}

        record["dataset_check"] = check_dataset(dataset)
        # Robustness sets the final model is also evaluated on (protocol.extra_evaluations), checked
        # now: a set that is missing fails before training, not after it.
        extra_sets = extra_evaluation_sets(config)
        if extra_sets:
            record["extra_evaluation_data"] = {
                name: {"dataset_check": check_dataset(extra), "data": data_fingerprint(extra)}
                for name, extra in extra_sets.items()
            }
        trainer_cfg = trainer_settings(config)  # a final run asking for protocol.literature_curve: test every k epochs
        cache_dir = config["paths"]["cache_dir"] if trainer_cfg.get("data_cache", False) else None
        on_gpu = trainer_cfg["device"] != "cpu" and torch.cuda.is_available()
        loader_options = dict(
            num_workers=trainer_cfg["num_workers"],
            cache_dir=cache_dir,
            progress=trainer_cfg["progress"],
            pin_memory=on_gpu,
        )
        # trainer.batch_size is the total over data-parallel processes (the recipes' lrs are for it);
        # each reads its share of the split in batches of its share. eval_batch_size is per process.
        fit_loader = build_loader(
            dataset,
            protocol["fit"],
            preprocessing,
            train=True,
            batch_size=group.per_rank_batch(trainer_cfg["batch_size"]),
            shard=(group.rank, group.world_size),
            **loader_options,
        )
        eval_loader = build_loader(
            dataset,
            protocol["evaluate"],
            preprocessing,
            train=False,
            batch_size=trainer_cfg["eval_batch_size"],
            shard=(group.rank, group.world_size),
            **loader_options,
        )
        record["splits"].update(fit_images=len(fit_loader.dataset), evaluate_images=len(eval_loader.dataset))

        trainer = Trainer(
            adapted,
            preprocessing,
            trainer_cfg,
            config["optim"],
            config["seed"],
            run_dir,
            record["identity"],
            channels_last=config["backbone"].get("channels_last", False),
            augment=config.get("augment"),
            num_classes=dataset["num_classes"],
            group=group,
        )
        record["env"] = {
            **record["env"],
            "device": device_description(trainer.device),
            "precision": str(trainer.autocast_dtype or "float32"),
        }
        # How many processes trained it (san.distributed): each took batch_size_per_process images of
        # every batch; BatchNorm's batch statistics are each process's own (no SyncBatchNorm).
        record["distributed"] = {**group.summary(), "batch_size_per_process": trainer.rank_batch_size}
        # What ran: the optimizer with its lr after optim.lr_scaling, and the lr schedule.
        record["optim_effective"] = trainer.optim_effective
        record["schedule"] = trainer.schedule
        # Which augmentations ran: the dataset's transform, then configs/augment on the device;
        # and whether evaluation read the model EMA (None: the trained weights).
        record["augment"] = {"dataset_transform": dataset["transform"], **trainer.augment_summary}
        record["model_ema"] = trainer.ema_summary
        outcome = trainer.fit(fit_loader, eval_loader, protocol["evaluate"], on_epoch=logger.log_epoch)

        metric = f"{protocol['evaluate']}_top1"
        evaluated = [row for row in outcome.history if metric in row]
        final = {key: value for key, value in evaluated[-1].items() if key.startswith(protocol["evaluate"])}
        record["metrics"] = {"final": final, "per_epoch": outcome.history}
        facts = adapted.record_facts()  # what only the method knows about what ran (SNELL's density)
        if facts:
            record["method"]["facts"] = facts
        if protocol["evaluate"] == "test" and len(evaluated) > 1:
            # Only when a curve was asked for (trainer.eval_every), for comparison with papers that
            # kept the best test epoch; never the headline, never read by selection.
            record["metrics"]["best_epoch_on_test_top1_not_for_reporting"] = max(r[metric] for r in evaluated)
        record["metrics"].update(curve_metrics(outcome.history, curve_every(config), metric))
        if extra_sets:
            record["metrics"]["extra_evaluations"] = evaluate_extra_sets(
                trainer, extra_sets, preprocessing, loader_options, shard=(group.rank, group.world_size)
            )
        peak, peak_kind = peak_memory_bytes(trainer.device)
        train_images_per_s = outcome.train_images / outcome.train_seconds if outcome.train_seconds else None
        record["cost"] = {
            "wall_s": time.perf_counter() - started,
            "train_s": outcome.train_seconds,
            "peak_mem_bytes": peak,
            "peak_mem_kind": peak_kind,
            # AdamW's moments, or GaLore's low-rank ones and projections: part of the peak above
            "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
            "train_images_per_s": train_images_per_s,
            "eval_images_per_s": outcome.eval_images / outcome.eval_seconds if outcome.eval_seconds else None,
            "resumed_from_epoch": outcome.resumed_from_epoch,
            "evaluations": outcome.evaluations,
            "eval_images": outcome.eval_images,
            "checkpoints_written": trainer.checkpoints_written,
            "cached_on_device": trainer.cached_on_device,
            # measured training FLOPs (this method's forward + backward) / the device's bf16 peak
            "model_flop_utilisation": model_flop_utilisation(
                record["efficiency"]["train_flops_per_image"], train_images_per_s, record["env"]["device"]
            ),
        }
        record["status"] = "complete"
        record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        path = _save(run_dir, record, group)
        trainer.discard_checkpoint()
        logger.finish(record)
        group.barrier()  # no rank returns before the record is written
        return path
    except BaseException as error:
        record["status"] = "interrupted" if isinstance(error, TrainingInterrupted) else "failed"
        record["error"] = {"type": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}
        record["cost"] = {"wall_s": time.perf_counter() - started}
        _save(run_dir, record, group)
        with contextlib.suppress(Exception):  # never hide the run's own error behind the logger's
            logger.finish(record)
        raise
