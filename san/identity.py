"""A run's identity and its directory, from its resolved config alone.

Planning (san.protocol), the runner (san.run) and tests all need these; none of them
needs a model for it, so this module imports no torch: planning a sweep or finding a
run's directory stays light.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from san.data.errors import MissingDatasetError
from san.data.manifest import data_fingerprint as folder_fingerprint
from san.data.splits import task_dir
from san.methods.registry import method_label

# Settings that say where files are, how progress is shown, or how often the run pauses to
# evaluate or checkpoint: never the result. Everything else in the identity groups is in the
# identity (a new setting counts until it is listed here), and so is the data's content.
_NOT_IDENTITY = {
    # where the data is: the same data at another path is the same run (its content is
    # fingerprinted below instead)
    ("dataset", "root"),
    ("dataset", "folder"),
    ("dataset", "image_root"),
    ("dataset", "prepare_command"),
    ("dataset", "verify"),
    ("dataset", "expected_counts"),
    # where the weights are: their content is recorded as weights.sha256
    ("backbone", "checkpoint_path"),
    # how the run is carried out
    ("trainer", "num_workers"),
    ("trainer", "progress"),
    ("trainer", "keep_checkpoint"),
    ("trainer", "resume"),
    ("trainer", "data_cache"),
    ("trainer", "cache_device_budget"),
    ("trainer", "compile"),
    ("trainer", "device"),
    ("trainer", "nan_check_every"),
    ("trainer", "eval_every"),
    ("trainer", "checkpoint_every_minutes"),
    ("trainer", "checkpoint_every_epochs"),
    # how results name a variant (it names the run directory); the settings it labels count
    ("method", "label"),
    ("augment", "name"),
}
# Settings added after records existed, left out of the identity while they hold the value that
# reproduces the earlier behaviour (an option switched off), so adding an option does not turn
# every finished run into a new one; switched on, they count like any other setting.
_NEUTRAL_VALUES: dict[tuple[str, str], Any] = {
    # model EMA off (configs/trainer/default.yaml)
    ("trainer", "model_ema"): False,
    ("trainer", "model_ema_decay"): 0.9998,
    # no literature test curve in final runs (configs/protocol/final.yaml, san/literature.py)
    ("protocol", "literature_curve"): False,
    ("protocol", "literature_curve_every"): 10,
    # no further test sets evaluated after training (configs/protocol/final.yaml, san/robustness.py)
    ("protocol", "extra_evaluations"): [],
    # the warmup starts at optim.warmup_lr (configs/optim/adamw.yaml)
    ("optim", "warmup_lr_ratio"): None,
    # configs/augment/none.yaml: no batch augmentation (tests/test_augment.py checks they agree)
    ("augment", "crop"): "none",
    ("augment", "crop_scale"): [0.08, 1.0],
    ("augment", "crop_ratio"): [3 / 4, 4 / 3],
    ("augment", "hflip"): 0.0,
    ("augment", "interpolation"): "bicubic",
    ("augment", "rand_augment_layers"): 0,
    ("augment", "rand_augment_magnitude"): 9.0,
    ("augment", "rand_augment_magnitude_std"): 0.5,
    ("augment", "rand_augment_prob"): 0.5,
    ("augment", "random_erasing"): 0.0,
    ("augment", "random_erasing_mode"): "pixel",
    ("augment", "random_erasing_count"): 1,
    ("augment", "mixup_alpha"): 0.0,
    ("augment", "cutmix_alpha"): 0.0,
    ("augment", "mixup_prob"): 1.0,
    ("augment", "mixup_switch_prob"): 0.5,
    ("augment", "mixup_mode"): "batch",
    ("augment", "drop_last"): False,
    # the new classifier at the architecture's own init (configs/backbone/*.yaml, san/backbones.py)
    ("backbone", "head_init"): "timm",
}
_IDENTITY_GROUPS = ("backbone", "method", "dataset", "protocol", "trainer", "optim", "augment")
# Groups added after records existed: left out of the identity while every setting in them is
# neutral (or the config has no such group).
_ADDED_GROUPS = ("augment",)
_FINGERPRINTS: dict[tuple, dict[str, Any]] = {}


def resolved(cfg: DictConfig) -> dict[str, Any]:
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return container


def data_fingerprint(dataset: dict[str, Any]) -> dict[str, Any]:
    """What the data is, cheaply (san.data.manifest.data_fingerprint: the sha256 of each split
    list, the variant, the tfds builder). Two copies of a task (a PNG export and a JPEG
    release, another tfds version) differ here; the same copy moved to another path does not.
    A folder that does not exist yet (a dry run before the data is prepared) is "missing"."""
    try:
        folder = task_dir(dataset)
    except MissingDatasetError:
        return {"lists_sha256": {}, "missing": True}
    # Memoised on the list files' and manifest's (name, size, mtime): planning a sweep reads
    # each task's lists once, not once per job.
    key = (
        str(folder),
        tuple(
            sorted(
                (entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
                for entry in os.scandir(folder)
                if entry.is_file() and entry.name.endswith((".txt", ".json"))
            )
        ),
    )
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = folder_fingerprint(folder)
    return _FINGERPRINTS[key]


def _counts(group: str, key: str, value: Any) -> bool:
    if (group, key) in _NOT_IDENTITY:
        return False
    return (group, key) not in _NEUTRAL_VALUES or value != _NEUTRAL_VALUES[(group, key)]


def identity(config: dict[str, Any]) -> str:
    """Hash of everything that determines the result except the seed."""
    subset: dict[str, Any] = {
        group: {k: v for k, v in config[group].items() if _counts(group, k, v)}
        for group in _IDENTITY_GROUPS
        if group in config or group not in _ADDED_GROUPS
    }
    subset = {group: values for group, values in subset.items() if values or group not in _ADDED_GROUPS}
    subset["data"] = data_fingerprint(config["dataset"])
    return hashlib.sha256(json.dumps(subset, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_dir_for(config: dict[str, Any]) -> Path:
    """Derived from the configuration, so a re-run finds its own earlier result."""
    return (
        Path(config["paths"]["runs_dir"])
        / config["dataset"]["suite"]
        / config["dataset"]["name"]
        / config["backbone"]["name"]
        / method_label(config["method"])
        / config["protocol"]["stage"]
        / identity(config)
        / f"seed{config['seed']}"
    )
