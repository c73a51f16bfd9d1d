"""Accuracy vs trainable parameters, and per-task bars; PNG and PDF, no display needed."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from san.report.tables import MEAN_ALL, PARAMS, SuiteTable  # noqa: E402

# A method with no trainable parameters besides the head (linear probing) sits at this
# x on the log axis, labelled as 0.
ZERO_PARAMS_AT = 1e-3


def _save(figure: plt.Figure, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        # Fixed metadata so the same table gives the same files.
        metadata = {"Software": None} if path.suffix == ".png" else {"CreationDate": None, "Producer": None}
        figure.savefig(path, dpi=150, bbox_inches="tight", metadata=metadata)
    plt.close(figure)
    return paths


def accuracy_vs_params(table: SuiteTable, stem: Path) -> list[Path]:
    """One panel per task group (and the overall mean), one point per method."""
    panels = ([name.capitalize() for name in table.groups] if len(table.groups) > 1 else []) + [MEAN_ALL]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for axis, column in zip(axes[0], panels):
        for row in table.rows:
            accuracy, params = row.cells[column].mean, row.cells[PARAMS].mean
            if accuracy is None or params is None:
                continue
            x = max(params, ZERO_PARAMS_AT)
            published = row.source == "published"
            axis.scatter(
                [x],
                [accuracy],
                s=48,
                marker="o" if not published else "s",
                facecolors="none" if published else "C0",
                edgecolors="C1" if published else "C0",
                zorder=3,
            )
            axis.annotate(row.label, (x, accuracy), textcoords="offset points", xytext=(4, 3), fontsize=7)
        axis.set_xscale("log")
        axis.set_xlabel("trainable params w/o head (M)")
        axis.set_ylabel(f"{column} top-1 (%)")
        axis.set_title(column)
        axis.grid(True, which="both", alpha=0.3)
    figure.suptitle(
        f"{table.title} ({table.backbone}): filled = measured, hollow squares = published; "
        f"0 parameters drawn at {ZERO_PARAMS_AT:g}"
    )
    figure.tight_layout()
    return _save(figure, stem)


def per_task_bars(table: SuiteTable, stem: Path, methods: list[str] | None = None) -> list[Path]:
    rows = [r for r in table.rows if r.source == "measured" and (methods is None or r.method in methods)]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.6 * len(table.tasks) * max(1, len(rows))), 3.8))
    width = 0.8 / max(1, len(rows))
    for index, row in enumerate(rows):
        xs = [t + index * width for t in range(len(table.tasks))]
        heights = [row.cells[task].mean or 0.0 for task in table.tasks]
        errors = [row.cells[task].std or 0.0 for task in table.tasks]
        axis.bar(xs, heights, width, yerr=errors, label=row.method, capsize=2)
    axis.set_xticks([t + 0.4 - width / 2 for t in range(len(table.tasks))], table.tasks, rotation=45, ha="right")
    axis.set_ylabel("test top-1 (%)")
    axis.set_title(f"{table.title} ({table.backbone}) per task; missing cells drawn at 0")
    axis.legend(fontsize=8)
    return _save(figure, stem)
