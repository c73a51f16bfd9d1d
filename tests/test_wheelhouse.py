"""Air-gapped installs: `make wheelhouse` here, `make install-offline` into a fresh venv with no index.

The round trip is marked slow and runs only with SAN_TEST_WHEELHOUSE=1: it downloads about
0.2 GiB of wheels from the package index and takes 3 to 5 minutes. It uses KEEP_TORCH=1, the
case of a node that keeps its own CUDA torch: the fresh venv sees this environment's torch,
torchvision, triton and CUDA wheels (and nothing else) through a .pth file, and every other
package comes from the wheelhouse, with pip's configuration files and find-links switched off.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "scripts" / "wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheelhouse)


def test_keep_torch_leaves_out_exactly_the_torch_family():
    lock = ROOT / "requirements.lock"
    every = wheelhouse.requirement_lines(lock, keep_torch=False)
    kept = wheelhouse.requirement_lines(lock, keep_torch=True)
    left_out = sorted(set(every) - set(kept))
    assert left_out and all(re.match(r"(torch|torchvision|triton|nvidia-|cuda-)", line) for line in left_out)
    assert any(line.startswith("torch==") for line in left_out)
    assert any(line.startswith("timm==") for line in kept) and not any(line.startswith("#") for line in every)


def test_manylinux_platforms_cover_older_glibc_tags():
    platforms = wheelhouse.manylinux_platforms("manylinux_2_28_x86_64")
    assert platforms[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in platforms
    assert {"manylinux2014_x86_64", "manylinux1_x86_64"} <= set(platforms)
    assert "manylinux_2_29_x86_64" not in platforms
    assert wheelhouse.target_options("3.12", ["p"]) == [
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--abi",
        "cp312",
        "--platform",
        "p",
    ]


def test_make_targets_pass_the_target_through():
    dry = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "wheelhouse", "install-offline", "PYTHON_VERSION=3.12", "KEEP_TORCH=1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "scripts/wheelhouse.py build --wheelhouse wheelhouse --python-version 3.12" in dry
    assert "scripts/wheelhouse.py install --wheelhouse wheelhouse --venv .venv --keep-torch" in dry
    assert dry.count("--keep-torch") == 2


def _torch_family_folder(folder: Path) -> Path:
    """This environment's torch, torchvision, triton and CUDA packages (files from their RECORDs), alone."""
    folder.mkdir()
    for name in (
        "torch",
        "torchvision",
        "triton",
        *(d.metadata["Name"] for d in metadata.distributions() if re.match(r"(nvidia|cuda)[-_]", d.metadata["Name"])),
    ):
        distribution = metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in distribution.files if not str(f).startswith("..")}
        for top in tops:
            if not (folder / top).exists():
                (folder / top).symlink_to(Path(distribution.locate_file(top)))
    return folder


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SAN_TEST_WHEELHOUSE") != "1",
    reason="downloads ~0.2 GiB from the package index: set SAN_TEST_WHEELHOUSE=1",
)
def test_wheelhouse_round_trip_with_no_index(tmp_path):
    built = tmp_path / "wheelhouse"
    subprocess.run(
        ["make", "-C", str(ROOT), "wheelhouse", f"WHEELHOUSE={built}", "KEEP_TORCH=1", f"PYTHON={sys.executable}"],
        check=True,
    )
    wheels = {path.name for path in built.glob("*.whl")}
    assert any(name.startswith("antlr4_python3_runtime-4.9.3-py3-none-any") for name in wheels)  # built from sdist
    assert any(name.startswith("san_peft_bench-") for name in wheels)
    assert not any(name.startswith(("torch-", "nvidia_")) for name in wheels)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "node_torch.pth").write_text(str(_torch_family_folder(tmp_path / "node_torch")) + "\n")
    isolated = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    subprocess.run(
        ["make", "-C", str(ROOT), "install-offline", f"WHEELHOUSE={built}", f"VENV={venv}", "KEEP_TORCH=1"],
        check=True,
        env={**isolated, "PIP_CONFIG_FILE": os.devnull},
    )

    counts = subprocess.run(
        [str(venv / "bin" / "san-params"), "backbone=test_vit", "method=bitfit"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert json.loads(counts.stdout.strip().splitlines()[-1])["trainable_without_head"] > 0
    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import timm, hydra, torch; print(timm.__file__, hydra.__file__, torch.__file__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where[0].startswith(str(venv)) and where[1].startswith(str(venv))  # from the wheelhouse
    assert where[2].startswith(str(tmp_path / "node_torch"))  # the node's own torch, kept
