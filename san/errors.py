"""The base class of the errors a person can act on. Imports nothing, so any module can use it.

An error derived from `UserError` is raised on purpose: its message names the bad value,
file or line, and says what to run or set to fix it. Every console script prints such an
error as one message and exits with status 2, without a traceback (`san.cli.console`);
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Raised on purpose; the message says what is wrong and the command or setting that fixes it."""


class ConfigError(UserError, ValueError):
    """A config value or command-line override is invalid: the message names it and the accepted values."""
