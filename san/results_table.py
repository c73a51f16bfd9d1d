"""A compact table of result records: methods x tasks, mean over seeds, plus parameters."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from san.records import find_records, read_record


def load_records(root: Path, stage: str | None = None) -> pd.DataFrame:
    rows = []
    for path in find_records(root):
        record = read_record(path)
        if record.get("status") != "complete" or (stage and record.get("stage") != stage):
            continue
        metric = f"{record['splits']['evaluate']}_top1"
        rows.append({
            "backbone": record["backbone"]["name"], "method": record["method"]["name"],
            "task": record["task"], "seed": record["seed"], "metric": metric,
            "top1": record["metrics"]["final"][metric],
            "params_m": record["params"]["trainable_without_head"] / 1e6,
            "wall_s": record["cost"]["wall_s"], "path": str(path),
        })
    return pd.DataFrame(rows)


def method_by_task(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean top-1 over seeds per (method, task), a mean column, and trainable params (M)."""
    table = frame.pivot_table(index="method", columns="task", values="top1", aggfunc="mean")
    table["mean"] = table.mean(axis=1, skipna=False)
    table["params_m"] = frame.groupby("method")["params_m"].first()
    return table


def to_markdown(table: pd.DataFrame, digits: int = 1) -> str:
    header = ["method", *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, row in table.iterrows():
        cells = [f"{v:.3f}" if name == "params_m" else ("-" if pd.isna(v) else f"{v:.{digits}f}")
                 for name, v in row.items()]
        lines.append("| " + " | ".join([str(method), *cells]) + " |")
    return "\n".join(lines)
