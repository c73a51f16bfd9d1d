"""The report generator: golden tables from fixture records, means, missing cells, bad input.

Golden files are written by this test (SAN_UPDATE_GOLDEN=1 pytest tests/test_report.py),
never edited by hand; without that variable the test compares byte for byte.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from san.records import SCHEMA_VERSION, write_record
from san.report.report import published_reference, report_runs_dir, task_layout
from san.report.results import ConflictingResultsError, load_results_dir
from san.report.tables import DELTA, MEAN_ALL, MEAN_OF_GROUPS, PARAMS, MixedBackbonesError, build_suite_table

GOLDEN = Path(__file__).parent / "golden" / "report"
VTAB = task_layout(["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",
                    "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy", "clevr_count", "clevr_dist",
                    "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele"])


def fixture_record(root: Path, *, method: str, task: str, seed: int, top1: float, backbone: str = "vit_b16_in21k",
                   suite: str = "vtab", identity: str | None = None, status: str = "complete",
                   schema: int = SCHEMA_VERSION, params: int = 205_824) -> Path:
    identity = identity or f"{method}-config"
    group = next(g for g, members in VTAB.groups.items() if task in members) if suite == "vtab" else "fgvc"
    record = {
        "schema": schema, "status": status, "stage": "final", "suite": suite, "task": task, "group": group,
        "backbone": {"name": backbone}, "method": {"name": method}, "seed": seed, "identity": identity,
        "splits": {"fit": "trainval", "evaluate": "test"},
        "metrics": {"final": {"test_top1": top1}},
        "params": {"trainable": params + 768 * 10, "trainable_without_head": params},
        "cost": {"train_images_per_s": 100.0 + seed, "eval_images_per_s": 400.0, "peak_mem_bytes": 2**30,
                 "peak_mem_kind": "process_max_rss"},
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
    assert names == sorted(f"vtab_vit_b16_in21k{suffix}{ext}" for suffix in ("", "_efficiency")
                           for ext in (".md", ".tex", ".csv"))
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
    table = build_suite_table(loaded.frame, title="vtab", suite="vtab", tasks=VTAB.tasks, groups=VTAB.groups,
                              methods=["ssf", "san"], published=published, published_source=source)
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
    assert ssf.cells["cifar"].std == pytest.approx(2 ** 0.5) and ssf.cells["cifar"].seeds == 2
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
    assert "| ssf (published) | published |" in text and "| lora (published) | published |" in text
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
    frame = pd.DataFrame({"backbone": ["a", "b"], "method": ["x", "x"], "task": ["cifar", "cifar"], "top1": [1.0, 2.0],
                          "params_without_head": [1, 1], "params_trainable": [2, 2]})
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
    import json

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
