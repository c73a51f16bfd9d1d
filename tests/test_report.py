"""The report generator: golden tables from fixture records, means, missing cells, bad input.

Golden files are written by this test (SAN_UPDATE_GOLDEN=1 pytest tests/test_report.py),
never edited by hand; without that variable the test compares byte for byte.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from san.records import SCHEMA_VERSION, write_record
from san.report.report import TaskLayout, published_reference, report_experiment, report_runs_dir
from san.report.results import ConflictingResultsError, load_results_dir
from san.report.tables import DELTA, MEAN_ALL, MEAN_OF_GROUPS, PARAMS, MixedBackbonesError, build_suite_table

GOLDEN = Path(__file__).parent / "golden" / "report"
VTAB_GROUPS = {
    "natural": ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"],
    "specialized": ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"],
    "structured": [
        "clevr_count",
        "clevr_dist",
        "dmlab",
        "kitti",
        "dsprites_loc",
        "dsprites_ori",
        "smallnorb_azi",
        "smallnorb_ele",
    ],
}
VTAB = TaskLayout([task for members in VTAB_GROUPS.values() for task in members], VTAB_GROUPS)
UNSET = object()


def fixture_record(
    root: Path,
    *,
    method: str,
    task: str,
    seed: int,
    top1: float,
    backbone: str = "vit_b16_in21k",
    suite: str = "vtab",
    identity: str | None = None,
    status: str = "complete",
    schema: int = SCHEMA_VERSION,
    params: int = 205_824,
    task_order=UNSET,
) -> Path:
    """A final record as san.run writes it (`task_order`: the experiment's list; UNSET: VTAB's
    for a VTAB record, none otherwise; None leaves the field out, as older records do)."""
    identity = identity or f"{method}-config"
    group = next(g for g, members in VTAB.groups.items() if task in members) if suite == "vtab" else "fgvc"
    if task_order is UNSET:
        task_order = VTAB.tasks if suite == "vtab" else None
    record = {
        "schema": schema,
        "status": status,
        "stage": "final",
        "suite": suite,
        "task": task,
        "group": group,
        **({"task_order": task_order} if task_order is not None else {}),
        "backbone": {"name": backbone},
        "method": {"name": method},
        "seed": seed,
        "identity": identity,
        "splits": {"fit": "trainval", "evaluate": "test"},
        "metrics": {"final": {"test_top1": top1}},
        "params": {"trainable": params + 768 * 10, "trainable_without_head": params},
        "cost": {
            "train_images_per_s": 100.0 + seed,
            "eval_images_per_s": 400.0,
            "peak_mem_bytes": 2**30,
            "peak_mem_kind": "process_max_rss",
        },
        "env": {"device": "cpu"},
    }
    run_dir = root / "runs" / suite / task / backbone / method / "final" / identity / f"seed{seed}"
    return write_record(run_dir, record)


def ssf_value(index: int, seed: int) -> float:
    return 50.0 + index + (1.0 if seed else -1.0)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """ssf: all 19 tasks, seeds 0 and 1; san: kitti missing, one seed; plus records to skip."""
    for index, task in enumerate(VTAB.tasks):
        for seed in (0, 1):
            fixture_record(tmp_path, method="ssf", task=task, seed=seed, top1=ssf_value(index, seed))
        if task != "kitti":
            fixture_record(tmp_path, method="san", task=task, seed=0, top1=60.0 + index)
    fixture_record(tmp_path, method="san", task="kitti", seed=1, top1=99.0, status="failed")
    fixture_record(tmp_path, method="san", task="kitti", seed=2, top1=99.0, schema=0, identity="old")
    return tmp_path


def test_golden_tables(results, tmp_path):
    out = tmp_path / "tables"
    report = report_runs_dir(results / "runs", out, with_flops=False, with_plots=False)
    names = sorted(p.name for p in report.files)
    assert names == sorted(
        f"vtab_vit_b16_in21k{suffix}{ext}" for suffix in ("", "_efficiency") for ext in (".md", ".tex", ".csv")
    )
    update = os.environ.get("SAN_UPDATE_GOLDEN") == "1"
    for path in report.files:
        golden = GOLDEN / path.name
        if update:
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(path.read_text())
        assert golden.is_file(), f"no golden file {golden}; run with SAN_UPDATE_GOLDEN=1 once"
        assert path.read_text() == golden.read_text(), f"{path.name} differs from {golden}"


def test_group_means_and_missing_cells(results):
    loaded = load_results_dir(results / "runs")
    assert loaded.skipped == {"failed": 1, "schema 0 (this version reads 1)": 1}
    published, source = published_reference("vtab", "vit_b16_in21k")
    table = build_suite_table(
        loaded.frame,
        title="vtab",
        suite="vtab",
        tasks=VTAB.tasks,
        groups=VTAB.groups,
        methods=["ssf", "san"],
        published=published,
        published_source=source,
    )
    ssf = next(r for r in table.rows if r.method == "ssf" and r.source == "measured")
    per_task = {task: 50.0 + i for i, task in enumerate(VTAB.tasks)}
    natural = [per_task[t] for t in VTAB.groups["natural"]]
    specialized = [per_task[t] for t in VTAB.groups["specialized"]]
    structured = [per_task[t] for t in VTAB.groups["structured"]]
    assert (len(natural), len(specialized), len(structured)) == (7, 4, 8)
    group_means = [sum(g) / len(g) for g in (natural, specialized, structured)]
    assert ssf.cells["Natural"].mean == pytest.approx(group_means[0])
    assert ssf.cells["Structured"].mean == pytest.approx(group_means[2])
    assert ssf.cells[MEAN_ALL].mean == pytest.approx(sum(per_task.values()) / 19)
    assert ssf.cells[MEAN_OF_GROUPS].mean == pytest.approx(sum(group_means) / 3)
    assert ssf.cells[MEAN_ALL].mean != pytest.approx(ssf.cells[MEAN_OF_GROUPS].mean)  # the two means differ here
    assert ssf.cells["cifar"].std == pytest.approx(2**0.5) and ssf.cells["cifar"].seeds == 2
    assert ssf.cells[PARAMS].mean == pytest.approx(0.205824)

    san = next(r for r in table.rows if r.method == "san" and r.source == "measured")
    assert san.cells["kitti"].missing and san.cells["Structured"].missing and san.cells[MEAN_ALL].missing
    assert not san.cells["Natural"].missing
    assert ("san", "kitti") in table.missing

    published_ssf = next(r for r in table.rows if r.method == "ssf" and r.source == "published")
    assert published_ssf.label == "ssf (published)"
    assert published_ssf.cells["cifar"].mean == 69.0
    assert ssf.cells[DELTA].mean == pytest.approx(ssf.cells[MEAN_ALL].mean - published_ssf.cells[MEAN_ALL].mean)
    # a published number never fills a measured cell
    assert published[published.method == "lora"].shape[0] == 1
    assert not any(r.method == "lora" and r.source == "measured" for r in table.rows)


def test_markdown_shows_missing_and_published_labels(results, tmp_path):
    report = report_runs_dir(results / "runs", tmp_path / "t", with_flops=False, with_plots=False)
    text = (tmp_path / "t" / "vtab_vit_b16_in21k.md").read_text()
    san_line = next(line for line in text.splitlines() if line.startswith("| san | measured"))
    assert "—" in san_line
    # a published row chosen on test carries a dagger (tests/test_report_provenance.py)
    assert re.search(r"\| ssf \(published\)†? \| published \|", text)
    assert re.search(r"\| lora \(published\)†? \| published \|", text)
    assert any("missing san x kitti" in line for line in report.console)


def test_plots_are_written(results, tmp_path):
    report = report_runs_dir(results / "runs", tmp_path / "t", with_flops=False, with_plots=True)
    written = {p.name for p in report.files}
    for stem in ("vtab_vit_b16_in21k_accuracy_vs_params", "vtab_vit_b16_in21k_per_task"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= written
        assert (tmp_path / "t" / f"{stem}.png").stat().st_size > 1000


def test_two_configurations_in_one_cell_is_an_error(results):
    fixture_record(results, method="ssf", task="dtd", seed=5, top1=10.0, identity="other-epochs")
    with pytest.raises(ConflictingResultsError, match="ssf x dtd"):
        load_results_dir(results / "runs")


def test_mixed_backbones_in_one_table_is_an_error():
    frame = pd.DataFrame(
        {
            "backbone": ["a", "b"],
            "method": ["x", "x"],
            "task": ["cifar", "cifar"],
            "top1": [1.0, 2.0],
            "params_without_head": [1, 1],
            "params_trainable": [2, 2],
        }
    )
    with pytest.raises(MixedBackbonesError, match=r"\['a', 'b'\]"):
        build_suite_table(frame, title="t", suite="vtab", tasks=["cifar"], groups={"natural": ["cifar"]})


def test_runs_directory_report_makes_one_table_per_backbone(results, tmp_path):
    fixture_record(results, method="ssf", task="dtd", seed=0, top1=70.0, backbone="swin_b_in22k")
    report = report_runs_dir(results / "runs", tmp_path / "t", with_flops=False, with_plots=False)
    assert sorted(t.backbone for t in report.tables) == ["swin_b_in22k", "vit_b16_in21k"]
    swin = next(t for t in report.tables if t.backbone == "swin_b_in22k")
    assert not any(r.source == "published" for r in swin.rows)  # published rows are ViT-B/16 only


def test_efficiency_reads_each_tasks_own_params_and_flops_from_the_records(tmp_path):
    """VPT's prompt length differs per task: the table shows the mean over tasks and the range,
    and FLOPs come from what each run counted (no model is built by the report)."""
    for task, params, flops in (("cifar", 92_160, 36.0e9), ("dtd", 9_216, 35.3e9)):
        path = fixture_record(tmp_path, method="vpt_deep", task=task, seed=0, top1=50.0, params=params)
        record = json.loads(path.read_text())
        record["efficiency"] = {"forward_flops_per_image": flops, "train_flops_per_image": 2 * flops}
        record["data"] = {"variant": "jpeg_noah", "lists_sha256": {}}
        write_record(path.parent, record)
    fixture_record(tmp_path, method="ssf", task="cifar", seed=0, top1=60.0)  # an older record: no count
    report = report_runs_dir(tmp_path / "runs", tmp_path / "t", with_flops=True, with_plots=False)
    csv = next(p for p in report.files if p.name.endswith("_efficiency.csv"))
    frame = pd.read_csv(csv, index_col=0)
    assert frame.loc["vpt_deep", "params without head (M)"] == pytest.approx((92_160 + 9_216) / 2 / 1e6)
    assert frame.loc["vpt_deep", "params range over tasks (M)"] == "0.009-0.092"
    assert frame.loc["vpt_deep", "GFLOPs / image"] == pytest.approx(35.65)
    assert pd.isna(frame.loc["ssf", "GFLOPs / image"])  # never filled by building a model
    assert frame.loc["vpt_deep", "data"] == "jpeg_noah" and frame.loc["ssf", "data"] == "unrecorded"
    assert any("jpeg_noah (2 records)" in line for line in report.console)


def test_the_layout_comes_from_the_records_and_older_records_still_render(tmp_path):
    """Columns follow the records' `task_order` and groups; a record written before
    `task_order` carries its experiment's list in its config; with neither, tasks are sorted."""
    tasks = ["dtd", "cifar", "kitti", "eurosat"]
    for task in tasks:  # a narrower experiment, in its own order; groups in order of first appearance
        fixture_record(tmp_path / "a", method="ssf", task=task, seed=0, top1=50.0, task_order=tasks)
    frame = load_results_dir(tmp_path / "a" / "runs").frame
    table = report_runs_dir(tmp_path / "a" / "runs", tmp_path / "t", with_flops=False, with_plots=False).tables[0]
    assert table.tasks == tasks and not any(n.startswith("No record of") for n in table.footnotes)
    assert list(table.groups.items()) == [
        ("natural", ["dtd", "cifar"]),
        ("structured", ["kitti"]),
        ("specialized", ["eurosat"]),
    ]
    assert set(frame.task_order) == {tuple(tasks)}

    for task in tasks:  # an older record: no task_order, the experiment in its config
        path = fixture_record(tmp_path / "b", method="ssf", task=task, seed=0, top1=50.0, task_order=None)
        record = json.loads(path.read_text())
        record["config"] = {"plan": {"name": "narrow", "tasks": tasks}}
        write_record(path.parent, record)
    table = report_runs_dir(tmp_path / "b" / "runs", tmp_path / "t", with_flops=False, with_plots=False).tables[0]
    assert table.tasks == tasks

    for task in tasks:  # a run outside any experiment (san-train): sorted
        fixture_record(tmp_path / "c", method="ssf", task=task, seed=0, top1=50.0, task_order=None)
    table = report_runs_dir(tmp_path / "c" / "runs", tmp_path / "t", with_flops=False, with_plots=False).tables[0]
    assert table.tasks == ["cifar", "dtd", "eurosat", "kitti"]
    assert list(table.groups) == ["natural", "specialized", "structured"]


def test_the_longest_task_order_wins_and_tasks_without_records_are_named(tmp_path):
    fixture_record(tmp_path, method="san", task="kitti", seed=0, top1=50.0, task_order=["kitti", "cifar"])
    for task in ("cifar", "kitti"):
        fixture_record(tmp_path, method="ssf", task=task, seed=0, top1=50.0)
    report = report_runs_dir(tmp_path / "runs", tmp_path / "t", with_flops=False, with_plots=False)
    table = report.tables[0]
    assert table.tasks == ["cifar", "kitti"]
    # the other 17 VTAB tasks have no record: no column (their group is unknown), but said so
    note = table.footnotes[-1]
    assert note.startswith("No record of caltech101, dtd, ") and note.endswith("the means cover the 2 tasks shown.")
    assert any(note in line for line in report.console)
    assert note in (tmp_path / "t" / "vtab_vit_b16_in21k.md").read_text()


def test_published_numbers_ship_with_the_package_or_come_from_a_folder(tmp_path):
    from importlib import resources

    shipped = resources.files("san") / "report" / "reference"
    assert (shipped / "sources.json").is_file() and (shipped / "published_vtab1k_vitb16.csv").is_file()
    assert published_reference("vtab", "vit_b16_in21k")[0] is not None
    assert published_reference("vtab", "swin_b_in22k") == (None, "")

    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "mine.csv").write_text("# my numbers\nmethod,cifar,params_m\nssf,12.5,0.2\n")
    (tmp_path / "ref" / "sources.json").write_text(
        json.dumps(
            {
                "files": [
                    {
                        "file": "mine.csv",
                        "suite": "vtab",
                        "backbone": "swin_b_in22k",
                        "source": "a paper",
                        "params_note": "n",
                    }
                ]
            }
        )
    )
    frame, source = published_reference("vtab", "swin_b_in22k", tmp_path / "ref")
    assert frame.loc[0, "cifar"] == 12.5 and source == "a paper (mine.csv; n)"
    fixture_record(tmp_path, method="ssf", task="cifar", seed=0, top1=50.0, backbone="swin_b_in22k")
    report = report_runs_dir(
        tmp_path / "runs", tmp_path / "t", with_flops=False, with_plots=False, reference_dir=tmp_path / "ref"
    )
    assert any(r.source == "published" and r.cells["cifar"].mean == 12.5 for r in report.tables[0].rows)


def test_an_experiment_report_shows_every_task_before_any_record(tmp_path):
    """No selection yet: every cell is missing, each task where its records will put it (from
    its run config), so no mean is shown."""
    report = report_experiment(
        ["experiment=demo", f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path}"],
        tmp_path / "t",
        with_flops=False,
        with_plots=False,
    )
    table = report.tables[0]
    assert table.groups == {
        "natural": ["demo_digits"],
        "structured": ["demo_shape_loc", "demo_object_count"],
    }
    cells = len(table.tasks) * len(table.rows)
    assert len(table.tasks) == 3 and len(table.rows) >= 3
    assert len(table.missing) == cells and all(r.cells[MEAN_ALL].missing for r in table.rows)
    assert any(f"{cells} cell(s) have no selection yet" in line for line in report.console)


def test_a_run_records_where_its_task_goes():
    """What san.run writes into each record for the report, from the run's config alone."""
    from san.config import compose_config
    from san.identity import resolved
    from san.records import layout_facts

    in_experiment = layout_facts(resolved(compose_config(["experiment=demo", "dataset=demo_object_count"])))
    assert in_experiment == {
        "suite": "demo",
        "task": "demo_object_count",
        "group": "structured",
        "task_order": ["demo_digits", "demo_shape_loc", "demo_object_count"],
    }
    assert layout_facts(resolved(compose_config(["dataset=cifar"])))["task_order"] is None
