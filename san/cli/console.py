"""How every console script fails: what the user can fix is one message and exit status 2.

`console_script(prog)` wraps a script's `main(argv)`; `hydra_script(prog, task)` makes the
`main` of a `@hydra.main` task. These print as `<prog>: error: <message>` and exit with
status 2, without a traceback:

- a `san.errors.UserError` (the suite's own named errors: dataset, verification, weights,
  unsupported backbone, unknown method, config values);
- Hydra's composition errors (unknown config option, unknown key, unparsable override),
  rewritten to name the accepted options and a command that works;
- an unset (`???`) or unresolvable `${...}` config value;
- `SystemExit("message")`, printed as it is.

Any other exception is a bug and keeps its traceback (Hydra's shortened one for a Hydra
task). `--debug` anywhere on a command line, or HYDRA_FULL_ERROR=1, prints the traceback
of a user error as well (the exit status stays 2), and Hydra's full traceback of a bug.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import sys
import traceback
from typing import Any, Callable, Iterator

from san.errors import UserError

EXIT_USER_ERROR = 2
DEBUG_FLAG = "--debug"
FULL_ERROR_ENV = "HYDRA_FULL_ERROR"


class UserExit(SystemExit):
    """Exit status 2 once the message is printed; str() stays the message (tests match on it)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = EXIT_USER_ERROR


def _debug() -> bool:
    return os.environ.get(FULL_ERROR_ENV) == "1"


def user_message(error: BaseException, prog: str | None) -> str | None:
    """The message to print for an error the user can fix; None for a bug.

    `prog` is the script whose command line takes Hydra overrides, for the example commands;
    None for a script that composes its configs itself (san-bench)."""
    if isinstance(error, UserError):
        return str(error)
    if "hydra" in sys.modules:
        from hydra.errors import CompactHydraException

        if isinstance(error, CompactHydraException):
            return hydra_message(error, prog)
    if "omegaconf" in sys.modules:
        from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

        command = f"{prog} " if prog else ""
        if isinstance(error, MissingMandatoryValue):
            return f"{error.full_key} has no value (it is ??? in the config); set it: {command}{error.full_key}=<value>"
        if isinstance(error, InterpolationResolutionError):
            return (
                f"cannot resolve {error.full_key}: {error.msg}; fix the ${{...}} reference in the config "
                f"or override the value: {command}{error.full_key}=<value>"
            )
    return None


def hydra_message(error: Exception, prog: str | None) -> str:
    """One message for a Hydra composition error, with the accepted options and a command that works."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ValidationError

    if isinstance(error, MissingConfigException) and error.options:
        group, _, name = (error.missing_cfg_file or "").rpartition("/")
        options = sorted(error.options)
        close = difflib.get_close_matches(name, options, n=1)
        message = f"unknown {group} {name!r}; accepted: {', '.join(options)} (configs/{group}/)."
        if prog:
            return f"{message} For example: {prog} {group}={(close or options)[0]}"
        return f"{message} Did you mean {close[0]!r}?" if close else message
    command = f"{prog} " if prog else ""
    if isinstance(error, OverrideParseException):
        detail = [
            line
            for line in error.message.splitlines()
            if line and not line.startswith(("See ", "Error parsing override"))
        ]
        return (
            f"cannot parse the override {error.override!r} ({'; '.join(detail)}). Overrides are key=value, "
            f"e.g. {command}optim.lr=0.01 trainer.epochs=5; quote a value that holds brackets or spaces "
            "('key=[1,2]'). Grammar: https://hydra.cc/docs/1.3/advanced/override_grammar/basic/"
        )
    cause = error.__cause__
    if isinstance(error, ConfigCompositionException) and isinstance(cause, ValidationError):
        # a value of the wrong type for a typed setting (a method's dataclass field)
        reason = str(cause.msg).splitlines()[0]
        return f"{cause.full_key}: {reason}; `san-params method=<name> --describe` lists each setting's type"
    if (
        isinstance(error, ConfigCompositionException)
        and getattr(cause, "full_key", None)
        and getattr(cause, "parent_node", None) is not None
    ):
        key = cause.full_key
        parent, _, leaf = key.rpartition(".")
        accepted = sorted(str(k) for k in cause.parent_node.keys())
        close = difflib.get_close_matches(leaf, accepted, n=1)
        where = f"{parent}." if parent else ""
        guess = f"; did you mean {where}{close[0]}?" if close else "."
        return (
            f"the config has no setting {key!r}{guess} Accepted under {parent or 'the root'}: "
            f"{', '.join(accepted)}. To add a new key on purpose, prefix it with '+': {command}+{key}=<value>"
        )
    # Other composition errors are short and say what to do; drop the search-path listing.
    return str(error).split("\nConfig search path:")[0].strip()


@contextlib.contextmanager
def reporting_user_errors(prog: str, overrides: bool = True) -> Iterator[None]:
    """Turn a user error raised inside into one message on stderr and exit status 2.

    `overrides`: the script's command line takes Hydra overrides (the messages then show them)."""
    try:
        yield
    except UserExit:
        raise
    except SystemExit as exit:
        if not isinstance(exit.code, str):
            raise
        if _debug():
            traceback.print_exc()
        print(exit.code, file=sys.stderr, flush=True)
        raise UserExit(exit.code) from None
    except Exception as error:
        message = user_message(error, prog if overrides else None)
        if message is None:
            raise
        if _debug():
            traceback.print_exc()
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        raise UserExit(message) from None


def _strip_debug_flag(argv: list[str]) -> list[str]:
    """`--debug` means HYDRA_FULL_ERROR=1 for this process (and what it starts)."""
    if DEBUG_FLAG in argv:
        os.environ[FULL_ERROR_ENV] = "1"
    return [arg for arg in argv if arg != DEBUG_FLAG]


def console_script(prog: str, overrides: bool = True) -> Callable[[Callable[[list[str]], Any]], Callable[..., Any]]:
    """Decorate a `main(argv)`: user errors become one message and exit status 2; see the module doc.

    `overrides=False` for a script whose command line takes no Hydra overrides."""

    def decorate(main: Callable[[list[str]], Any]) -> Callable[..., Any]:
        @functools.wraps(main)
        def wrapped(argv: list[str] | None = None) -> Any:
            argv = _strip_debug_flag(list(sys.argv[1:] if argv is None else argv))
            with reporting_user_errors(prog, overrides):
                return main(argv)

        return wrapped

    return decorate


def hydra_script(prog: str, task: Callable[[Any], Any], config_name: str = "config") -> Callable[..., None]:
    """The console `main` of a Hydra task function (what `@hydra.main` would decorate).

    Hydra catches every exception itself, prints a traceback and exits with 1, unless
    HYDRA_FULL_ERROR=1. So that its composition errors (unknown option, bad override) reach
    `reporting_user_errors`, the variable is set while Hydra composes, and put back to the
    user's value before the task runs; the task's own user errors are reported inside it
    (a SystemExit passes through Hydra), and its bugs get Hydra's usual report.
    """
    import hydra

    from san.config import config_dir, prepare_config_store

    user_setting: dict[str, str | None] = {}

    def restore() -> None:
        if user_setting.get(FULL_ERROR_ENV) is None:
            os.environ.pop(FULL_ERROR_ENV, None)
        else:
            os.environ[FULL_ERROR_ENV] = user_setting[FULL_ERROR_ENV]

    @functools.wraps(task)
    def job(cfg: Any) -> Any:
        restore()
        with reporting_user_errors(prog):
            return task(cfg)

    @console_script(prog)
    def main(argv: list[str]) -> None:
        prepare_config_store()
        hydra_main = hydra.main(config_path=config_dir(), config_name=config_name, version_base="1.3")(job)
        sys.argv = [sys.argv[0], *argv]  # Hydra parses sys.argv itself
        user_setting[FULL_ERROR_ENV] = os.environ.get(FULL_ERROR_ENV)
        os.environ[FULL_ERROR_ENV] = "1"
        try:
            hydra_main()
        finally:
            restore()

    return main
