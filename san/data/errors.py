"""Dataset errors and verification reports. Each message names the file (and line or entry) at fault."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from san.errors import UserError


class DatasetError(UserError, ValueError):
    """A dataset folder or split list is missing or malformed; the message says where."""


class MissingDatasetError(DatasetError, FileNotFoundError):
    pass


class LabelRangeError(DatasetError):
    pass


class ClassCountMismatchError(DatasetError):
    pass


@dataclass
class VerifyReport:
    """Every problem a verifier found (not just the first); notes are facts that are not errors."""

    name: str  # the canonical task or dataset name (aliases resolved)
    folder: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    variant: str | None = None  # VTAB: the manifest's data_variant, or "external:<layout>" without one

    @property
    def ok(self) -> bool:
        return not self.problems
