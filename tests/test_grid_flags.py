"""Cells that should not be read as a method's accuracy are flagged: a chosen grid point on the
edge of a numeric grid axis (selection writes it, the report marks "grid edge: widen"), a final
mean at chance, a seed spread over the limit. The demo grid contains its optimum."""

from __future__ import annotations

import json
from pathlib import Path

from test_report import fixture_record

from san.protocol.grid import grid_points
from san.protocol.selection import Candidate, edge_text, grid_edges, select_cell, write_selection
from san.records import write_record
from san.report.report import report_runs_dir
from san.report.tables import CHANCE_MARGIN, FLAG_TEXT, SPREAD_LIMIT


def _tune_record(directory: Path, val_top1: float, status: str = "complete") -> Path:
    record = {
        "schema": 1,
        "status": status,
        "stage": "tune",
        "splits": {"fit": "train", "evaluate": "val"},
        "metrics": {"final": {"val_top1": val_top1, "val_loss": 1.0}, "per_epoch": []},
    }
    return write_record(directory, record)


def _select(tmp_path: Path, scores: dict[tuple[str, ...], float | None]) -> dict:
    """select_cell over points -> val_top1 (None: the point ran and failed)."""
    candidates = [
        Candidate(i, point, _tune_record(tmp_path / f"p{i}", score or 0.0, "failed" if score is None else "complete"))
        for i, (point, score) in enumerate(scores.items())
    ]
    return select_cell("cell", candidates)


def test_a_chosen_learning_rate_at_either_end_of_the_grid_is_an_edge(tmp_path):
    lrs = ["optim.lr=0.01", "optim.lr=0.002", "optim.lr=0.0005"]
    top = _select(tmp_path / "top", {(lrs[0],): 70.0, (lrs[1],): 60.0, (lrs[2],): 50.0})
    assert top["grid_edge"] == [{"axis": "optim.lr", "value": 0.01, "side": "largest", "tried": [0.0005, 0.002, 0.01]}]
    assert edge_text(top["grid_edge"][0]) == "optim.lr=0.01 is the largest of 0.0005, 0.002, 0.01 tried"
    bottom = _select(tmp_path / "bottom", {(lrs[0],): 50.0, (lrs[1],): 60.0, (lrs[2],): 70.0})
    assert [e["side"] for e in bottom["grid_edge"]] == ["smallest"]
    inside = _select(tmp_path / "inside", {(lrs[0],): 50.0, (lrs[1],): 70.0, (lrs[2],): 60.0})
    assert inside["grid_edge"] == []
    # a point that ran and failed (diverged) was tried: the best next to it is not on the edge
    failed_top = _select(tmp_path / "failed", {(lrs[0],): None, (lrs[1],): 70.0, (lrs[2],): 60.0})
    assert failed_top["grid_edge"] == []
    # the selection file carries it
    write_selection(tmp_path / "selection.json", top)
    assert json.loads((tmp_path / "selection.json").read_text())["grid_edge"][0]["side"] == "largest"


def test_only_numeric_axes_with_several_values_have_edges():
    chosen = ("optim.lr=0.01", "optim.weight_decay=0.0001", "optim.schedule=cosine_per_step", "method.rank=8")
    tried = [
        chosen,
        ("optim.lr=0.001", "optim.weight_decay=0.0001", "optim.schedule=timm_cosine_per_epoch", "method.rank=4"),
    ]
    # one weight decay tried: no edge; a schedule name is no numeric axis; rank 8 is the largest of 4, 8
    assert [(e["axis"], e["side"]) for e in grid_edges(tried, chosen)] == [
        ("optim.lr", "largest"),
        ("method.rank", "largest"),
    ]
    assert grid_edges([chosen], chosen) == []  # a one-point grid has no edge


def _final(root: Path, method: str, task: str, seed: int, top1: float, num_classes: int, point=None) -> Path:
    path = fixture_record(root, method=method, task=task, seed=seed, top1=top1)
    record = json.loads(path.read_text())
    record["config"] = {"dataset": {"num_classes": num_classes}}
    if point is not None:
        record["point"] = list(point)
    return write_record(path.parent, record)


def test_the_report_marks_cells_at_chance_spread_over_seeds_or_on_a_grid_edge(tmp_path):
    chance = 100.0 / 8
    root = tmp_path / "results"
    # at chance: the mean is CHANCE_MARGIN points above 100 / num_classes or less; just above it is not
    for seed, top1 in enumerate((chance + CHANCE_MARGIN - 1.0, chance + CHANCE_MARGIN - 0.5)):
        _final(root, "san", "cifar", seed, top1, 8)
    for seed in (0, 1):
        _final(root, "san", "dtd", seed, chance + CHANCE_MARGIN + 0.5, 8)
    # spread: max - min over seeds above SPREAD_LIMIT; at the limit it is not
    for seed, top1 in enumerate((40.0, 40.0 + SPREAD_LIMIT + 1.0)):
        _final(root, "ssf", "cifar", seed, top1, 8)
    for seed, top1 in enumerate((40.0, 40.0 + SPREAD_LIMIT)):
        _final(root, "ssf", "dtd", seed, top1, 8)
    # grid edge: the final runs refit the chosen point of a selection that sits on the edge
    lrs = ["optim.lr=0.01", "optim.lr=0.002", "optim.lr=0.0005"]
    for task, scores in (("eurosat", (70.0, 60.0, 50.0)), ("kitti", (60.0, 70.0, 50.0))):
        document = _select(tmp_path / "tune" / task, {(lr,): s for lr, s in zip(lrs, scores)})
        document.update(backbone="vit_b16_in21k", method="ssf", task=task)
        write_selection(root / "sweeps" / "vtab" / "vit_b16_in21k" / "selection" / "ssf" / f"{task}.json", document)
        for seed in (0, 1):
            _final(root, "ssf", task, seed, 80.0, 10, point=document["chosen"]["overrides"])

    report = report_runs_dir(root / "runs", tmp_path / "t", with_flops=False, with_plots=False)
    table = report.tables[0]
    flags = {(method, task): flag for method, task, flag, _ in table.flagged}
    assert flags == {("san", "cifar"): "chance", ("ssf", "cifar"): "spread", ("ssf", "eurosat"): "edge"}
    markdown = (tmp_path / "t" / "vtab_vit_b16_in21k.md").read_text()
    san_line = next(line for line in markdown.splitlines() if line.startswith("| san | measured"))
    assert san_line.count("[chance]") == 1
    for flag in ("chance", "spread", "edge"):
        assert f"[{flag}] {FLAG_TEXT[flag]}: " in markdown
    assert "grid edge: widen" in FLAG_TEXT["edge"]
    assert "  [edge] ssf x eurosat: optim.lr=0.01 is the largest of 0.0005, 0.002, 0.01 tried" in report.console
    csv = (tmp_path / "t" / "vtab_vit_b16_in21k.csv").read_text()
    assert "ssf,measured,eurosat,80.0000,0.0000,2,edge" in csv
    # a final record without the class count (older records) is never called chance
    _final(tmp_path / "old", "san", "cifar", 0, 1.0, 8)
    path = next((tmp_path / "old").rglob("record.json"))
    record = json.loads(path.read_text())
    del record["config"]
    write_record(path.parent, record)
    old = report_runs_dir(tmp_path / "old" / "runs", tmp_path / "t2", with_flops=False, with_plots=False)
    assert old.tables[0].flagged == []


def test_the_demo_grid_has_an_inside_for_every_method(compose):
    """Every demo method that chooses its learning rate tries at least three, so a cell's optimum
    can sit inside the axis; one that runs a single value has no edge to be flagged on (the
    values and the measurements behind them: configs/sweep/demo.yaml)."""
    config = compose(["experiment=demo"])
    assert len(config.plan.methods) >= 3
    choosing = 0
    for method in config.plan.methods:
        points = grid_points(config.sweep, method)
        lrs = [float(point[0].split("=")[1]) for point in points]
        assert len(set(lrs)) == len(lrs), method
        if len(lrs) == 1:
            assert grid_edges(points, points[0]) == [], method
        else:
            assert len(lrs) >= 3, method
            choosing += 1
    assert choosing >= 2  # SAN and its comparator choose theirs


def test_an_experiment_report_reads_the_edge_from_its_selection_files(tmp_path):
    """`san-report experiment=...`: the cell's selection file says the chosen lr is the largest
    tried; the final records (with the class count their run config has) refit that point."""
    from san.protocol.plan import Cell, Plan
    from san.report.report import report_experiment

    overrides = [
        "experiment=demo",
        f"paths.root_dir={tmp_path}",
        f"paths.data_dir={tmp_path}",
        "plan.tasks=[demo_shape_loc]",
        "plan.methods=[san]",
    ]
    plan = Plan(overrides)
    cell = Cell(plan.backbone, "san", "demo_shape_loc")
    lrs = [point[0] for point in grid_points(plan.sweep, "san")]
    document = _select(
        tmp_path / "tune", {(lr,): 90.0 - 10 * i for i, lr in enumerate(sorted(lrs, key=_value, reverse=True))}
    )
    document.update(backbone=cell.backbone, method=cell.method, task=cell.task)
    write_selection(plan.selection_path(cell), document)
    chance = 100.0 / plan.final_jobs(cell, ())[0].config["dataset"]["num_classes"]
    for job in plan.final_jobs(cell, tuple(document["chosen"]["overrides"])):
        path = fixture_record(
            tmp_path / "scratch", method="san", task=cell.task, seed=job.seed, top1=chance, suite="demo"
        )
        record = json.loads(path.read_text())
        record.update(backbone={"name": cell.backbone}, identity=job.run_dir.parent.name, point=job.config["point"])
        record["config"] = job.config
        write_record(job.run_dir, record)
    report = report_experiment(overrides, tmp_path / "t", with_flops=False, with_plots=False)
    flags = sorted(flag for method, task, flag, _ in report.tables[0].flagged)
    assert flags == ["chance", "edge"]
    largest = max(_value(lr) for lr in lrs)
    assert any(
        line.startswith("  [edge] san x demo_shape_loc: optim.lr=") and f"={largest:g} is the largest" in line
        for line in report.console
    )


def _value(override: str) -> float:
    return float(override.split("=", 1)[1])
