"""A wheelhouse for machines without network access: build it on one that has, install from it there.

`build` (make wheelhouse), on a machine that reaches the package index (standard library
only; any Python 3 with pip):

1. `pip download --no-deps` of every line of requirements.lock for the target's Python,
   ABI and manylinux platforms: a wheel wherever the release has one for the target, else
   its source distribution (antlr4-python3-runtime 4.9.3, which Hydra needs, has no wheel);
2. each source distribution is built into a wheel with `pip wheel --no-deps`; a pure
   Python wheel (`py3-none-any`) works on any target, a compiled one only on a machine
   like this one, so that is refused with the reason;
3. this project's own wheel, and the build backend (setuptools) an editable install needs;
4. the check: the lock resolves from the wheelhouse alone for the target, dependencies
   included (`pip download --no-index --only-binary=:all:`).

`install` (make install-offline), on the machine without network: creates the venv if
needed and installs the lock and this checkout (editable) with `--no-index --find-links`.

`--keep-torch` (KEEP_TORCH=1) leaves out torch, torchvision, triton and the CUDA wheels
(nvidia-*, cuda-*): a node keeps its own CUDA build of torch. The venv is then created
with --system-site-packages, so that the torch of the Python that creates it is used.

    python3 scripts/wheelhouse.py build --python-version 3.12      # make wheelhouse PYTHON_VERSION=3.12
    python3 scripts/wheelhouse.py install --venv .venv             # make install-offline
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The lines --keep-torch leaves out: a node keeps its own CUDA build of these.
TORCH_FAMILY = re.compile(r"^(torch|torchvision|triton|nvidia-[\w.-]+|cuda-[\w.-]+)==", re.IGNORECASE)
SDIST_SUFFIXES = (".tar.gz", ".zip", ".tar.bz2")


def requirement_lines(lock: Path, keep_torch: bool) -> list[str]:
    lines = [line.strip() for line in lock.read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    return [line for line in lines if not (keep_torch and TORCH_FAMILY.match(line))]


def manylinux_platforms(platform: str) -> list[str]:
    """`manylinux_2_28_x86_64` -> every manylinux tag a glibc 2.28 machine accepts, newest first.

    pip takes `--platform` literally for the PEP 600 names (it expands only the legacy
    manylinux2014/2010 aliases), so the older glibc tags are listed explicitly."""
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not match:
        return [platform]
    glibc_minor, arch = int(match[1]), match[2]
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc_minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return platforms + [f"{name}_{arch}" for minor, name in legacy.items() if minor <= glibc_minor]


def target_options(python_version: str, platforms: list[str]) -> list[str]:
    abi = "cp" + python_version.replace(".", "")
    options = ["--python-version", python_version, "--implementation", "cp", "--abi", abi]
    for platform in platforms:
        options += ["--platform", platform]
    return options


def build_requires() -> list[str]:
    """The [build-system] requires of pyproject.toml (an editable install builds with them)."""
    text = (ROOT / "pyproject.toml").read_text()
    table = re.search(r"^\[build-system\]\s*\nrequires\s*=\s*\[(.*?)\]", text, re.MULTILINE | re.DOTALL)
    return re.findall(r"\"([^\"]+)\"", table[1]) if table else []


def pip(python: str, *args: str) -> None:
    command = [python, "-m", "pip", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def build(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out = args.wheelhouse.resolve()
    out.mkdir(parents=True, exist_ok=True)
    requirements = out / "requirements.txt"
    requirements.write_text("\n".join(requirement_lines(args.lock, args.keep_torch)) + "\n")
    target = target_options(args.python_version, manylinux_platforms(args.platform))

    pip(sys.executable, "download", "--no-deps", "--dest", str(out), *target, "-r", str(requirements))
    for sdist in sorted(p for p in out.iterdir() if p.name.endswith(SDIST_SUFFIXES)):
        built = set(out.glob("*.whl"))
        pip(sys.executable, "wheel", "--no-deps", "--wheel-dir", str(out), str(sdist))
        compiled = [
            wheel.name for wheel in sorted(set(out.glob("*.whl")) - built) if not wheel.name.endswith("-none-any.whl")
        ]
        if compiled:
            print(
                f"{sdist.name} has no wheel for Python {args.python_version} on {args.platform}, and its source "
                f"builds a wheel for this machine only ({', '.join(compiled)}): run this on a machine like the "
                "target, or pin a release that has a wheel for it",
                file=sys.stderr,
            )
            return 1
        sdist.unlink()
    pip(sys.executable, "download", "--only-binary=:all:", "--dest", str(out), *build_requires())
    pip(sys.executable, "wheel", "--no-deps", "--wheel-dir", str(out), str(ROOT))
    # Without torch, its dependants (timm, peft, ...) cannot resolve here: then check each line has its wheel.
    pip(
        sys.executable,
        "download",
        "--no-index",
        "--find-links",
        str(out),
        "--only-binary=:all:",
        "--dest",
        str(out),
        *target,
        *(["--no-deps"] if args.keep_torch else []),
        "-r",
        str(requirements),
    )

    wheels = sorted(out.glob("*.whl"))
    size = sum(wheel.stat().st_size for wheel in wheels)
    print(
        f"wheelhouse {out}: {len(wheels)} wheels, {size / 2**30:.2f} GiB, for Python {args.python_version} on "
        f"{args.platform}{' without torch/CUDA' if args.keep_torch else ''}, in {time.perf_counter() - started:.0f} s."
        f" Copy it next to the checkout on the target and run: make install-offline"
        f"{' KEEP_TORCH=1' if args.keep_torch else ''}"
    )
    return 0


def install(args: argparse.Namespace) -> int:
    wheelhouse, venv = args.wheelhouse.resolve(), args.venv
    if not any(wheelhouse.glob("*.whl")):
        print(
            f"no wheels in {wheelhouse}: run `make wheelhouse PYTHON_VERSION=<this Python>` on a machine with "
            "network access and copy the folder here",
            file=sys.stderr,
        )
        return 2
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run(
            [sys.executable, "-m", "venv", *(["--system-site-packages"] if args.keep_torch else []), str(venv)],
            check=True,
        )
    has_torch = (
        "from importlib.metadata import version; print('keeping torch', version('torch'), version('torchvision'))"
    )
    if args.keep_torch and subprocess.run([str(python), "-c", has_torch]).returncode:
        print(
            f"KEEP_TORCH=1, but {python} has no torch and torchvision installed: create the venv from the Python "
            "that has the node's CUDA torch (make install-offline KEEP_TORCH=1 PYTHON=/path/to/that/python, "
            f"after removing {venv}), or install without KEEP_TORCH from a wheelhouse built with torch",
            file=sys.stderr,
        )
        return 2
    requirements = venv / "requirements-offline.txt"
    requirements.write_text("\n".join(requirement_lines(args.lock, args.keep_torch)) + "\n")
    offline = ["install", "--no-index", "--find-links", str(wheelhouse)]
    pip(str(python), *offline, "-r", str(requirements))
    pip(str(python), *offline, "--no-deps", "-e", str(ROOT))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler in (("build", build), ("install", install)):
        command = commands.add_parser(name)
        command.add_argument("--lock", type=Path, default=ROOT / "requirements.lock")
        command.add_argument("--wheelhouse", type=Path, default=ROOT / "wheelhouse")
        command.add_argument(
            "--keep-torch",
            action="store_true",
            help="without torch, torchvision, triton and the CUDA wheels: the node keeps its own",
        )
        command.set_defaults(handler=handler)
        if name == "build":
            command.add_argument(
                "--python-version",
                default=f"{sys.version_info[0]}.{sys.version_info[1]}",
                help="the target's Python, e.g. 3.12 (default: this interpreter's)",
            )
            command.add_argument(
                "--platform",
                default="manylinux_2_28_x86_64",
                help="the target's newest manylinux tag, i.e. its glibc (default: manylinux_2_28_x86_64)",
            )
        else:
            command.add_argument("--venv", type=Path, default=ROOT / ".venv")
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
