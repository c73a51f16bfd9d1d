"""`san-prepare`: make datasets on disk in the formats the readers expect."""

from __future__ import annotations

import argparse
import sys

from san.data.demo_suite import TASKS, write_demo_suite


def _demo(args: argparse.Namespace) -> None:
    for path in write_demo_suite(args.out, args.tasks):
        print(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="san-prepare", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="generate the offline demo suite (VTAB-1K folder format)")
    demo.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    demo.add_argument("--tasks", nargs="*", choices=sorted(TASKS), help="tasks to write (default: all)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.handler(args)


if __name__ == "__main__":
    main()
