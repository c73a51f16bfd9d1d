"""`make demo`: the main job on the offline default, then its table.

Runs every (method, dataset) pair named in `configs/experiment/demo.yaml` through the
same `run()` that `san-train` uses, in one process, and prints a Markdown table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from san.cli.config import compose_config
from san.results_table import load_records, method_by_task, to_markdown
from san.run import resolved, run


def main(overrides: list[str] | None = None) -> Path:
    overrides = ["experiment=demo", *(sys.argv[1:] if overrides is None else overrides)]
    plan = compose_config(overrides)
    started = time.perf_counter()
    records = []
    jobs = [(m, d) for d in plan.demo.datasets for m in plan.demo.methods]
    for number, (method, dataset) in enumerate(jobs, start=1):
        print(f"[{number}/{len(jobs)}] method={method} dataset={dataset}", flush=True)
        records.append(run(compose_config([*overrides, f"method={method}", f"dataset={dataset}"])))
    runs_root = Path(resolved(plan)["paths"]["runs_dir"])
    frame = load_records(runs_root, stage="final")
    frame = frame[frame["path"].isin([str(p) for p in records])]
    print(f"\nDemo suite, {plan.backbone.name}, test top-1 (%) after {plan.trainer.epochs} epochs on "
          f"train800val200, seed {plan.seed}; params_m = trainable without head (M)\n")
    print(to_markdown(method_by_task(frame)))
    print(f"\n{len(records)} runs in {time.perf_counter() - started:.0f} s; records under {runs_root}")
    return runs_root


if __name__ == "__main__":
    main()
