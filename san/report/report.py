"""Result records -> the paper's tables and plots under results/tables/.

Two ways in: an experiment (`san-report experiment=vtab [backbone=...]`), whose final runs
are found through its selection files, so the table holds exactly that experiment; or a
whole runs directory (`san-report`), one table per suite x backbone, where two
configurations in one cell are an error rather than an average.

Every fact a table shows comes from the records (suite, group, task order, parameters,
FLOPs, data variant; an experiment's task with no record yet is placed by its run config,
as its records will be); the published numbers beside them ship with the package, each row
with what is known of how it was made (reference/provenance_*.csv). Cells are flagged from
the records (at chance, spread over seeds) and from the selection files (grid edge). Final
runs that kept a literature curve (protocol.literature_curve) get a second table: the same
runs' best test epoch beside our last epoch, and the gap. Final runs that also scored their
models on evaluation-only sets (protocol.extra_evaluations; `experiment=gic`: ImageNet-A/R/C
after ImageNet-1K) get a column per set, named and scored as their records and configs say.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from san.records import layout_facts
from san.report import render
from san.report.results import (
    LoadedResults,
    ReportError,
    extra_evaluation_metrics,
    load_final_results,
    load_results_dir,
)
from san.report.tables import (
    PROVENANCE_TEXT,
    TEST_MARK,
    SuiteTable,
    build_literature_table,
    build_suite_table,
    efficiency_frame,
    evaluation_columns,
    recorded_evaluations,
)

# A task whose records name no group (a dataset config without `group`) is in this one.
NO_GROUP = "all"


@dataclass
class TaskLayout:
    tasks: list[str]
    groups: dict[str, list[str]]


def listed_order(facts: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every task the facts' `task_order` lists name, the longest list first (an experiment
    lists a whole suite, a narrower one part of it in the same order)."""
    orders = {tuple(fact["task_order"]) for fact in facts if isinstance(fact["task_order"], (list, tuple))}
    return list(dict.fromkeys(task for order in sorted(orders, key=lambda o: (-len(o), o)) for task in order))


def task_layout(facts: Iterable[Mapping[str, Any]]) -> TaskLayout:
    """A table's columns from what its records say (`san.records.layout_facts`: task, group,
    task_order): the tasks in `listed_order`, then tasks no list names, sorted; kept
    together by group, groups in order of first appearance."""
    facts = list(facts)
    tasks = {fact["task"] for fact in facts}
    listed = [task for task in listed_order(facts) if task in tasks]
    group_of: dict[str, str] = {}
    for fact in facts:
        if isinstance(fact["group"], str):
            group_of.setdefault(fact["task"], fact["group"])
    groups: dict[str, list[str]] = {}
    for task in listed + sorted(tasks - set(listed)):
        groups.setdefault(group_of.get(task, NO_GROUP), []).append(task)
    return TaskLayout([task for members in groups.values() for task in members], groups)


def _recorded_facts(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return frame[["task", "group", "task_order"]].to_dict("records")


def _reference_root(reference_dir: Path | None):
    return Path(reference_dir) if reference_dir else resources.files("san") / "report" / "reference"


def _reference_entry(suite: str, backbone: str, reference_dir: Path | None) -> tuple[Any, dict | None]:
    root = _reference_root(reference_dir)
    sources = root / "sources.json"
    if not sources.is_file():
        return root, None
    for entry in json.loads(sources.read_text())["files"]:
        if entry["suite"] == suite and entry["backbone"] == backbone:
            return root, entry
    return root, None


def published_reference(
    suite: str, backbone: str, reference_dir: Path | None = None
) -> tuple[pd.DataFrame | None, str]:
    """The published numbers for a suite x backbone, with their source: from `reference_dir`
    when given, else from the files shipped in the package (san/report/reference)."""
    root, entry = _reference_entry(suite, backbone, reference_dir)
    if entry is None:
        return None, ""
    frame = pd.read_csv(io.StringIO((root / entry["file"]).read_text()), comment="#")
    return frame, f"{entry['source']} ({entry['file']}; {entry['params_note']})"


PROVENANCE_COLUMNS = ["method", "produced_by", "data", "checkpoint", "selection", "seeds", "epochs", "source"]


class ProvenanceError(ReportError, ValueError):
    """A provenance file is malformed: the message names the file, the row and the accepted values."""


def published_provenance(suite: str, backbone: str, reference_dir: Path | None = None) -> pd.DataFrame | None:
    """How each published row of a suite x backbone was made (the `provenance` file its
    sources.json entry names; None when it names none). Every fact is checked against the
    vocabulary the report prints (tables.PROVENANCE_TEXT); an unknown fact is written `unknown`."""
    root, entry = _reference_entry(suite, backbone, reference_dir)
    if entry is None or not entry.get("provenance"):
        return None
    name = entry["provenance"]
    frame = pd.read_csv(io.StringIO((root / name).read_text()), comment="#", dtype=str, keep_default_na=False)
    missing = [c for c in PROVENANCE_COLUMNS if c not in frame.columns]
    if missing:
        raise ProvenanceError(f"{name} lacks column(s) {missing}; a provenance file has {PROVENANCE_COLUMNS}")
    for _, row in frame.iterrows():
        for key, accepted in PROVENANCE_TEXT.items():
            if row[key] not in accepted:
                raise ProvenanceError(
                    f"{name}, method {row['method']!r}: {key} {row[key]!r} is not one of {sorted(accepted)}; "
                    "write unknown where the fact cannot be established"
                )
    return frame


def method_notes() -> dict[str, str]:
    """What a measured method is (SAN's two readings), keyed by registered method name; always
    from the package, whatever --reference-dir says (these describe this suite's methods)."""
    path = resources.files("san") / "report" / "reference" / "method_notes.json"
    return json.loads(path.read_text())["notes"]


def selection_edges(documents: Iterable[Mapping[str, Any]], frame: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(method, task) -> the grid-edge description of the selection whose chosen point the
    cell's final records refit, for the cells in `frame` whose selection lies on a grid edge."""
    from san.protocol.selection import edge_text  # light: no model code

    edges: dict[tuple[str, str], str] = {}
    for document in documents:
        if not document.get("grid_edge"):
            continue
        key = (document.get("method"), document.get("task"))
        chosen = tuple(document["chosen"]["overrides"])
        rows = frame[(frame.method == key[0]) & (frame.task == key[1]) & (frame.backbone == document.get("backbone"))]
        if not rows.empty and any(point == chosen for point in rows["point"]):
            edges[key] = "; ".join(edge_text(edge) for edge in document["grid_edge"])
    return edges


def _selection_documents(paths: Iterable[Path]) -> list[dict]:
    documents = []
    for path in paths:
        try:
            documents.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError):
            continue
    return documents


@dataclass
class ReportOutput:
    tables: list[SuiteTable] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    console: list[str] = field(default_factory=list)


def _write(path: Path, text: str, output: ReportOutput) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    output.files.append(path)


def latest_bench(bench_dir: Path) -> tuple[dict | None, Path | None]:
    files = sorted(Path(bench_dir).glob("bench-*.json"))
    return (json.loads(files[-1].read_text()), files[-1]) if files else (None, None)


def add_bench_columns(efficiency: pd.DataFrame, backbone: str, bench_dir: Path | None) -> str | None:
    """Inference unmerged / merged / plain from the latest `make bench` run, when it measured this backbone."""
    bench, path = latest_bench(bench_dir) if bench_dir else (None, None)
    if bench is None or efficiency.empty:
        return None
    rows = {r["method"]: r for r in bench["rows"] if r["backbone"] == backbone and "input_size" in r}
    if not rows:
        return None
    for key, column in (
        ("inference_unmerged", "infer unmerged img/s (bench)"),
        ("inference_merged", "infer merged img/s (bench)"),
        ("inference_plain", "infer plain img/s (bench)"),
    ):
        efficiency[column] = [rows.get(m, {}).get(key) for m in efficiency.index]
    sizes = sorted({r["input_size"] for r in rows.values()})
    return (
        f"inference columns marked (bench) from {path} ({bench['device']}, batch {bench['batch_size']}, "
        f"{'/'.join(map(str, sizes))} px)"
    )


def write_table(
    table: SuiteTable,
    stem: Path,
    output: ReportOutput,
    fill_hint: str,
    flops: dict | None,
    frame: pd.DataFrame,
    with_plots: bool = True,
    bench_dir: Path | None = None,
) -> None:
    _write(stem.with_suffix(".md"), render.to_markdown(table), output)
    _write(stem.with_suffix(".tex"), render.to_latex(table), output)
    _write(stem.with_suffix(".csv"), render.to_csv(table), output)
    efficiency = efficiency_frame(frame, flops)
    bench_note = add_bench_columns(efficiency, table.backbone, bench_dir)
    title = f"Efficiency: {table.title} ({table.backbone})" + (f"; {bench_note}" if bench_note else "")
    efficiency_stem = stem.with_name(stem.name + "_efficiency")
    _write(efficiency_stem.with_suffix(".md"), render.frame_to_markdown(efficiency, title), output)
    _write(efficiency_stem.with_suffix(".tex"), render.frame_to_latex(efficiency, title), output)
    _write(efficiency_stem.with_suffix(".csv"), efficiency.to_csv(float_format="%.6g"), output)
    if with_plots:
        from san.report import plots  # matplotlib: imported only when plots are asked for

        output.files += plots.accuracy_vs_params(table, stem.with_name(stem.name + "_accuracy_vs_params"))
        output.files += plots.per_task_bars(table, stem.with_name(stem.name + "_per_task"))
    output.tables.append(table)
    literature = build_literature_table(frame, table)
    if literature is not None:
        literature_stem = stem.with_name(stem.name + "_literature")
        _write(literature_stem.with_suffix(".md"), render.to_markdown(literature), output)
        _write(literature_stem.with_suffix(".tex"), render.to_latex(literature), output)
        _write(literature_stem.with_suffix(".csv"), render.to_csv(literature), output)
        output.tables.append(literature)
    measured = [r for r in table.rows if r.source == "measured"]
    cells = len(measured) * len(table.tasks)
    seeds = sorted({c.seeds for r in measured for t, c in r.cells.items() if t in table.tasks and c.seeds})
    output.console.append(
        f"{table.title} ({table.backbone}): {cells - len(table.missing)}/{cells} cells complete, "
        f"seeds per cell {seeds or '-'} -> {stem}.md"
    )
    if not frame.empty:
        variants = frame.groupby("data_variant").size()
        output.console.append(
            "  data: " + ", ".join(f"{variant} ({count} records)" for variant, count in variants.items())
        )
    for method, task in table.missing:
        output.console.append(f"  missing {method} x {task}: {fill_hint.format(method=method, task=task)}")
    for method, evaluation in table.missing_evaluations:
        output.console.append(
            f"  missing {method} x {evaluation.label}: scored by the {evaluation.task} final runs "
            f"(protocol.extra_evaluations); {fill_hint.format(method=method, task=evaluation.task)}"
        )
    for method, task, flag, detail in table.flagged:
        output.console.append(f"  [{flag}] {method} x {task}: {detail}")
    chosen_on_test = [r.method for r in table.rows if r.source == "published" and r.marker == TEST_MARK]
    if chosen_on_test:
        output.console.append(f"  published rows chosen on test ({TEST_MARK}): {', '.join(chosen_on_test)}")
    if literature is not None:
        output.console.append(f"  literature protocol: {literature_stem}.md")


def _flops(frame: pd.DataFrame) -> dict[str, float]:
    """Forward FLOPs per image per method: the mean over its records of the figure each run
    counted for its own task (VPT's prompt length and the head differ per task). Read from the
    records only: the report builds no model. Methods whose records predate the count are left out."""
    counted = frame.dropna(subset=["forward_flops_per_image"])
    return {method: float(rows["forward_flops_per_image"].mean()) for method, rows in counted.groupby("method")}


def report_runs_dir(
    runs_dir: Path, out_dir: Path, with_flops: bool = True, with_plots: bool = True, reference_dir: Path | None = None
) -> ReportOutput:
    loaded = load_results_dir(runs_dir)
    output = ReportOutput()
    output.console.append(f"{len(loaded.frame)} final records; skipped: {loaded.skipped_text()}")
    # the sweeps next to the runs: their selection files say which cells sit on a grid edge
    documents = _selection_documents(sorted((Path(runs_dir).parent / "sweeps").glob("*/*/selection/*/*.json")))
    for (suite, backbone), frame in loaded.frame.groupby(["suite", "backbone"]):
        facts = _recorded_facts(frame)
        layout = task_layout(facts)
        published, source = published_reference(suite, backbone, reference_dir)
        table = build_suite_table(
            frame,
            title=suite,
            suite=suite,
            tasks=layout.tasks,
            groups=layout.groups,
            published=published,
            published_source=source,
            provenance=published_provenance(suite, backbone, reference_dir),
            grid_edges=selection_edges(documents, frame),
            method_notes=method_notes(),
        )
        # A runs directory knows a task only from its records: one its experiment lists but
        # no record is of has no column (nor a group), so say that the means leave it out.
        unrecorded = [task for task in listed_order(facts) if task not in layout.tasks]
        if unrecorded:
            note = (
                f"No record of {', '.join(unrecorded)} (listed by the records' experiment): "
                f"the means cover the {len(layout.tasks)} tasks shown."
            )
            table.footnotes.append(note)
            output.console.append(f"  {suite} ({backbone}): {note}")
        write_table(
            table,
            out_dir / f"{suite}_{backbone}",
            output,
            f"san-sweep experiment={suite} backbone={backbone} method={{method}} dataset={{task}}",
            _flops(frame) if with_flops else None,
            frame,
            with_plots,
            Path(runs_dir).parent / "bench",
        )
    return output


def report_experiment(
    overrides: list[str],
    out_dir: Path | None = None,
    with_flops: bool = True,
    with_plots: bool = True,
    reference_dir: Path | None = None,
) -> ReportOutput:
    from san.protocol.plan import Cell, Plan  # composes configs; not needed for a runs-directory report
    from san.protocol.selection import read_chosen_point

    plan = Plan(overrides)
    out_dir = out_dir or plan.results_dir / "tables"
    record_paths, unselected, selections = [], [], []
    for cell in plan.cells:
        selection = plan.selection_path(cell)
        if not selection.is_file():
            unselected.append(cell)
            continue
        selections.append(selection)
        seed_dir = plan.final_jobs(cell, read_chosen_point(selection))[0].run_dir
        record_paths += [seed_dir.parent / f"seed{seed}" / "record.json" for seed in plan.seeds]
    loaded: LoadedResults = load_final_results([p for p in record_paths if p.is_file()])
    output = ReportOutput()
    output.console.append(
        f"{plan.name} on {plan.backbone}: {len(loaded.frame)} final records of "
        f"{len(plan.cells) * len(plan.seeds)} expected; skipped: {loaded.skipped_text()}"
    )
    if unselected:
        output.console.append(f"  {len(unselected)} cell(s) have no selection yet (tune stage incomplete)")
    # A task with no record yet still gets its (missing) column, so no mean covers fewer tasks
    # than the experiment has; its place is what its records will say (from its run config).
    recorded, first_method = set(loaded.frame.task), next(iter(plan.methods))
    pending_configs = {
        task: plan.final_jobs(Cell(plan.backbone, first_method, task), ())[0].config
        for task in plan.tasks
        if task not in recorded
    }
    layout = task_layout(_recorded_facts(loaded.frame) + [layout_facts(c) for c in pending_configs.values()])
    # the further test sets a task's final runs evaluate, where its records will say them
    evaluated: dict[str, dict[str, str]] = {}
    for task, metrics in recorded_evaluations(loaded.frame):
        evaluated.setdefault(task, {}).update(metrics)
    evaluated.update({task: extra_evaluation_metrics(config) for task, config in pending_configs.items()})
    evaluations = evaluation_columns([(task, evaluated[task]) for task in layout.tasks if evaluated.get(task)])
    suites = sorted(loaded.frame.suite.unique()) or ["-"]
    published, source = published_reference(suites[0], plan.backbone, reference_dir) if len(suites) == 1 else (None, "")
    provenance = published_provenance(suites[0], plan.backbone, reference_dir) if len(suites) == 1 else None
    table = build_suite_table(
        loaded.frame,
        title=plan.name,
        suite=suites[0],
        tasks=layout.tasks,
        groups=layout.groups,
        methods=list(plan.methods),
        published=published,
        published_source=source,
        provenance=provenance,
        grid_edges=selection_edges(_selection_documents(selections), loaded.frame),
        method_notes=method_notes(),
        evaluations=evaluations,
    )
    table.backbone = plan.backbone
    hint = f"san-sweep experiment={plan.name} backbone={plan.backbone} method={{method}} dataset={{task}}"
    write_table(
        table,
        out_dir / f"{plan.name}_{plan.backbone}",
        output,
        hint,
        _flops(loaded.frame) if with_flops and not loaded.frame.empty else None,
        loaded.frame,
        with_plots,
        plan.results_dir / "bench",
    )
    return output
