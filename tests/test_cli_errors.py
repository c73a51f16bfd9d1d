"""Errors a person can read: one message, the fix, exit status 2, no traceback; bugs keep theirs.

The console scripts run as subprocesses (as a user runs them), all at once to share the
machine's cores; the message texts are checked in-process where that is enough.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from san.cli import console, params, sweep
from san.config import compose_config
from san.errors import ConfigError, UserError

BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != console.FULL_ERROR_ENV}
    return {**env, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **extra}


def test_console_scripts_report_user_errors_cleanly_and_bugs_with_traceback(tmp_path):
    empty = tmp_path / "no_datasets"
    empty.mkdir()
    root = [f"paths.root_dir={tmp_path / name}" for name in "abc"]  # no data there: the demo task is missing
    # (name, command, extra environment, exit status, texts stderr must hold, traceback expected)
    cases = [
        (
            "unknown config option (Hydra composition)",
            ["san-train", "backbone=vit_b16"],
            {},
            2,
            [
                "san-train: error: unknown backbone 'vit_b16'; accepted: convnext_b_in22k",
                "san-train backbone=vit_b16_in21k",
            ],
            False,
        ),
        (
            "dataset missing (raised inside the Hydra task)",
            ["san-train", "backbone=test_vit", root[0]],
            {},
            2,
            ["san-train: error: dataset 'demo_digits': folder", "does not exist", "san-prepare demo --out"],
            False,
        ),
        (
            "the same with HYDRA_FULL_ERROR=1",
            ["san-train", "backbone=test_vit", root[1]],
            {"HYDRA_FULL_ERROR": "1"},
            2,
            ["MissingDatasetError", "san-train: error: dataset 'demo_digits'"],
            True,
        ),
        (
            "a bug keeps Hydra's traceback",
            ["san-train", "backbone=test_vit", "+backbone.kwargs.bogus=1", root[2]],
            {},
            1,
            ["TypeError", "unexpected keyword argument 'bogus'"],
            True,
        ),
        (
            "argparse tool: a refusal through SystemExit",
            ["san-prepare", "verify", str(empty)],
            {},
            2,
            [f"no dataset folders under {empty}", "san-prepare vtab --out"],
            False,
        ),
        (
            "--debug shows the traceback of a user error",
            ["san-params", "--debug", "backbone=test_vit", "method=nope"],
            {},
            2,
            ["san-params: error: unknown method 'nope'; accepted:", "san-params method="],
            True,
        ),
    ]
    processes = [
        subprocess.Popen(
            [str(BIN / command[0]), *command[1:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=_env(**extra),
        )
        for _, command, extra, *_ in cases
    ]
    for (name, _, _, status, texts, traceback), process in zip(cases, processes):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == status, (name, stderr)
        for text in texts:
            assert text in stderr, (name, text, stderr)
        assert ("Traceback (most recent call last)" in stderr) == traceback, (name, stderr)
        assert "Set the environment variable HYDRA_FULL_ERROR" not in stderr or status == 1, (name, stderr)


def test_in_process_user_errors_exit_2_with_the_message(capsys):
    with pytest.raises(SystemExit) as exit:
        params.main(["backbone=effnet_lite0", "method=vpt_deep"])
    assert exit.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("san-params: error: ") and "vpt" in stderr.lower() and "Traceback" not in stderr

    with pytest.raises(SystemExit) as exit:
        sweep.main(["--dry-run"])
    assert exit.value.code == 2
    assert "san-sweep: error: san-sweep needs an experiment: experiment=<name>; accepted:" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit:
        sweep.main(["experiment=demo", "--dryrun"])
    assert exit.value.code == 2 and "unknown option(s) ['--dryrun']" in capsys.readouterr().err


def test_systemexit_message_keeps_its_text_and_exits_2(capsys):
    with pytest.raises(SystemExit, match="^nothing to do here$") as exit:
        console.console_script("tool")(lambda argv: sys.exit("nothing to do here"))([])
    assert exit.value.code == 2 and capsys.readouterr().err == "nothing to do here\n"


def test_bugs_pass_through_untouched():
    with pytest.raises(ZeroDivisionError):
        console.console_script("tool")(lambda argv: 1 / 0)([])


@pytest.mark.parametrize(
    "override, expected",
    [
        (["trainer.epoch=3"], ["no setting 'trainer.epoch'", "did you mean trainer.epochs?", "+trainer.epoch=<value>"]),
        (
            ["trainer.epochs"],
            ["cannot parse the override 'trainer.epochs'", "missing EQUAL", "e.g. prog optim.lr=0.01"],
        ),
        (["method=loraa"], ["unknown method 'loraa'; accepted: adalora,", "For example: prog method=lora"]),
        (["+backbone=test_vit"], ["Multiple values for backbone"]),
    ],
)
def test_hydra_composition_errors_become_one_message(override, expected):
    with pytest.raises(Exception) as error:
        compose_config(override)
    message = console.user_message(error.value, "prog")
    for text in expected:
        assert text in message
    assert "Config search path" not in message and "\n" not in message


def test_unset_config_value_names_the_override():
    cfg = compose_config(["+extra.value=???"])
    with pytest.raises(Exception) as error:
        _ = cfg.extra.value
    assert console.user_message(error.value, "san-train") == (
        "extra.value has no value (it is ??? in the config); set it: san-train extra.value=<value>"
    )


NAMED_ERRORS = [  # (module, class): every error the suite raises on purpose for a user to act on
    ("san.data.errors", "DatasetError"),
    ("san.data.errors", "MissingDatasetError"),
    ("san.data.errors", "LabelRangeError"),
    ("san.data.errors", "ClassCountMismatchError"),
    ("san.data.images", "CorruptImageError"),
    ("san.methods.registry", "NoMethodsInstalledError"),
    ("san.data.fgvc_sources", "SourceError"),
    ("san.run", "DatasetVerificationError"),
    ("san.backbones", "WeightsUnavailableError"),
    ("san.methods.base", "UnsupportedBackboneError"),
    ("san.methods.base", "NotMergeableError"),
    ("san.methods.registry", "UnknownMethodError"),
]


@pytest.mark.parametrize("module, name", NAMED_ERRORS)
def test_named_errors_are_user_errors(module, name):
    assert issubclass(getattr(importlib.import_module(module), name), UserError)


def test_user_errors_keep_their_builtin_bases():
    """Code that catches the builtin kinds keeps working."""
    from san.data.errors import MissingDatasetError
    from san.methods.registry import UnknownMethodError

    assert issubclass(MissingDatasetError, FileNotFoundError) and issubclass(UnknownMethodError, KeyError)
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "module, name",
    [
        ("san.protocol.plan", "PlanError"),
        ("san.protocol.grid", "EmptyGridError"),
        ("san.protocol.selection", "SelectionError"),
        ("san.report.results", "ReportError"),
        ("san.locks", "RunBusyError"),
        ("san.trainer", "PrecisionError"),
        ("san.trainer", "CheckpointError"),
        ("san.trainer", "TrainingInterrupted"),
    ],
)
def test_errors_raised_on_purpose_are_user_errors(module, name):
    """Each reaches the user as one clean message (exit 2), not a traceback."""
    from san.errors import UserError

    assert issubclass(getattr(importlib.import_module(module), name), UserError)
