"""`san-prepare`: make datasets on disk in the formats the readers expect, and verify copies made elsewhere."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from san.data.demo_suite import TASKS, write_demo_suite


def _demo(args: argparse.Namespace) -> None:
    for path in write_demo_suite(args.out, args.tasks):
        print(path)


def _vtab(args: argparse.Namespace) -> None:
    from san.data.splits import DatasetError
    from san.data.vtab_export import export_vtab

    if any("=" not in pin for pin in args.tfds_version):
        raise DatasetError(f"--tfds-version takes TASK=VERSION (e.g. oxford_iiit_pet=4.0.0), got {args.tfds_version}")
    versions = dict(pin.split("=", 1) for pin in args.tfds_version)
    export_vtab(args.out, args.tasks, args.tfds_dir, args.format, versions)


def _fgvc(args: argparse.Namespace) -> None:
    from san.data.fgvc_folder import build_fgvc, verify_fgvc_folder
    from san.data.fgvc_sources import spec_for

    spec = spec_for(args.dataset)
    out = build_fgvc(
        spec.name, args.src, args.out, splits_dir=args.splits, seed=args.seed, images=args.images, force=args.force
    )
    report = verify_fgvc_folder(out, spec.num_classes, spec.counts, spec.image_root, decode=args.decode, progress=True)
    _print_report(out.name, report, report.name if report.name != out.name else None, args.max_problems)
    if not report.ok:
        raise SystemExit(f"{out} was built but does not match {spec.short}'s documented splits (see above)")


def _print_report(name: str, report, canonical: str | None, max_problems: int) -> None:
    alias = f" (= {canonical})" if canonical else ""
    variant = f"  [{report.variant}]" if getattr(report, "variant", None) else ""
    print(f"{'OK  ' if report.ok else 'FAIL'} {name}{alias}{variant}")
    for problem in report.problems[:max_problems]:
        print(f"     {problem}")
    if len(report.problems) > max_problems:
        print(f"     ... and {len(report.problems) - max_problems} more")
    for note in report.notes:
        print(f"     note: {note}")


def _verify_folder(folder: Path, decode: bool):
    """The report on a VTAB-1K task folder or an FGVC json folder; None if it is neither."""
    from san.data.fgvc_folder import canonical_fgvc_name, verify_fgvc_folder
    from san.data.fgvc_sources import SPECS as FGVC_SPECS
    from san.data.manifest import read_manifest
    from san.data.vtab_folder import canonical_task_name, verify_task_folder
    from san.data.vtab_spec import TASKS as VTAB_TASKS

    manifest = read_manifest(folder) or {}
    if (folder / "train.json").is_file():
        name = canonical_fgvc_name(folder.name)
        spec = FGVC_SPECS.get(name)
        if spec is None and "num_classes" not in manifest:
            return None
        num_classes = spec.num_classes if spec else manifest["num_classes"]
        return verify_fgvc_folder(
            folder, num_classes, spec.counts if spec else None, spec.image_root if spec else None, decode=decode
        )
    name = canonical_task_name(folder.name)
    if name in VTAB_TASKS:
        num_classes = VTAB_TASKS[name].num_classes
    elif "num_classes" in manifest:
        num_classes = manifest["num_classes"]
    else:
        return None
    return verify_task_folder(folder, num_classes, decode=decode, progress=decode)


def _verify(args: argparse.Namespace) -> None:
    root = Path(args.root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    if not folders:
        raise SystemExit(
            f"no dataset folders under {root}; make them with `san-prepare vtab --out {root}` "
            f"or `san-prepare fgvc --dataset <name> --src <official files>`"
        )
    vpt_splits = None
    if args.vpt_splits:
        from san.data.vpt_splits import load_vpt_splits

        vpt_splits = load_vpt_splits(args.vpt_splits)
    failed, compared = 0, []
    for folder in folders:
        report = _verify_folder(folder, args.decode)
        if report is None:
            print(f"SKIP {folder.name}: neither a VTAB-1K task nor an FGVC dataset name, and no manifest")
            continue
        _print_report(folder.name, report, report.name if report.name != folder.name else None, args.max_problems)
        failed += not report.ok
        if vpt_splits is not None and report.name in vpt_splits:
            from san.data.vpt_splits import compare_with_vpt

            compared.append(compare_with_vpt(folder, report.name, vpt_splits[report.name]))
    if vpt_splits is not None:
        print(f"VPT's split file {args.vpt_splits} ({len(vpt_splits)} tasks):")
        for line in compared or ["no task folder here is in it"]:
            print(f"     {line}")
    if failed:
        raise SystemExit(f"{failed} dataset folder(s) failed verification")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="san-prepare", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="generate the offline demo suite (VTAB-1K folder format)")
    demo.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    demo.add_argument("--tasks", nargs="*", choices=sorted(TASKS), help="tasks to write (default: all)")
    demo.set_defaults(handler=_demo)
    from san.data.vtab_spec import TASKS as VTAB_TASKS

    vtab = commands.add_parser(
        "vtab",
        help="export VTAB-1K from tensorflow-datasets as PNG (or NOAH-style JPEG) folders (pip install '.[tfds]')",
    )
    vtab.add_argument("--out", default="data/vtab-1k", help="output folder (default: data/vtab-1k)")
    vtab.add_argument("--tasks", nargs="*", choices=sorted(VTAB_TASKS), help="tasks to export (default: all 19)")
    vtab.add_argument("--tfds-dir", default=None, help="tfds data_dir (default: tfds's own, ~/tensorflow_datasets)")
    vtab.add_argument(
        "--format",
        choices=["png", "jpeg"],
        default="png",
        help="png: lossless (default); jpeg: NOAH's release as SSF/NOAH/V-PETL used it (PIL's default "
        "quality, train800val200 as its own copies), to compare with their published rows",
    )
    vtab.add_argument(
        "--tfds-version",
        action="append",
        default=[],
        metavar="TASK=VERSION",
        help="export TASK from this tfds version instead of the resolved one (VPT's where the installed "
        "tfds has it); repeatable",
    )
    vtab.set_defaults(handler=_vtab)
    from san.data.fgvc_folder import IMAGE_MODES
    from san.data.fgvc_sources import SPECS as FGVC_SPECS

    fgvc = commands.add_parser(
        "fgvc", help="build an FGVC dataset's train/val/test json splits (VPT's format) from its official release"
    )
    fgvc.add_argument(
        "--dataset", required=True, choices=sorted({s.short for s in FGVC_SPECS.values()} | set(FGVC_SPECS))
    )
    fgvc.add_argument(
        "--src",
        required=True,
        help="the official archive, or a folder holding the official archives or their extracted contents",
    )
    fgvc.add_argument(
        "--out",
        default=None,
        help="dataset folder (default: data/fgvc/<cub|nabirds|oxford_flowers|stanford_dogs|stanford_cars>)",
    )
    fgvc.add_argument(
        "--splits",
        default=None,
        help="a folder with VPT's own train/val/test.json: checked against the "
        "release and used instead of a newly carved val split",
    )
    fgvc.add_argument("--seed", type=int, default=0, help="seed of the val carve-out (default 0, the documented split)")
    fgvc.add_argument(
        "--images",
        choices=IMAGE_MODES,
        default="copy",
        help="for an extracted release: copy the images (default) or symlink its image folders",
    )
    fgvc.add_argument("--force", action="store_true", help="rebuild a folder that is already complete")
    fgvc.add_argument(
        "--decode", action="store_true", help="also decode every image afterwards (finds truncated files)"
    )
    fgvc.add_argument("--max-problems", type=int, default=10, help="problems printed")
    fgvc.set_defaults(handler=_fgvc)
    verify = commands.add_parser(
        "verify",
        help="check dataset folders (VTAB-1K tasks or FGVC json folders): counts, labels, manifests, JPEG copies",
    )
    verify.add_argument("root", help="folder holding one sub-folder per task or dataset (data/vtab-1k, data/fgvc)")
    verify.add_argument("--decode", action="store_true", help="also decode every image (finds truncated files)")
    verify.add_argument("--max-problems", type=int, default=10, help="problems printed per task")
    verify.add_argument(
        "--vpt-splits",
        default=None,
        metavar="FILE",
        help="VPT's vtab_trainval_splits.json: report per task how many of VPT's 1,000 training "
        "images the export does not have",
    )
    verify.set_defaults(handler=_verify)
    from san.cli import weights as weights_command

    weights = commands.add_parser(
        "weights",
        help="fetch the pinned pretrained checkpoints into the hub cache and "
        "print their sha256, to seed machines without the hub (make weights)",
    )
    weights_command.add_arguments(weights)
    weights.set_defaults(handler=weights_command.run)
    return parser


from san.cli.console import console_script  # noqa: E402  (user errors: one message, exit status 2)


@console_script("san-prepare")
def main(argv: list[str] | None = None) -> None:
    from san.data.errors import DatasetError

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        args.handler(args)
    except DatasetError as error:  # a bad or missing input file: the message names it; no traceback needed
        raise SystemExit(f"san-prepare {args.command}: {error}") from error


if __name__ == "__main__":
    main()
