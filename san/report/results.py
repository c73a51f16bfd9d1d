"""Result records -> one tidy DataFrame, with every record that was left out counted.

A row is one complete final-stage run. Records that cannot be used are skipped with a
reason (failed, still running, an unsupported schema, another stage), never silently;
two different configurations claiming the same cell is a named error, never an average.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from san.errors import UserError
from san.literature import LITERATURE_CURVE_KEY
from san.records import SCHEMA_VERSION, find_records, read_record

COLUMNS = [
    "suite",
    "task",
    "group",
    "backbone",
    "method",
    "registered_method",
    "seed",
    "identity",
    "top1",
    "params_without_head",
    "params_trainable",
    "train_images_per_s",
    "eval_images_per_s",
    "peak_mem_bytes",
    "peak_mem_kind",
    "optimizer_state_bytes",
    "device",
    "forward_flops_per_image",
    "train_flops_per_image",
    "data_variant",
    "task_order",
    "num_classes",
    "point",
    "literature_max_top1",
    "literature_every",
    "extra_evaluations",
    "path",
]

# The figure an evaluation-only set is headlined by: the one its dataset config's `split_summary`
# computes (san/robustness.py SPLIT_SUMMARIES; ImageNet-C's mCE), else its top-1.
SUMMARY_HEADLINES = {"imagenet_c_mce": "mce"}
TOP1 = "top1"
EXTRA_EVALUATIONS_KEY = "extra_evaluations"  # record["metrics"][...], written by san/run.py


class ReportError(UserError, RuntimeError):
    pass


class ConflictingResultsError(ReportError):
    """One cell has final records of more than one configuration."""


@dataclass
class LoadedResults:
    frame: pd.DataFrame
    skipped: Counter = field(default_factory=Counter)

    def skipped_text(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"


def _task_order(record: dict) -> tuple[str, ...] | None:
    """The task order of the run's experiment (the report's columns). Older records, from
    before the field, carry the same list in their config's plan node; a run outside an
    experiment has none."""
    order = record.get("task_order")
    if order is None:
        order = ((record.get("config") or {}).get("plan") or {}).get("tasks")
    return tuple(order) if order else None


def extra_evaluation_metrics(config: Mapping[str, Any]) -> dict[str, str]:
    """{set: the key of its headline figure} for each set a run's config evaluates its final model
    on after training (protocol.extra_evaluations, in that order; the set's own config under
    extra_datasets). Read from a record's config or from a planned job's."""
    names = list((config.get("protocol") or {}).get("extra_evaluations") or [])
    datasets = config.get("extra_datasets") or {}
    metrics = {}
    for name in names:
        summary = (datasets.get(name) or {}).get("split_summary")
        if summary is not None and summary not in SUMMARY_HEADLINES:
            raise ReportError(
                f"dataset {name!r}: the report has no headline figure for split_summary {summary!r}; known: "
                f"{sorted(SUMMARY_HEADLINES)}. Add it to san/report/results.py SUMMARY_HEADLINES"
            )
        metrics[name] = SUMMARY_HEADLINES.get(summary, TOP1)
    return metrics


def _extra_evaluations(record: dict) -> dict[str, dict[str, Any]]:
    """{set: {"metric", "value"}} for the sets the run's config names; value None where the
    record has no result for a set (a record written before the run evaluated it)."""
    results = record["metrics"].get(EXTRA_EVALUATIONS_KEY) or {}
    return {
        name: {"metric": metric, "value": (results.get(name) or {}).get(metric)}
        for name, metric in extra_evaluation_metrics(record.get("config") or {}).items()
    }


def _row(record: dict, path: Path) -> dict:
    metric = f"{record['splits']['evaluate']}_top1"
    cost = record.get("cost", {})
    curve = record["metrics"].get(LITERATURE_CURVE_KEY) or {}
    return {
        "suite": record["suite"],
        "task": record["task"],
        "group": record.get("group"),
        "backbone": record["backbone"]["name"],
        "method": record["method"]["name"],
        # the method a labelled variant is of (san_recal is a san): what the method notes are keyed by
        "registered_method": record["method"].get("registered_name") or record["method"]["name"],
        "seed": record["seed"],
        "identity": record["identity"],
        "top1": record["metrics"]["final"][metric],
        "params_without_head": record["params"]["trainable_without_head"],
        "params_trainable": record["params"]["trainable"],
        "train_images_per_s": cost.get("train_images_per_s"),
        "eval_images_per_s": cost.get("eval_images_per_s"),
        "peak_mem_bytes": cost.get("peak_mem_bytes"),
        "peak_mem_kind": cost.get("peak_mem_kind"),
        # the optimizer's own tensors (AdamW's moments, GaLore's low-rank ones); records before it: none
        "optimizer_state_bytes": cost.get("optimizer_state_bytes"),
        "device": record.get("env", {}).get("device"),
        # counted at run time for this task's own model (records before schema 1.1 have none)
        "forward_flops_per_image": record.get("efficiency", {}).get("forward_flops_per_image"),
        "train_flops_per_image": record.get("efficiency", {}).get("train_flops_per_image"),
        # png_lossless / jpeg_noah / external:<layout>: which copy of the data the run read
        "data_variant": (record.get("data") or {}).get("variant") or "unrecorded",
        "task_order": _task_order(record),
        # the chance level of a final cell is 100 / num_classes (records from before the config was kept: none)
        "num_classes": ((record.get("config") or {}).get("dataset") or {}).get("num_classes"),
        # the grid point the run refit (san-sweep); ties a final record to its cell's selection file
        "point": tuple(record["point"]) if record.get("point") else None,
        # protocol.literature_curve: the best test epoch of the same run, never the headline
        "literature_max_top1": curve.get("max_test_top1"),
        "literature_every": curve.get("every_epochs"),
        # protocol.extra_evaluations: the final model also scored on evaluation-only sets (ImageNet-A/R/C)
        "extra_evaluations": _extra_evaluations(record),
        "path": str(path),
    }


def load_final_results(paths: Iterable[Path]) -> LoadedResults:
    """Rows for the complete final records among `paths`; the rest counted by reason."""
    rows, skipped = [], Counter()
    for path in paths:
        try:
            record = read_record(path)
        except (OSError, ValueError):
            skipped["unreadable"] += 1
            continue
        if record.get("schema") != SCHEMA_VERSION:
            skipped[f"schema {record.get('schema')!r} (this version reads {SCHEMA_VERSION})"] += 1
        elif record.get("status") != "complete":
            skipped[str(record.get("status"))] += 1
        elif record.get("stage") != "final":
            skipped[f"stage {record.get('stage')}"] += 1
        else:
            rows.append(_row(record, path))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    check_one_configuration_per_cell(frame)
    return LoadedResults(frame, skipped)


def load_results_dir(runs_dir: Path) -> LoadedResults:
    if not Path(runs_dir).is_dir():
        raise ReportError(f"no runs under {runs_dir}; run a sweep first (make demo, make vtab)")
    return load_final_results(find_records(runs_dir))


def check_one_configuration_per_cell(frame: pd.DataFrame) -> None:
    if frame.empty:
        return
    identities = frame.groupby(["suite", "backbone", "method", "task"])["identity"].nunique()
    conflicts = identities[identities > 1]
    if not conflicts.empty:
        (suite, backbone, method, task) = conflicts.index[0]
        clash = frame[(frame.backbone == backbone) & (frame.method == method) & (frame.task == task)]
        raise ConflictingResultsError(
            f"{len(conflicts)} cell(s) have final records of several configurations, e.g. {backbone} x {method} x "
            f"{task}: identities {sorted(clash.identity.unique())} ({clash.path.iloc[0]}, ...). Averaging them would "
            "mix settings: report one experiment (san-report experiment=<name>) or move the others away"
        )
