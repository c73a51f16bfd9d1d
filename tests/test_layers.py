"""The layers, read from the source: which package may import which.

Every import statement of every module under san/ (function-level and TYPE_CHECKING
ones included) is read with `ast`, so a violation is caught without running the code.
A second check imports the light entry points in a fresh interpreter and looks for torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (modules under this folder, may not import these modules or anything inside them, why)
RULES = [
    ("san", ("baselines",), "the core finds plugins through the san_peft.methods entry points"),
    ("san/protocol", ("san.cli",), "config composition lives in san.config"),
    ("san/report", ("san.cli",), "config composition lives in san.config"),
    ("san/data", ("san.backbones", "san.methods"), "the data layer gets the preprocessing as plain values"),
    (
        "san/report",
        ("san.backbones", "san.efficiency", "san.trainer", "san.run"),
        "the report reads records only and builds no model",
    ),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, statement, modules it names) for each import statement of `path`: `from a
    import b` names both `a` and `a.b` (b may be a module); relative imports made absolute."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.append((node.lineno, ast.unparse(node), [alias.name for alias in node.names]))
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([node.module] if node.module else [])])
            found.append((node.lineno, ast.unparse(node), [base, *(f"{base}.{a.name}" for a in node.names)]))
    return sorted(found)


def _forbidden(module: str, banned: tuple[str, ...]) -> bool:
    return any(module == b or module.startswith(b + ".") for b in banned)


def violations(folder: str, banned: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line}: {statement}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, statement, modules in imports(path)
        if any(_forbidden(m, banned) for m in modules)
    ]


@pytest.mark.parametrize("folder, banned, why", RULES, ids=[f"{f} !-> {' '.join(b)}" for f, b, _ in RULES])
def test_layer_imports(folder, banned, why):
    found = violations(folder, banned)
    assert not found, f"{folder} may not import {', '.join(banned)} ({why}):\n  " + "\n  ".join(found)


def test_the_reader_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The rules can fail: plain, from, relative, function-level and TYPE_CHECKING imports."""
    package = tmp_path / "san" / "report"
    package.mkdir(parents=True)
    (package / "bad.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import san.run\n"
        "from san import backbones\n"
        "from ..efficiency import count_flops\n"
        "if TYPE_CHECKING:\n    from san.trainer import Trainer\n"
        "def f():\n    from san.cli.config import x\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations("san/report", ("san.backbones", "san.efficiency", "san.trainer", "san.run", "san.cli")) == [
        "san/report/bad.py:2: import san.run",
        "san/report/bad.py:3: from san import backbones",
        "san/report/bad.py:4: from ..efficiency import count_flops",
        "san/report/bad.py:6: from san.trainer import Trainer",
        "san/report/bad.py:8: from san.cli.config import x",
    ]


# Importing these must stay light: torch (and with it timm and every method) costs seconds,
# which `san-report`, sweep planning and `san-prepare verify` would pay on every start.
LIGHT = ["san.records", "san.identity", "san.report.report", "san.cli.report", "san.protocol.plan", "san.cli.prepare"]


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_do_not_load_torch(module):
    probe = (
        f"import sys, {module}; heavy = sorted(m for m in ('torch', 'timm', 'baselines', 'matplotlib') "
        "if m in sys.modules); print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"import {module} loads {result.stdout.strip()}"
