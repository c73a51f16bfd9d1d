"""`san-report [experiment=<name> overrides...] [--runs DIR] [--out DIR] [--no-flops] [--no-plots]
[--reference-dir DIR]`

With an experiment: the table of exactly that experiment's final runs (found through its
selection files), beside the published numbers, as Markdown, LaTeX and CSV, plus an
efficiency table and plots, under results/tables/<experiment>_<backbone>.*.
Without: every complete final record under results/runs (or --runs), one table per
suite x backbone (results/tables/<suite>_<backbone>.*).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from san.cli.console import console_script
from san.report.render import to_markdown
from san.report.report import ReportOutput, report_experiment, report_runs_dir


@console_script("san-report")
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="san-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=vtab backbone=swin_b_in22k")
    parser.add_argument("--runs", type=Path, default=Path("results/runs"), help="runs directory (without experiment=)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: results/tables)")
    parser.add_argument(
        "--no-flops", action="store_true", help="leave the FLOPs (read from the records) out of the efficiency table"
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--reference-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="published numbers to show beside measured rows: a folder with sources.json and "
        "its CSV files (default: the ones shipped in the package, san/report/reference)",
    )
    args = parser.parse_args(argv)
    options = dict(with_flops=not args.no_flops, with_plots=not args.no_plots, reference_dir=args.reference_dir)
    if any(o.startswith("experiment=") for o in args.overrides):
        output: ReportOutput = report_experiment(args.overrides, args.out, **options)
    else:
        output = report_runs_dir(args.runs, args.out or Path("results/tables"), **options)
    for table in output.tables:
        print(to_markdown(table))
    print("\n".join(output.console))
    print(f"{len(output.files)} files written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
