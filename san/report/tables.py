"""The paper's tables as data: rows of cells (mean, std, seeds), before any formatting.

A suite table (VTAB-1K, FGVC, the demo suite) has one column per task in the suite's
order, a mean per task group when the suite has several groups (VTAB: Natural,
Specialized, Structured), the mean over all tasks, the mean of the group means, and the
trainable parameters without the head. Rows come in blocks, one per method: the measured
row, then the published row for the same method when a reference file has one, each
labelled with the method's name. A summary column is computed only from complete rows:
a missing task makes its group mean missing, never a mean over fewer tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd

from san.report.results import ReportError

MEAN_ALL = "mean"
MEAN_OF_GROUPS = "mean of groups"
PARAMS = "params (M)"
DELTA = "Δ mean vs published"


class MixedBackbonesError(ReportError):
    pass


@dataclass
class Score:
    mean: float | None = None
    std: float | None = None
    seeds: int = 0

    @property
    def missing(self) -> bool:
        return self.mean is None


@dataclass
class Row:
    method: str
    source: str  # "measured" or "published"
    cells: dict[str, Score]
    note: str = ""

    @property
    def label(self) -> str:
        return self.method if self.source == "measured" else f"{self.method} (published)"


@dataclass
class SuiteTable:
    title: str
    suite: str
    backbone: str
    tasks: list[str]
    groups: dict[str, list[str]]
    rows: list[Row]
    footnotes: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (method, task) without a measured value

    @property
    def summary_columns(self) -> list[str]:
        group_columns = [name.capitalize() for name in self.groups] if len(self.groups) > 1 else []
        return [*group_columns, MEAN_ALL, *([MEAN_OF_GROUPS] if len(self.groups) > 1 else [])]

    @property
    def columns(self) -> list[str]:
        extra = [DELTA] if any(r.source == "published" for r in self.rows) else []
        return [*self.tasks, *self.summary_columns, PARAMS, *extra]

    def best(self, column: str) -> float | None:
        """The best measured value of a column (bold in the rendered table)."""
        if column in (PARAMS, DELTA):
            return None
        values = [r.cells[column].mean for r in self.rows if r.source == "measured" and not r.cells[column].missing]
        return max(values) if values else None


def _mean(values: Sequence[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def _summaries(cells: dict[str, Score], tasks: list[str], groups: dict[str, list[str]]) -> dict[str, Score]:
    per_task = [cells[t].mean for t in tasks]
    out = {MEAN_ALL: Score(_mean(per_task))}
    if len(groups) > 1:
        group_means = {name: _mean([cells[t].mean for t in members]) for name, members in groups.items()}
        out.update({name.capitalize(): Score(value) for name, value in group_means.items()})
        out[MEAN_OF_GROUPS] = Score(_mean(list(group_means.values())))
    return out


def measured_row(frame: pd.DataFrame, method: str, tasks: list[str], groups: dict[str, list[str]]) -> Row:
    rows = frame[frame.method == method]
    cells: dict[str, Score] = {}
    for task in tasks:
        values = rows[rows.task == task]["top1"].astype(float).tolist()
        if values:
            std = pd.Series(values).std(ddof=1) if len(values) > 1 else None
            cells[task] = Score(sum(values) / len(values), std, len(values))
        else:
            cells[task] = Score()
    cells.update(_summaries(cells, tasks, groups))
    params = rows["params_without_head"].dropna()
    cells[PARAMS] = Score(float(params.iloc[0]) / 1e6 if not params.empty else None)
    return Row(method, "measured", cells)


def published_row(reference: pd.Series, tasks: list[str], groups: dict[str, list[str]], source: str) -> Row:
    cells = {t: Score(float(reference[t]) if t in reference and not pd.isna(reference[t]) else None) for t in tasks}
    cells.update(_summaries(cells, tasks, groups))
    params = reference.get("params_m")
    cells[PARAMS] = Score(float(params) if params is not None and not pd.isna(params) else None)
    return Row(str(reference["method"]), "published", cells, note=source)


def build_suite_table(
    frame: pd.DataFrame,
    *,
    title: str,
    suite: str,
    tasks: list[str],
    groups: dict[str, list[str]],
    methods: list[str] | None = None,
    published: pd.DataFrame | None = None,
    published_source: str = "",
) -> SuiteTable:
    """`frame`: final results of one backbone on one suite (see results.load_final_results)."""
    backbones = sorted(frame.backbone.unique()) if not frame.empty else []
    if len(backbones) > 1:
        raise MixedBackbonesError(f"one table holds one backbone; {title!r} got {backbones}: build one per backbone")
    backbone = backbones[0] if backbones else "-"
    methods = methods or sorted(frame.method.unique())
    rows: list[Row] = []
    published_by_method = (
        {} if published is None else {str(m): r for m, r in published.set_index("method", drop=False).iterrows()}
    )
    for method in methods:
        row = measured_row(frame, method, tasks, groups)
        rows.append(row)
        if method in published_by_method:
            reference = published_row(published_by_method[method], tasks, groups, published_source)
            rows.append(reference)
            mine, theirs = row.cells[MEAN_ALL].mean, reference.cells[MEAN_ALL].mean
            row.cells[DELTA] = Score(None if mine is None or theirs is None else mine - theirs)
    for method, reference in published_by_method.items():
        if method not in methods:
            rows.append(published_row(reference, tasks, groups, published_source))
    for row in rows:
        row.cells.setdefault(DELTA, Score())
    missing = [(r.method, t) for r in rows if r.source == "measured" for t in tasks if r.cells[t].missing]
    table = SuiteTable(title, suite, backbone, tasks, groups, rows, missing=missing)
    seeds = sorted(
        {c.seeds for r in rows if r.source == "measured" for t, c in r.cells.items() if t in tasks and c.seeds}
    )
    table.footnotes.append(
        f"Test top-1 (%), last epoch, mean ± sample std over seeds (seeds per cell: "
        f"{', '.join(map(str, seeds)) or '-'}); summary columns are means of the per-task means and are blank when a "
        "task is missing. Bold: best measured value."
    )
    with_head = frame.groupby("method")["params_trainable"].mean() / 1e6 if not frame.empty else pd.Series(dtype=float)
    if not with_head.empty:
        table.footnotes.append(
            "Parameters without the head; with the head (mean over tasks): "
            + ", ".join(f"{m} {v:.3f} M" for m, v in with_head.items())
            + "."
        )
    if any(r.source == "published" for r in rows):
        table.footnotes.append(
            f"Published rows: {published_source}. They are reference values, not measured here; "
            f"{DELTA} = measured mean - published mean."
        )
    return table


def efficiency_frame(frame: pd.DataFrame, flops: dict[str, float] | None = None) -> pd.DataFrame:
    """Per method: trainable parameters, FLOPs per image, peak memory and throughputs (from the records)."""
    if frame.empty:
        return pd.DataFrame()
    grouped = frame.groupby("method")
    table = pd.DataFrame(
        {
            # mean over the method's tasks: a method's count can differ per task (VPT's prompt length)
            "params without head (M)": grouped["params_without_head"].mean() / 1e6,
            "train images/s": grouped["train_images_per_s"].mean(),
            "eval images/s (unmerged)": grouped["eval_images_per_s"].mean(),
            "peak memory (GiB)": grouped["peak_mem_bytes"].max() / 2**30,
            "memory measured as": grouped["peak_mem_kind"].first(),
            "device": grouped["device"].first(),
            "data": grouped["data_variant"].agg(lambda variants: ", ".join(sorted(set(variants)))),
        }
    )
    spread = grouped["params_without_head"].agg(lambda counts: counts.max() - counts.min())
    if (spread > 0).any():
        low, high = grouped["params_without_head"].min() / 1e6, grouped["params_without_head"].max() / 1e6
        table.insert(
            1, "params range over tasks (M)", [f"{low[m]:.3f}-{high[m]:.3f}" if spread[m] else "" for m in table.index]
        )
    if flops:
        table.insert(1, "GFLOPs / image", [flops.get(m, math.nan) / 1e9 for m in table.index])
    return table
