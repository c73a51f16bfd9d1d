"""Hyperparameter grids are data (configs/sweep/*.yaml); this expands them into points.

A point is a tuple of Hydra overrides ("optim.lr=0.005", ...), in the order the grid file
lists its axes and values, which is also the order selection falls back on for ties.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Mapping, Sequence

from san.errors import UserError

Point = tuple[str, ...]


class EmptyGridError(UserError, ValueError):
    pass


def format_override(key: str, value: Any) -> str:
    """`key=value` in Hydra's override grammar (lists and strings quoted where needed)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, (list, tuple)):
        text = "[" + ",".join(format_override("_", v).split("=", 1)[1] for v in value) + "]"
    elif isinstance(value, str):
        text = value if value.replace("_", "").replace("-", "").replace(".", "").isalnum() else json.dumps(value)
    else:
        text = repr(value)
    return f"{key}={text}"


def expand_axes(axes: Mapping[str, Sequence[Any]]) -> list[Point]:
    """Every combination of the axes' values; an axis with no values is an error."""
    for key, values in axes.items():
        if not isinstance(values, Sequence) or isinstance(values, str) or len(values) == 0:
            raise EmptyGridError(f"grid axis {key!r} has no values (got {values!r}); give it a list")
    keys = list(axes)
    return [
        tuple(format_override(k, v) for k, v in zip(keys, combo))
        for combo in itertools.product(*(axes[k] for k in keys))
    ]


def grid_points(sweep: Mapping[str, Any], method: str) -> list[Point]:
    """The shared lr x wd grid crossed with the method's own axes (rank, prompt length...)."""
    axes = dict(sweep.get("grid") or {})
    axes.update((sweep.get("method_axes") or {}).get(method) or {})
    if not axes:
        raise EmptyGridError(f"sweep {sweep.get('name')!r} has no axes for method {method!r}")
    return expand_axes(axes)


def task_overrides(sweep: Mapping[str, Any], task: str) -> Point:
    """Fixed per-task settings (e.g. drop path), applied in tune and final alike."""
    fixed = (sweep.get("task_overrides") or {}).get(task) or {}
    return tuple(format_override(k, v) for k, v in fixed.items())
