"""`san-select experiment=<name> [overrides...]`: choose each cell's grid point on val.

Reads only the stage=tune records of the experiment's grid (never a test metric), writes
one selection file per backbone x method x task under
results/sweeps/<experiment>/<backbone>/selection/, and lists any cell with no complete
tune record. san-sweep does this itself between its stages.
"""

from __future__ import annotations

import sys

from san.protocol.plan import Plan
from san.protocol.selection import SelectionError
from san.protocol.sweep import select


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    plan = Plan(argv)
    problems = []
    for cell in plan.cells:
        try:
            document = select(plan, cell)
        except SelectionError as error:
            problems.append(str(error))
            continue
        chosen = document["chosen"]
        gaps = len(document["missing"]) + len(document["failed"]) + len(document["incomplete"])
        print(f"{cell.label()}: {' '.join(chosen['overrides'])}  val_top1 {chosen['val_top1']:.2f}"
              + (f"  ({gaps} grid point(s) missing/failed)" if gaps else ""))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    print(f"selection files: {plan.sweep_dir / 'selection'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
