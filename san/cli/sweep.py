"""`san-sweep experiment=<name> [overrides...]`: tune on val -> select -> final seeds -> table.

Overrides are Hydra overrides, as for san-train; `method=X` / `dataset=Y` narrow the
experiment to one method / task. Re-running the same command resumes: finished runs are
skipped, interrupted ones continue from their last epoch.

Options: --dry-run (count the runs, print the cost account as one JSON line, and stop),
--no-progress, --debug (traceback of a user error).
"""

from __future__ import annotations

import json
import sys

from san.cli.console import console_script
from san.errors import UserError
from san.protocol.sweep import dry_run_report, run_sweep
from san.report.render import to_markdown
from san.report.report import report_experiment


@console_script("san-sweep")
def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    options = {a for a in argv if a.startswith("--")}
    unknown = options - {"--dry-run", "--no-progress"}
    if unknown:
        raise UserError(
            f"unknown option(s) {sorted(unknown)}; accepted: --dry-run, --no-progress, --debug (see san-sweep --help)"
        )
    overrides = [a for a in argv if not a.startswith("--")]
    if "--dry-run" in options:
        counts, costs = dry_run_report(overrides)
        print(", ".join(f"{k}: {v}" for k, v in counts.items()))
        print(json.dumps(costs))  # the cost account, always the last line
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
