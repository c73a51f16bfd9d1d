"""`san-prepare`: make datasets on disk in the formats the readers expect."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from san.data.demo_suite import TASKS, write_demo_suite


def _demo(args: argparse.Namespace) -> None:
    for path in write_demo_suite(args.out, args.tasks):
        print(path)


def _vtab(args: argparse.Namespace) -> None:
    from san.data.vtab_export import export_vtab

    export_vtab(args.out, args.tasks, args.tfds_dir)


def _verify(args: argparse.Namespace) -> None:
    from san.data.vtab_folder import canonical_task_name, verify_task_folder
    from san.data.vtab_spec import TASKS as VTAB_TASKS

    root = Path(args.root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    if not folders:
        raise SystemExit(f"no task folders under {root}; export them with `san-prepare vtab --out {root}`")
    failed = 0
    for folder in folders:
        task = canonical_task_name(folder.name)
        manifest = folder / "manifest.json"
        if task in VTAB_TASKS:
            num_classes = VTAB_TASKS[task].num_classes
        elif manifest.is_file():
            num_classes = json.loads(manifest.read_text())["num_classes"]
        else:
            print(f"SKIP {folder.name}: not a VTAB-1K task name (aliases: {sorted(set(VTAB_TASKS))}) and no manifest")
            continue
        report = verify_task_folder(folder, num_classes, decode=args.decode)
        alias = f" (= {task})" if task != folder.name else ""
        print(f"{'OK  ' if report.ok else 'FAIL'} {folder.name}{alias}")
        for problem in report.problems[:args.max_problems]:
            print(f"     {problem}")
        if len(report.problems) > args.max_problems:
            print(f"     ... and {len(report.problems) - args.max_problems} more")
        for note in report.notes:
            print(f"     note: {note}")
        failed += not report.ok
    if failed:
        raise SystemExit(f"{failed} task folder(s) failed verification")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="san-prepare", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="generate the offline demo suite (VTAB-1K folder format)")
    demo.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    demo.add_argument("--tasks", nargs="*", choices=sorted(TASKS), help="tasks to write (default: all)")
    demo.set_defaults(handler=_demo)
    from san.data.vtab_spec import TASKS as VTAB_TASKS

    vtab = commands.add_parser("vtab", help="export VTAB-1K from tensorflow-datasets as PNG folders (pip install '.[tfds]')")
    vtab.add_argument("--out", default="data/vtab-1k", help="output folder (default: data/vtab-1k)")
    vtab.add_argument("--tasks", nargs="*", choices=sorted(VTAB_TASKS), help="tasks to export (default: all 19)")
    vtab.add_argument("--tfds-dir", default=None, help="tfds data_dir (default: tfds's own, ~/tensorflow_datasets)")
    vtab.set_defaults(handler=_vtab)
    verify = commands.add_parser("verify", help="check VTAB-1K task folders: counts, labels, manifests, JPEG copies")
    verify.add_argument("root", help="folder holding one sub-folder per task (e.g. data/vtab-1k)")
    verify.add_argument("--decode", action="store_true", help="also decode every image (finds truncated files)")
    verify.add_argument("--max-problems", type=int, default=10, help="problems printed per task")
    verify.set_defaults(handler=_verify)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.handler(args)


if __name__ == "__main__":
    main()
