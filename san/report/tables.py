"""The paper's tables as data: rows of cells (mean, std, seeds), before any formatting.

A suite table (VTAB-1K, FGVC, the demo suite) has one column per task in the suite's
order, a mean per task group when the suite has several groups (VTAB: Natural,
Specialized, Structured), the mean over all tasks, the mean of the group means, and the
trainable parameters without the head. Rows come in blocks, one per method: the measured
row, then the published row for the same method when a reference file has one, each
labelled with the method's name. A summary column is computed only from complete rows:
a missing task makes its group mean missing, never a mean over fewer tasks.

A suite whose final runs also evaluate their models on evaluation-only sets
(protocol.extra_evaluations: SSF's GIC table scores the ImageNet-1K models on ImageNet-A, -R
and -C) gets one column per set after the tasks, its headline figure as the records name it
(top-1, or ImageNet-C's mean corruption error, where lower is better and the lowest is bold).
Those columns are in no mean: the means are over the fitted tasks.

A measured cell is flagged when it should not be read as a method's accuracy: its grid point
lies on the edge of the tuning grid (`edge`, from the selection file), its mean is at chance
(`chance`: within CHANCE_MARGIN points of 100 / num_classes, or below) or its seeds disagree
by more than SPREAD_LIMIT points (`spread`). A published row carries what is known of how
it was made (its provenance file): the data, the checkpoint, how its number was chosen, the
seeds, the epochs and the source; a number chosen on the test split is marked with a dagger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import pandas as pd

from san.report.results import TOP1, ReportError

MEAN_ALL = "mean"
MEAN_OF_GROUPS = "mean of groups"
PARAMS = "params (M)"
DELTA = "Δ mean vs published"

# A final cell "at chance": its mean is no more than this many points above 100 / num_classes
# (num_classes from the records). Five points is over three standard errors of a 500-image
# test split at 12.5% (one is 1.5 points), and far below what a method that learned anything
# scores on the demo or VTAB tasks.
CHANCE_MARGIN = 5.0
# A final cell whose seeds' results span more than this many points (max - min).
SPREAD_LIMIT = 10.0
FLAG_TEXT = {
    "edge": "grid edge: widen (the chosen value is the largest or smallest tried on a grid axis)",
    "chance": f"at chance (mean within {CHANCE_MARGIN:g} points of 100 / num_classes, or below)",
    "spread": f"seed spread over {SPREAD_LIMIT:g} points (max - min over seeds)",
}
# Published numbers chosen on the test split (provenance `selection`), marked with TEST_MARK.
TEST_CHOSEN = {"test_max_over_epochs"}
TEST_MARK = "†"
PROVENANCE_TEXT = {
    "data": {
        "tfds": "tfds (in memory)",
        "noah_jpeg": "NOAH JPEG release",
        "torchvision": "torchvision's copy (timm's torch/<name> dataset)",
        "unknown": "unknown",
    },
    "checkpoint": {
        "orig_in21k": "original ViT-B_16.npz (orig_in21k)",
        "augreg_in21k": "AugReg in21k (augreg_in21k)",
        "unknown": "unknown",
    },
    "selection": {
        "val200_last_epoch": "hyperparameters on val200, test top-1 of the last epoch",
        "test_max_over_epochs": "test accuracy maximised over epochs",
        "unknown": "unknown",
    },
}


# The headline figures of evaluation-only sets (results.SUMMARY_HEADLINES): the column's
# suffix, the footnote's text, and which are better lower.
METRIC_SUFFIX = {TOP1: "", "mce": " mCE"}
METRIC_TEXT = {
    TOP1: "top-1 (%)",
    "mce": "mean corruption error (%; Hendrycks & Dietterich, AlexNet-normalised; lower is better, bold is lowest)",
}
LOWER_IS_BETTER = {"mce"}


class MixedBackbonesError(ReportError):
    pass


@dataclass(frozen=True)
class EvaluationColumn:
    """A further test set the final models of `task` were evaluated on after training."""

    task: str
    dataset: str
    metric: str  # the key of its headline figure in the record: "top1", "mce"
    label: str  # the column's name in the table


def evaluation_columns(evaluated: Sequence[tuple[str, Mapping[str, str]]]) -> list[EvaluationColumn]:
    """Columns for (task, {set: metric}) pairs, in the order given, each set once per task;
    a set evaluated after two tasks names its task in both columns."""
    seen: dict[tuple[str, str], str] = {}
    for task, metrics in evaluated:
        for dataset, metric in metrics.items():
            seen.setdefault((task, dataset), metric)
    tasks_of: dict[str, set[str]] = {}
    for task, dataset in seen:
        tasks_of.setdefault(dataset, set()).add(task)
    columns = []
    for (task, dataset), metric in seen.items():
        name = dataset if len(tasks_of[dataset]) == 1 else f"{task}: {dataset}"
        columns.append(EvaluationColumn(task, dataset, metric, name + METRIC_SUFFIX.get(metric, f" {metric}")))
    return columns


def recorded_evaluations(frame: pd.DataFrame) -> list[tuple[str, dict[str, str]]]:
    """(task, {set: metric}) of the records' extra evaluations, in the frame's order."""
    if frame.empty or "extra_evaluations" not in frame:
        return []
    return [
        (task, {name: entry["metric"] for name, entry in evaluations.items()})
        for task, evaluations in zip(frame["task"], frame["extra_evaluations"])
        if isinstance(evaluations, dict) and evaluations
    ]


@dataclass
class Score:
    mean: float | None = None
    std: float | None = None
    seeds: int = 0
    spread: float | None = None  # max - min over seeds
    flags: list[str] = field(default_factory=list)  # keys of FLAG_TEXT

    @property
    def missing(self) -> bool:
        return self.mean is None


@dataclass
class Row:
    method: str
    source: str  # "measured", "published"; in a literature table also "max over epochs" and "gap"
    cells: dict[str, Score]
    note: str = ""
    marker: str = ""  # TEST_MARK when the row's number was chosen on the test split

    @property
    def label(self) -> str:
        return self.method if self.source == "measured" else f"{self.method} ({self.source}){self.marker}"


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
    flagged: list[tuple[str, str, str, str]] = field(default_factory=list)  # (method, task, flag, detail)
    show_params: bool = True
    evaluations: list[EvaluationColumn] = field(default_factory=list)
    # (method, evaluation column) without a measured value
    missing_evaluations: list[tuple[str, EvaluationColumn]] = field(default_factory=list)

    @property
    def summary_columns(self) -> list[str]:
        group_columns = [name.capitalize() for name in self.groups] if len(self.groups) > 1 else []
        return [*group_columns, MEAN_ALL, *([MEAN_OF_GROUPS] if len(self.groups) > 1 else [])]

    @property
    def columns(self) -> list[str]:
        extra = [DELTA] if any(r.source == "published" for r in self.rows) else []
        evaluations = [e.label for e in self.evaluations]
        return [*self.tasks, *evaluations, *self.summary_columns, *([PARAMS] if self.show_params else []), *extra]

    @property
    def lower_is_better(self) -> set[str]:
        return {e.label for e in self.evaluations if e.metric in LOWER_IS_BETTER}

    def best(self, column: str) -> float | None:
        """The best measured value of a column (bold in the rendered table): the lowest where
        lower is better (an error), else the highest."""
        if column in (PARAMS, DELTA):
            return None
        values = [
            r.cells[column].mean
            for r in self.rows
            if r.source == "measured" and column in r.cells and not r.cells[column].missing
        ]
        if not values:
            return None
        return min(values) if column in self.lower_is_better else max(values)


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


def _chance_level(rows: pd.DataFrame) -> float | None:
    """100 / num_classes of the cell's records; None when they do not say (older records)."""
    classes = rows["num_classes"].dropna().unique() if "num_classes" in rows else []
    return 100.0 / float(classes[0]) if len(classes) == 1 else None


def _score(rows: pd.DataFrame, column: str) -> Score:
    values = rows[column].dropna().astype(float).tolist()
    if not values:
        return Score()
    std = pd.Series(values).std(ddof=1) if len(values) > 1 else None
    spread = max(values) - min(values) if len(values) > 1 else None
    return Score(sum(values) / len(values), std, len(values), spread)


def _evaluation_score(rows: pd.DataFrame, evaluation: EvaluationColumn) -> Score:
    """The headline figure of `evaluation` over the seeds of its task's records."""
    values = [
        (entry.get(evaluation.dataset) or {}).get("value")
        for entry in rows.loc[rows.task == evaluation.task, "extra_evaluations"]
        if isinstance(entry, dict)
    ]
    return _score(pd.DataFrame({"value": [v for v in values if v is not None]}, dtype=float), "value")


def measured_row(
    frame: pd.DataFrame,
    method: str,
    tasks: list[str],
    groups: dict[str, list[str]],
    grid_edges: Mapping[tuple[str, str], str] | None = None,
    column: str = "top1",
    source: str = "measured",
    evaluations: Sequence[EvaluationColumn] = (),
) -> Row:
    """The method's row from `column` of its records (`top1`: the last epoch's test top-1),
    each task's cell flagged where it sits on a grid edge, at chance or spread over seeds; then
    each evaluation column from its task's records (no flags: a robustness set's accuracy is
    meant to be low)."""
    rows = frame[frame.method == method]
    cells: dict[str, Score] = {}
    for task in tasks:
        task_rows = rows[rows.task == task]
        cell = cells[task] = _score(task_rows, column)
        if cell.missing:
            continue
        if (method, task) in (grid_edges or {}):
            cell.flags.append("edge")
        chance = _chance_level(task_rows)
        if chance is not None and cell.mean <= chance + CHANCE_MARGIN:
            cell.flags.append("chance")
        if cell.spread is not None and cell.spread > SPREAD_LIMIT:
            cell.flags.append("spread")
    cells.update(_summaries(cells, tasks, groups))
    cells.update({e.label: _evaluation_score(rows, e) for e in evaluations})
    params = rows["params_without_head"].dropna()
    cells[PARAMS] = Score(float(params.iloc[0]) / 1e6 if not params.empty else None)
    return Row(method, source, cells)


def published_row(
    reference: pd.Series,
    tasks: list[str],
    groups: dict[str, list[str]],
    source: str,
    provenance: Mapping[str, str] | None = None,
    evaluations: Sequence[EvaluationColumn] = (),
) -> Row:
    def published(column: str) -> Score:
        return Score(float(reference[column]) if column in reference and not pd.isna(reference[column]) else None)

    cells = {t: published(t) for t in tasks}
    cells.update(_summaries(cells, tasks, groups))
    cells.update({e.label: published(e.label) for e in evaluations})
    params = reference.get("params_m")
    cells[PARAMS] = Score(float(params) if params is not None and not pd.isna(params) else None)
    marker = TEST_MARK if provenance and provenance.get("selection") in TEST_CHOSEN else ""
    return Row(str(reference["method"]), "published", cells, note=source, marker=marker)


def provenance_note(row: Row, provenance: Mapping[str, str]) -> str:
    """How a published row was made, in words, from its provenance entry."""
    text = {key: PROVENANCE_TEXT[key].get(provenance[key], provenance[key]) for key in PROVENANCE_TEXT}
    return (
        f"{row.label}: {provenance['produced_by']}; data: {text['data']}; checkpoint: {text['checkpoint']}; "
        f"number chosen by: {text['selection']}; seeds: {provenance['seeds']}; epochs: {provenance['epochs']}. "
        f"Source: {provenance['source']}"
    )


def _flag_footnotes(table: "SuiteTable") -> list[str]:
    notes = []
    for flag, text in FLAG_TEXT.items():
        cells = [(m, t, detail) for m, t, f, detail in table.flagged if f == flag]
        if cells:
            listed = "; ".join(f"{m} x {t}" + (f" ({detail})" if detail else "") for m, t, detail in cells)
            notes.append(f"[{flag}] {text}: {listed}.")
    return notes


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
    provenance: pd.DataFrame | None = None,
    grid_edges: Mapping[tuple[str, str], str] | None = None,
    method_notes: Mapping[str, str] | None = None,
    evaluations: Sequence[EvaluationColumn] | None = None,
) -> SuiteTable:
    """`frame`: final results of one backbone on one suite (see results.load_final_results).
    `provenance`: how each published row was made (by method); `grid_edges`: (method, task) ->
    the selection's edge description; `method_notes`: registered method -> what it is;
    `evaluations`: the further test sets' columns (None: those the records carry)."""
    if evaluations is None:
        order = {task: index for index, task in enumerate(tasks)}
        recorded = sorted(recorded_evaluations(frame), key=lambda pair: order.get(pair[0], len(order)))
        evaluations = evaluation_columns(recorded)
    evaluations = list(evaluations)
    backbones = sorted(frame.backbone.unique()) if not frame.empty else []
    if len(backbones) > 1:
        raise MixedBackbonesError(f"one table holds one backbone; {title!r} got {backbones}: build one per backbone")
    backbone = backbones[0] if backbones else "-"
    methods = methods or sorted(frame.method.unique())
    rows: list[Row] = []
    published_by_method = (
        {} if published is None else {str(m): r for m, r in published.set_index("method", drop=False).iterrows()}
    )
    made = {} if provenance is None else {str(r["method"]): r.to_dict() for _, r in provenance.iterrows()}
    for method in methods:
        row = measured_row(frame, method, tasks, groups, grid_edges, evaluations=evaluations)
        rows.append(row)
        if method in published_by_method:
            reference = published_row(
                published_by_method[method], tasks, groups, published_source, made.get(method), evaluations
            )
            rows.append(reference)
            mine, theirs = row.cells[MEAN_ALL].mean, reference.cells[MEAN_ALL].mean
            row.cells[DELTA] = Score(None if mine is None or theirs is None else mine - theirs)
    for method, reference in published_by_method.items():
        if method not in methods:
            rows.append(published_row(reference, tasks, groups, published_source, made.get(method), evaluations))
    for row in rows:
        row.cells.setdefault(DELTA, Score())
    missing = [(r.method, t) for r in rows if r.source == "measured" for t in tasks if r.cells[t].missing]
    flagged = [
        (r.method, t, flag, _flag_detail(flag, r.cells[t], (grid_edges or {}).get((r.method, t), "")))
        for r in rows
        if r.source == "measured"
        for t in tasks
        for flag in r.cells[t].flags
    ]
    table = SuiteTable(title, suite, backbone, tasks, groups, rows, missing=missing, flagged=flagged)
    table.evaluations = evaluations
    table.missing_evaluations = [
        (r.method, e) for r in rows if r.source == "measured" for e in evaluations if r.cells[e.label].missing
    ]
    seeds = sorted(
        {c.seeds for r in rows if r.source == "measured" for t, c in r.cells.items() if t in tasks and c.seeds}
    )
    table.footnotes.append(
        f"Test top-1 (%), last epoch, mean ± sample std over seeds (seeds per cell: "
        f"{', '.join(map(str, seeds)) or '-'}); summary columns are means of the per-task means and are blank when a "
        "task is missing. Bold: best measured value."
    )
    table.footnotes += _evaluation_footnotes(evaluations)
    with_head = frame.groupby("method")["params_trainable"].mean() / 1e6 if not frame.empty else pd.Series(dtype=float)
    if not with_head.empty:
        table.footnotes.append(
            "Parameters without the head; with the head (mean over tasks): "
            + ", ".join(f"{m} {v:.3f} M" for m, v in with_head.items())
            + "."
        )
    table.footnotes += _flag_footnotes(table)
    notes = _method_notes(frame, methods, method_notes or {})
    if notes:
        table.footnotes.append("Methods: " + " ".join(notes))
    published_rows = [r for r in rows if r.source == "published"]
    if published_rows:
        table.footnotes.append(
            f"Published rows: {published_source}. They are reference values, not measured here; "
            f"{DELTA} = measured mean - published mean."
        )
    if any(r.marker == TEST_MARK for r in published_rows):
        table.footnotes.append(
            f"{TEST_MARK} Chosen on the test split: the code that made the number evaluates test during training "
            "and reports its best epoch, which a last-epoch number with hyperparameters chosen on val200 (ours) "
            "cannot be expected to match (protocol.literature_curve measures the gap)."
        )
    table.footnotes += [provenance_note(r, made[r.method]) for r in published_rows if r.method in made]
    return table


def _evaluation_footnotes(evaluations: Sequence[EvaluationColumn]) -> list[str]:
    """What each evaluation column holds, one sentence per fitted task whose models it scores."""
    notes = []
    for task in dict.fromkeys(e.task for e in evaluations):
        columns = [e for e in evaluations if e.task == task]
        described = "; ".join(
            f"{', '.join(e.label for e in columns if e.metric == metric)}: {METRIC_TEXT.get(metric, metric)}"
            for metric in dict.fromkeys(e.metric for e in columns)
        )
        notes.append(
            f"The {task} final models evaluated after training on further test sets (protocol.extra_evaluations), "
            f"as each set's dataset config scores it, mean over seeds: {described}. These columns are in no mean."
        )
    return notes


def _flag_detail(flag: str, cell: Score, edge: str) -> str:
    if flag == "edge":
        return edge
    if flag == "spread":
        return f"spread {cell.spread:.1f}"
    return f"mean {cell.mean:.1f}"


def _method_notes(frame: pd.DataFrame, methods: list[str], notes: Mapping[str, str]) -> list[str]:
    """`san (and san_recal): SAN reading A ...` for each registered method with a note whose
    rows (its own or labelled variants') are in the table."""
    if frame.empty or "registered_method" not in frame:
        of = {m: m for m in methods}
    else:
        of = dict(frame.drop_duplicates("method").set_index("method")["registered_method"])
    out = []
    for registered, note in notes.items():
        labels = [m for m in methods if of.get(m, m) == registered]
        if labels:
            out.append(f"{', '.join(labels)}: {note}.")
    return out


def build_literature_table(frame: pd.DataFrame, table: SuiteTable) -> SuiteTable | None:
    """Beside each measured row whose final runs kept a literature curve (protocol.literature_curve):
    the same runs' best test epoch (max over epochs, what much research code reports) and the gap
    between the two. None when no record has a curve."""
    curves = frame[frame["literature_max_top1"].notna()] if "literature_max_top1" in frame else frame.iloc[0:0]
    if curves.empty:
        return None
    methods = [r.method for r in table.rows if r.source == "measured" and r.method in set(curves.method)]
    rows: list[Row] = []
    for method in methods:
        ours = measured_row(curves, method, table.tasks, table.groups)
        best = measured_row(curves, method, table.tasks, table.groups, column="literature_max_top1")
        best.source, best.marker = "max over epochs", TEST_MARK
        gap = Row(method, "gap", {})
        for column in [*table.tasks, *table.summary_columns]:
            a, b = best.cells[column].mean, ours.cells[column].mean
            gap.cells[column] = Score(None if a is None or b is None else a - b)
        rows += [ours, best, gap]
    every = ", ".join(str(int(k)) for k in sorted(curves["literature_every"].dropna().unique()))
    literature = SuiteTable(
        f"{table.title}: literature protocol", table.suite, table.backbone, table.tasks, table.groups, rows
    )
    literature.show_params = False
    literature.footnotes.append(
        f"The same final runs also evaluated the test split every {every} epochs (protocol.literature_curve). "
        f"measured: ours, the last epoch with hyperparameters chosen on val200. max over epochs{TEST_MARK}: each "
        "run's best test top-1 over those evaluations and the last, mean over seeds: the number much published "
        "research code reports (V-PETL Bench, NOAH, SSF), chosen on test. gap = max over epochs - measured."
    )
    return literature


def efficiency_frame(frame: pd.DataFrame, flops: dict[str, float] | None = None) -> pd.DataFrame:
    """Per method: trainable parameters, FLOPs per image, peak memory, optimizer state and
    throughputs (from the records)."""
    if frame.empty:
        return pd.DataFrame()
    grouped = frame.groupby("method")
    optimizer_state = pd.to_numeric(frame["optimizer_state_bytes"], errors="coerce")  # None where unrecorded
    table = pd.DataFrame(
        {
            # mean over the method's tasks: a method's count can differ per task (VPT's prompt length)
            "params without head (M)": grouped["params_without_head"].mean() / 1e6,
            "train images/s": grouped["train_images_per_s"].mean(),
            "eval images/s (unmerged)": grouped["eval_images_per_s"].mean(),
            "peak memory (GiB)": grouped["peak_mem_bytes"].max() / 2**30,
            # part of the peak: AdamW's two moments, or GaLore's low-rank state (its claim); blank
            # for records written before runs counted it
            "optimizer state (MiB)": optimizer_state.groupby(frame["method"]).max() / 2**20,
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
