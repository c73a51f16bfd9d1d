"""Run entry `--index` of a jobs file written by san-sweep (used by its worker processes)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from san.cli.console import console_script
from san.run import run


def run_entry(jobs_file: str | Path, index: int) -> Path:
    entries = json.loads(Path(jobs_file).read_text())
    if not 0 <= index < len(entries):
        raise IndexError(f"{jobs_file} has {len(entries)} jobs; no index {index}")
    return run(entries[index]["config"])


@console_script("san.cli.job")
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m san.cli.job", description=__doc__)
    parser.add_argument("--jobs", required=True, help="jobs file written by san-sweep")
    parser.add_argument("--index", required=True, type=int)
    args = parser.parse_args(argv)
    print(run_entry(args.jobs, args.index), flush=True)


if __name__ == "__main__":
    main()
