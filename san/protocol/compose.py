"""Job configs without one Hydra composition per job.

A Hydra composition takes 0.05-0.25 s, and the sweep used to compose every job: 3,420 for
`make vtab`, minutes before the first run and again on every resume. The jobs of one cell
share every config-group choice and differ only in value overrides (the seed, the grid
point), and Hydra applies value overrides after it has merged the defaults list. So each
distinct list of cell overrides is composed once, and a job's value overrides are written
into that composition's resolved config.

That equals Hydra's result only when the override sets an existing plain value that no
interpolation reads. Any other override (a new key `+x`, `++x`, a deletion `~x`, a config
group, a list or dict value, an interpolation, a sweep `a=1,2`, a key that is missing, typed
or read-only, or one that an interpolation reads, such as `paths.data_dir`) makes that job
compose in full, so its result and its error are Hydra's own.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import AnyNode, DictConfig, OmegaConf

from san.config import compose_config
from san.identity import resolved

# The innermost `${...}` of an interpolation string.
_INNERMOST = re.compile(r"\$\{([^${}]*)\}")
# Resolvers that read the environment, never the config.
_CONFIG_FREE_RESOLVERS = {"oc.env"}
_PLAIN_KEY = re.compile(r"^[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*$")


@functools.lru_cache(maxsize=None)
def _parse(override: str) -> Override:
    return OverridesParser.create().parse_overrides([override])[0]


def interpolation_references(config: DictConfig) -> set[str] | None:
    """Every config key the config's interpolations read, or None if that cannot be told
    (a relative `${.x}` or an index, or a resolver other than `oc.env`)."""
    references: set[str] = set()

    def visit(value: Any) -> bool:
        if isinstance(value, dict):
            return all(visit(v) for v in value.values())
        if isinstance(value, list):
            return all(visit(v) for v in value)
        if not isinstance(value, str) or "${" not in value:
            return True
        text = value
        while True:
            match = _INNERMOST.search(text)
            if match is None:
                return "${" not in text
            inner = match.group(1).strip()
            if ":" in inner:
                if inner.split(":", 1)[0].strip() not in _CONFIG_FREE_RESOLVERS:
                    return False
            elif _PLAIN_KEY.match(inner):
                references.add(inner)
            else:
                return False
            text = text[: match.start()] + "_" + text[match.end() :]

    return references if visit(OmegaConf.to_container(config, resolve=False)) else None


def plain_value_keys(config: DictConfig, prefix: str = "") -> Iterator[str]:
    """Dotted keys of untyped, writable values reached through plain (not missing, not
    interpolated) nodes: the only keys a job's override may set without composing."""
    for key in config.keys():
        if not isinstance(key, str):
            continue
        node = config._get_node(key)
        if isinstance(node, DictConfig):
            if not (node._is_missing() or node._is_none() or node._is_interpolation()):
                yield from plain_value_keys(node, f"{prefix}{key}.")
        elif type(node) is AnyNode and not node._get_flag("readonly"):  # typed nodes convert or reject values
            yield f"{prefix}{key}"


@dataclass(frozen=True)
class Base:
    """What the jobs of a cell share: the resolved composition and what may be written into it."""

    resolved: dict[str, Any]
    plain_keys: frozenset[str]
    references: frozenset[str] | None

    @classmethod
    def of(cls, config: DictConfig) -> "Base":
        references = interpolation_references(config)
        return cls(
            resolved(config), frozenset(plain_value_keys(config)), None if references is None else frozenset(references)
        )

    def settable(self, override: Override) -> bool:
        """True if writing this override into `resolved` gives exactly what Hydra would."""
        if (
            override.type != OverrideType.CHANGE
            or override.package is not None
            or override.is_sweep_override()
            or override.is_hydra_override()
        ):
            return False
        key = override.key_or_group
        if self.references is None or key not in self.plain_keys:
            return False
        value = override.value()
        if not (value is None or isinstance(value, (bool, int, float, str))):
            return False
        if isinstance(value, str) and ("$" in value or "\\" in value or value == "???"):
            return False  # interpolations, escapes and MISSING have their own meaning in OmegaConf
        return not any(ref == key or ref.startswith(key + ".") or key.startswith(ref + ".") for ref in self.references)


class CellComposer:
    """Composes each distinct list of cell overrides once (`compositions` counts them).

    Bases keep plain dicts only (an OmegaConf tree of a few hundred nodes per cell would add
    up over the 456 cell x stage compositions of `make vtab`)."""

    def __init__(self, compose: Callable[[list[str]], DictConfig] | None = None):
        self._compose = compose or compose_config
        self._bases: dict[tuple[str, ...], Base] = {}
        self.compositions = 0

    def _composed(self, overrides: list[str]) -> DictConfig:
        self.compositions += 1
        return self._compose(overrides)

    def base(self, cell_overrides: Sequence[str]) -> Base:
        key = tuple(cell_overrides)
        if key not in self._bases:
            self._bases[key] = Base.of(self._composed(list(key)))
        return self._bases[key]

    def config(self, cell_overrides: Sequence[str], job_overrides: Sequence[str]) -> dict[str, Any]:
        """The resolved config of `compose_config([*cell_overrides, *job_overrides])`."""
        base = self.base(cell_overrides)
        parsed = [_parse(o) for o in job_overrides]
        if not all(base.settable(o) for o in parsed):
            return resolved(self._composed([*cell_overrides, *job_overrides]))
        config = copy.deepcopy(base.resolved)
        for override in parsed:
            *parents, leaf = override.key_or_group.split(".")
            node = config
            for part in parents:
                node = node[part]
            node[leaf] = override.value()
        return config
