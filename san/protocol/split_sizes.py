"""How many images a run fits on and evaluates, from tables, never from the data folder.

The sweep's cost account is computed before any data exists (on a laptop, for a cluster),
so split sizes come from what the suite states: VTAB-1K's fixed 800/200/1000 and each
task's test slice resolved by `san.data.vtab_spec` from the tfds split sizes below, FGVC's
`expected_counts` in the dataset config (VPT's sizes, derived in `san.data.fgvc_sources`),
and the demo suite's generator sizes.
"""

from __future__ import annotations

from typing import Any, Mapping

from san.data import vtab_spec
from san.data.demo_suite import DIGITS_IMAGES, PROCEDURAL_TEST_SIZE, SPLIT_SIZES
from san.data.vtab_folder import VTAB_COUNTS
from san.errors import UserError

# The demo suite's test splits: scikit-learn's digits less train800 + val200, and
# the procedural tasks' generated test size.
DEMO_TEST_SIZES = {
    "digits": DIGITS_IMAGES - sum(SPLIT_SIZES.values()),
    "shape_loc": PROCEDURAL_TEST_SIZE,
    "shape_ori": PROCEDURAL_TEST_SIZE,
    "object_count": PROCEDURAL_TEST_SIZE,
}


class UnknownSplitSizeError(UserError, KeyError):
    pass


def split_file_size(dataset: Mapping[str, Any], split: str) -> int:
    """Images in one split file (`train800`, `test`, FGVC's `val`, ...) of a dataset config."""
    name, suite = dataset["name"], dataset.get("suite")
    if dataset.get("expected_counts") and split in dataset["expected_counts"]:
        return int(dataset["expected_counts"][split])
    if dataset.get("format") == "vtab_folder" and split in VTAB_COUNTS:
        return VTAB_COUNTS[split]
    if suite == "vtab" and split == "test" and name in vtab_spec.TASKS:
        # the published copies' test size (tests/test_vtab_spec.py derives it from the tfds split
        # sizes with the reference code's slice arithmetic)
        return vtab_spec.TASKS[name].test_count
    if suite == "demo" and split == "test" and dataset.get("folder") in DEMO_TEST_SIZES:
        return DEMO_TEST_SIZES[dataset["folder"]]
    raise UnknownSplitSizeError(
        f"no stated size for split {split!r} of dataset {name!r} (suite {suite!r}); add `expected_counts` "
        "to its dataset config, or its sizes to san/protocol/split_sizes.py"
    )


def role_size(dataset: Mapping[str, Any], role: str) -> int:
    """Images of a protocol role (`train`, `val`, `trainval`, `test`): a split or a list of them."""
    splits = dataset["splits"][role]
    return sum(split_file_size(dataset, s) for s in ([splits] if isinstance(splits, str) else splits))
