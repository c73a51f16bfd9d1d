"""Planning composes once per cell and stage; every job's config equals full Hydra composition."""

from __future__ import annotations

import pytest
from helpers import TWO_POINT_GRID

from san.config import compose_config
from san.identity import resolved
from san.protocol import compose as compose_module
from san.protocol.compose import CellComposer, interpolation_references
from san.protocol.grid import format_override, grid_points
from san.protocol.plan import Cell, Plan, _absolute_paths


def full_composition(plan: Plan, stage: str, cell: Cell, point: tuple[str, ...], seed: int) -> dict:
    """The reference: one Hydra composition of the job's whole override list."""
    cell_overrides, own = plan.job_overrides(stage, cell, point, seed)
    config = _absolute_paths(resolved(compose_config([*cell_overrides, *own])))
    config["point"] = list(point)
    return config


# Cells that cover what differs between jobs: method axes that replace (linear's lr) or add
# (VPT's prompt length) an axis, a labelled variant (++method.label plus fixed overrides), a
# drop-path axis on the backbone, a per-task fixed override, FGVC's list-valued splits.
# (Every job of these five experiments was compared once, outside the test suite.)
CASES = [
    ("demo", "linear", "demo_object_count"),
    ("vtab", "vpt_deep", "kitti"),
    ("fgvc", "adapter", "stanford_cars"),
    ("san_ablation", "san_no_propagation", "svhn"),
    ("drop_path", "ssf", "cifar"),
]


@pytest.mark.parametrize("experiment, method, task", CASES, ids=[c[0] for c in CASES])
def test_job_configs_equal_full_composition(experiment, method, task):
    plan = Plan([f"experiment={experiment}"])
    plan.sweep["task_overrides"] = {"svhn": {"optim.min_lr": 1.0e-7}}  # no shipped grid has one
    cell = Cell(plan.backbone, method, task)
    points = grid_points(plan.sweep, plan.methods[method].config_name)
    tune = plan.tune_jobs(cell)
    final = plan.final_jobs(cell, points[-1])
    assert [job.point for job in tune] == points
    for job in (tune[-1], final[-1]):
        assert job.config == full_composition(plan, job.stage, cell, job.point, job.seed), job.label()
    for job in tune:  # every tune job holds its own point's values
        for override in job.point:
            key = override.split("=", 1)[0]
            value = job.config
            for part in key.split("."):
                value = value[part]
            assert format_override(key, value) == override, job.label()
    assert final[-1].config["seed"] == plan.seeds[-1] and final[-1].config["protocol"]["stage"] == "final"


def test_compose_runs_once_per_cell_and_stage(monkeypatch):
    calls: list[list[str]] = []

    def counting(overrides):
        calls.append(list(overrides))
        return compose_config(overrides)

    monkeypatch.setattr(compose_module, "compose_config", counting)
    plan = Plan(["experiment=demo", *TWO_POINT_GRID, "method=san", "plan.tasks=[demo_digits,demo_shape_loc]"])
    tune = [job for cell in plan.cells for job in plan.tune_jobs(cell)]  # 2 cells x 2 grid points
    final = [job for cell in plan.cells for job in plan.final_jobs(cell, tune[0].point)]  # x 2 seeds
    assert (len(tune), len(final)) == (4, 4)
    assert len(calls) == 4 and plan.composer.compositions == 4  # one per cell and stage
    assert len({job.run_dir for job in tune + final}) == 8
    plan.tune_jobs(plan.cells[0])  # planning a cell again (selection does) reuses its composition
    assert len(calls) == 4


CELL = ["experiment=demo", "method=linear", "dataset=demo_digits", "protocol=tune"]


@pytest.mark.parametrize(
    "bad",
    [
        "optim.lrr=0.1",
        "seed.value=1",
        "+seed=1",
        "optim.lr=0.1,0.2",
        "~optim.no_such_key",
        "optim.lr=[1,2",
        "no_such_group=x",
    ],
)
def test_a_bad_job_override_fails_exactly_as_hydra_does(bad):
    with pytest.raises(Exception) as hydra_error:
        compose_config([*CELL, bad])
    with pytest.raises(type(hydra_error.value)) as planner_error:
        CellComposer().config(CELL, [bad])
    assert str(planner_error.value) == str(hydra_error.value)


@pytest.mark.parametrize(
    "own",
    [
        ["paths.data_dir=/elsewhere"],  # read by dataset.root and prepare_command: composed in full
        ["+trainer.new_setting=3", "seed=4"],
        ["method.train_head=false", "optim.lr=0.5"],
        ["++backbone.kwargs={img_size: 32}"],
        ["backbone.kwargs=5"],  # Hydra lets a value replace a dict node; so does the planner
        ["trainer.limit_train_batches=2", "trainer.eval_every=null", "dataset.verify=no"],
    ],
)
def test_valid_job_overrides_give_the_full_composition(own):
    composer = CellComposer()
    assert composer.config(CELL, own) == resolved(compose_config([*CELL, *own]))


def test_only_plain_values_no_interpolation_reads_take_the_shortcut():
    composer = CellComposer()
    composer.config(CELL, ["optim.lr=0.5", "seed=3"])
    assert composer.compositions == 1
    composer.config(CELL, ["paths.data_dir=/elsewhere"])
    assert composer.compositions == 2
    assert {"paths.data_dir", "paths.root_dir"} <= composer.base(CELL).references
    assert "optim.lr" in composer.base(CELL).plain_keys and "backbone.kwargs" not in composer.base(CELL).plain_keys
    assert interpolation_references(compose_config([*CELL, "+extra=${oc.select:optim.lr}"])) is None
