"""`san-sweep experiment=<name> [overrides...]`: tune on val -> select -> final seeds -> table.

Overrides are Hydra overrides, as for san-train; `method=X` / `dataset=Y` narrow the
experiment to one method / task. Re-running the same command resumes: finished runs are
skipped, interrupted ones continue from their last epoch.

Options: --dry-run (count the runs and stop), --no-progress.
"""

from __future__ import annotations

import sys

from san.protocol.sweep import dry_run, run_sweep
from san.report.render import to_markdown
from san.report.report import report_experiment


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    options = {a for a in argv if a.startswith("--")}
    unknown = options - {"--dry-run", "--no-progress"}
    if unknown:
        print(f"unknown option(s) {sorted(unknown)}; accepted: ['--dry-run', '--no-progress']", file=sys.stderr)
        return 2
    overrides = [a for a in argv if not a.startswith("--")]
    if "--dry-run" in options:
        counts = dry_run(overrides)
        print(", ".join(f"{k}: {v}" for k, v in counts.items()))
        return 0
    result = run_sweep(overrides, progress="--no-progress" not in options)
    report = report_experiment(overrides)
    print()
    for table in report.tables:
        print(to_markdown(table))
    print("\n".join(report.console))
    print("\n" + result.summary_text())
    failed = any(o.status == "failed" for outcomes in result.outcomes.values() for o in outcomes)
    return 1 if failed or result.unselected else 0


if __name__ == "__main__":
    sys.exit(main())
