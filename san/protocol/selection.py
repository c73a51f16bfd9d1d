"""Choosing a grid point per cell from validation metrics, and nothing else.

Selection sees a record only through `validation_view`, which refuses anything that is
not a tune-stage record evaluated on the validation split, and refuses a record that
carries any test metric at all. The rule: highest final-epoch `val_top1`; ties go to
the lower `val_loss`, then to the earlier grid point (the grid file's order).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from san.atomic import atomic_write_bytes
from san.errors import UserError
from san.protocol.grid import Point
from san.records import read_record

TIE_BREAK = "highest val_top1, then lowest val_loss, then the earlier grid point"


class SelectionError(UserError, RuntimeError):
    pass


class LeakedTestMetricError(SelectionError):
    """A record offered to selection is not a validation-only tune record."""


class NoCompleteTuneRecordsError(SelectionError):
    pass


def validation_view(record: dict[str, Any], path: Path | str) -> dict[str, float]:
    """The only numbers selection may read from a record: its final validation metrics."""
    if record.get("stage") != "tune" or record.get("splits", {}).get("evaluate") != "val":
        raise LeakedTestMetricError(
            f"{path}: selection reads only stage=tune records evaluated on val "
            f"(this one: stage={record.get('stage')!r}, evaluate={record.get('splits', {}).get('evaluate')!r})"
        )
    metrics = record.get("metrics", {})
    rows = [metrics.get("final", {}), *metrics.get("per_epoch", [])]
    leaked = sorted({key for row in rows for key in row if "test" in key} | {key for key in metrics if "test" in key})
    if leaked:
        raise LeakedTestMetricError(f"{path}: a tune record carries test metrics {leaked}; refusing to select")
    final = metrics["final"]
    return {"val_top1": float(final["val_top1"]), "val_loss": float(final.get("val_loss", math.inf))}


@dataclass
class Candidate:
    order: int
    point: Point
    record_path: Path


def _candidate_row(candidate: Candidate) -> dict[str, Any]:
    row: dict[str, Any] = {
        "order": candidate.order,
        "overrides": list(candidate.point),
        "record": str(candidate.record_path),
    }
    if not candidate.record_path.is_file():
        return {**row, "status": "missing"}
    record = read_record(candidate.record_path)
    row["status"] = record.get("status", "unknown")
    if row["status"] == "complete":
        row.update(validation_view(record, candidate.record_path))
    elif row["status"] == "failed":
        row["error"] = record.get("error", {}).get("message")
    return row


def select_cell(cell_label: str, candidates: Sequence[Candidate]) -> dict[str, Any]:
    """The selection document for one cell: chosen point, every candidate, the gaps."""
    rows = [_candidate_row(c) for c in candidates]
    complete = [r for r in rows if r["status"] == "complete"]
    if not complete:
        statuses = {r["status"] for r in rows} or {"no grid points"}
        raise NoCompleteTuneRecordsError(
            f"cell {cell_label}: no complete tune record among {len(rows)} grid point(s) "
            f"(statuses: {sorted(statuses)}); run the tune stage first (san-sweep)"
        )
    chosen = min(complete, key=lambda r: (-r["val_top1"], r["val_loss"], r["order"]))
    return {
        "cell": cell_label,
        "metric": "val_top1 (last epoch)",
        "tie_break": TIE_BREAK,
        "chosen": {k: chosen[k] for k in ("overrides", "val_top1", "val_loss", "record")},
        "candidates": rows,
        "missing": [r["overrides"] for r in rows if r["status"] == "missing"],
        "failed": [r["overrides"] for r in rows if r["status"] == "failed"],
        "incomplete": [r["overrides"] for r in rows if r["status"] not in ("complete", "missing", "failed")],
    }


def write_selection(path: Path, document: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(document, indent=2) + "\n").encode())


def read_chosen_point(path: Path) -> Point:
    return tuple(json.loads(Path(path).read_text())["chosen"]["overrides"])
