"""The GIC table (SSF's general image classification: full-data CIFAR-100 and ImageNet-1K, and the
ImageNet-1K models on ImageNet-A/R/C) from fixture records, and the optimizer-state column of the
efficiency table.

The records carry the run config `experiment=gic` composes (protocol.extra_evaluations and the
sets' configs under extra_datasets), so the columns come from the same config data a real run
writes; the ImageNet-C figure is Hendrycks & Dietterich's mCE computed by san.data.hendrycks.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import pandas as pd
import pytest
from test_report import fixture_record

from san.config import compose_config
from san.data.hendrycks import CORRUPTIONS, SEVERITIES, imagenet_c_summary
from san.identity import resolved
from san.records import write_record
from san.report.report import published_provenance, published_reference, report_experiment, report_runs_dir
from san.report.results import ReportError, load_results_dir
from san.report.tables import DELTA, MEAN_ALL, PARAMS, PROVENANCE_TEXT, TEST_CHOSEN, TEST_MARK

BACKBONE = "vit_b16_in21k_augreg"  # experiment=gic's backbone (SSF's checkpoint)
TASKS = ["cifar100_full", "imagenet1k"]
MCE = "imagenet_c mCE"


@functools.cache
def gic_config(task: str) -> dict:
    """The resolved config of a GIC final run, as san.run keeps it in its record."""
    return resolved(compose_config(["experiment=gic", f"dataset={task}", "protocol=final"]))


def imagenet_c_results(top1: float) -> dict:
    """What san/robustness.py writes for ImageNet-C: per-split top-1 and their summary."""
    per_corruption = {c: {s: top1 - 2.0 * s - 0.1 * i for s in SEVERITIES} for i, c in enumerate(CORRUPTIONS)}
    per_split = {f"{c}/{s}": value for c, severities in per_corruption.items() for s, value in severities.items()}
    return {**imagenet_c_summary(per_corruption), "per_split": per_split, "images": 50_000 * len(per_split)}


def gic_record(
    root: Path,
    *,
    method: str,
    task: str,
    seed: int,
    top1: float,
    robust: tuple[float, float, float] | None = None,
    optimizer_state_bytes: int | None = None,
    params: int = 205_824,
) -> Path:
    """A complete GIC final record; `robust`: ImageNet-A top-1, ImageNet-R top-1 and the top-1 the
    ImageNet-C splits are derived from (None: no extra evaluation results in the record)."""
    path = fixture_record(
        root, method=method, task=task, seed=seed, top1=top1, backbone=BACKBONE, suite="gic", params=params
    )
    record = json.loads(path.read_text())
    config = gic_config(task)
    record.update(suite="gic", group=config["dataset"]["group"], task_order=TASKS, config=config)
    if robust is not None:
        a, r, c = robust
        record["metrics"]["extra_evaluations"] = {
            "imagenet_a": {"top1": a, "loss": 3.0, "images": 7500},
            "imagenet_r": {"top1": r, "loss": 2.0, "images": 30000},
            "imagenet_c": imagenet_c_results(c),
        }
    if optimizer_state_bytes is not None:
        record["cost"]["optimizer_state_bytes"] = optimizer_state_bytes
    return write_record(path.parent, record)


# method -> seed -> (cifar100_full top-1, imagenet1k top-1, (imagenet_a, imagenet_r, imagenet_c base top-1))
RESULTS = {
    "ssf": {0: (93.0, 81.0, (30.0, 50.0, 70.0)), 1: (94.0, 82.0, (32.0, 52.0, 72.0))},
    # best ImageNet-A top-1, yet the worst mCE: the two columns bold different rows
    "full": {0: (92.0, 83.0, (40.0, 45.0, 60.0))},
    # ImageNet-1K only, and a record from before the robustness evaluation
    "linear": {0: (None, 80.0, None)},
}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    for method, seeds in RESULTS.items():
        for seed, (cifar, imagenet, robust) in seeds.items():
            if cifar is not None:
                gic_record(tmp_path, method=method, task="cifar100_full", seed=seed, top1=cifar)
            gic_record(tmp_path, method=method, task="imagenet1k", seed=seed, top1=imagenet, robust=robust)
    return tmp_path


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def test_the_gic_table_has_the_robustness_columns_after_the_tasks(results, tmp_path):
    report = report_runs_dir(results / "runs", tmp_path / "t", with_flops=False, with_plots=False)
    (table,) = report.tables
    assert (table.suite, table.backbone, table.tasks) == ("gic", BACKBONE, TASKS)
    # the sets and their order are experiment=gic's protocol.extra_evaluations after imagenet1k
    assert gic_config("imagenet1k")["protocol"]["extra_evaluations"] == ["imagenet_a", "imagenet_r", "imagenet_c"]
    assert gic_config("cifar100_full")["protocol"]["extra_evaluations"] == []
    assert table.columns[:7] == [*TASKS, "imagenet_a", "imagenet_r", MCE, MEAN_ALL, PARAMS]
    assert [(e.task, e.dataset, e.metric) for e in table.evaluations] == [
        ("imagenet1k", "imagenet_a", "top1"),
        ("imagenet1k", "imagenet_r", "top1"),
        ("imagenet1k", "imagenet_c", "mce"),
    ]

    ssf = next(r for r in table.rows if r.method == "ssf" and r.source == "measured")
    seeds = RESULTS["ssf"].values()
    assert ssf.cells["imagenet_a"].mean == pytest.approx(mean(s[2][0] for s in seeds))
    assert ssf.cells["imagenet_r"].mean == pytest.approx(mean(s[2][1] for s in seeds))
    assert ssf.cells["imagenet_a"].seeds == 2 and ssf.cells["imagenet_a"].std is not None
    mces = [imagenet_c_summary_of(s[2][2]) for s in seeds]
    assert ssf.cells[MCE].mean == pytest.approx(mean(mces))
    # the mean is over the fitted tasks only, never over the robustness columns
    assert ssf.cells[MEAN_ALL].mean == pytest.approx(mean([mean(s[0] for s in seeds), mean(s[1] for s in seeds)]))

    linear = next(r for r in table.rows if r.method == "linear")
    assert linear.cells["cifar100_full"].missing and linear.cells[MEAN_ALL].missing
    assert all(linear.cells[c].missing for c in ("imagenet_a", "imagenet_r", MCE))
    assert not linear.cells["imagenet1k"].missing
    assert [(m, e.label) for m, e in table.missing_evaluations] == [
        ("linear", "imagenet_a"),
        ("linear", "imagenet_r"),
        ("linear", MCE),
    ]
    line = next(c for c in report.console if c.startswith(f"  missing linear x {MCE}:"))
    assert "scored by the imagenet1k final runs (protocol.extra_evaluations)" in line
    assert "dataset=imagenet1k" in line and "dataset=imagenet_c" not in line
    assert any(n.startswith("The imagenet1k final models evaluated after training") for n in table.footnotes)


def imagenet_c_summary_of(top1: float) -> float:
    return imagenet_c_results(top1)["mce"]


def test_the_lowest_mce_is_bold_and_the_highest_top1(results, tmp_path):
    report_runs_dir(results / "runs", tmp_path / "t", with_flops=False, with_plots=False)
    markdown = (tmp_path / "t" / f"gic_{BACKBONE}.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| method |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith("| ") and "| measured |" in line
    }
    mce_at, a_at = columns.index(MCE), columns.index("imagenet_a")
    mce = {
        m: imagenet_c_summary_of(mean(s[2][2] for s in seeds.values())) for m, seeds in RESULTS.items() if m != "linear"
    }
    a = {m: mean(s[2][0] for s in seeds.values()) for m, seeds in RESULTS.items() if m != "linear"}
    lowest_mce, highest_mce, best_a = min(mce, key=mce.get), max(mce, key=mce.get), max(a, key=a.get)
    assert lowest_mce != best_a  # the fixture makes the two columns disagree
    assert rows[lowest_mce][mce_at].startswith("**")
    assert not rows[highest_mce][mce_at].startswith("**")
    assert rows[best_a][a_at].startswith("**") and not rows[lowest_mce][a_at].startswith("**")
    assert rows["linear"][mce_at] == "—"
    assert "lower is better, bold is lowest" in markdown

    latex = (tmp_path / "t" / f"gic_{BACKBONE}.tex").read_text()
    assert r"\rotatebox{90}{imagenet\_c mCE}" in latex
    csv = pd.read_csv(tmp_path / "t" / f"gic_{BACKBONE}.csv")
    cell = csv[(csv.method == lowest_mce) & (csv.source == "measured") & (csv.column == MCE)]
    assert cell["mean"].iloc[0] == pytest.approx(
        mean(imagenet_c_summary_of(s[2][2]) for s in RESULTS[lowest_mce].values()), abs=1e-4
    )


def test_published_gic_rows_come_with_their_provenance(results, tmp_path):
    published, source = published_reference("gic", BACKBONE)
    provenance = published_provenance("gic", BACKBONE)
    assert published is not None and provenance is not None
    assert sorted(provenance.method) == sorted(published.method)
    report = report_runs_dir(results / "runs", tmp_path / "t", with_flops=False, with_plots=False)
    (table,) = report.tables
    markdown = (tmp_path / "t" / f"gic_{BACKBONE}.md").read_text()
    for _, reference in published.iterrows():
        fact = provenance.set_index("method").loc[reference.method]
        row = next(r for r in table.rows if r.method == reference.method and r.source == "published")
        assert row.marker == (TEST_MARK if fact.selection in TEST_CHOSEN else "")
        for column in [*TASKS, "imagenet_a", "imagenet_r", MCE]:
            value = reference.get(column)
            if pd.isna(value):
                assert row.cells[column].missing, column  # a number the source does not print stays blank
            else:
                assert row.cells[column].mean == pytest.approx(float(value))
        assert f"| {row.label} | published |" in markdown
        note = next(n for n in table.footnotes if n.startswith(f"{row.label}: "))
        for key, words in PROVENANCE_TEXT.items():
            assert words[fact[key]] in note
        assert f"Source: {fact.source}" in note
    measured_ssf = next(r for r in table.rows if r.method == "ssf" and r.source == "measured")
    published_ssf = next(r for r in table.rows if r.method == "ssf" and r.source == "published")
    if published_ssf.cells[MEAN_ALL].missing:  # the source prints no ImageNet-1K number for it
        assert measured_ssf.cells[DELTA].missing
    assert source in " ".join(table.footnotes)
    # a published file's columns that the report does not know would be silently dropped: none are
    known = {"method", "params_m", *TASKS, *(e.label for e in table.evaluations)}
    assert set(published.columns) <= known


def test_an_experiment_report_places_the_robustness_columns_before_any_record(tmp_path):
    report = report_experiment(
        ["experiment=gic", "plan.methods=[ssf]", f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path}"],
        tmp_path / "t",
        with_flops=False,
        with_plots=False,
    )
    (table,) = report.tables
    assert table.columns[:5] == [*TASKS, "imagenet_a", "imagenet_r", MCE]
    assert len(table.missing_evaluations) == 3


def test_an_unknown_split_summary_is_a_named_error(tmp_path):
    path = gic_record(tmp_path, method="ssf", task="imagenet1k", seed=0, top1=80.0, robust=(30.0, 50.0, 70.0))
    record = json.loads(path.read_text())
    record["config"]["extra_datasets"]["imagenet_c"]["split_summary"] = "my_summary"
    write_record(path.parent, record)
    with pytest.raises(ReportError, match=r"split_summary 'my_summary'; known: \['imagenet_c_mce'\]"):
        load_results_dir(tmp_path / "runs")


def test_the_efficiency_table_shows_the_optimizer_state(tmp_path):
    state = 3 * 2**20 + 2**19  # 3.5 MiB
    gic_record(tmp_path, method="galore", task="cifar100_full", seed=0, top1=90.0, optimizer_state_bytes=state)
    gic_record(tmp_path, method="galore", task="imagenet1k", seed=0, top1=80.0, optimizer_state_bytes=state // 2)
    gic_record(tmp_path, method="ssf", task="cifar100_full", seed=0, top1=90.0)  # written before the count
    report = report_runs_dir(tmp_path / "runs", tmp_path / "t", with_flops=False, with_plots=False)
    path = next(p for p in report.files if p.name.endswith("_efficiency.csv"))
    frame = pd.read_csv(io.StringIO(path.read_text()), index_col=0)
    # the largest over the method's records, in MiB
    assert frame.loc["galore", "optimizer state (MiB)"] == pytest.approx(state / 2**20)
    assert pd.isna(frame.loc["ssf", "optimizer state (MiB)"])
    markdown = path.with_suffix(".md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| method |"))
    at = [c.strip() for c in header.strip("|").split("|")].index("optimizer state (MiB)")
    ssf_line = next(line for line in markdown.splitlines() if line.startswith("| ssf |"))
    assert [c.strip() for c in ssf_line.strip("|").split("|")][at] == "—"
