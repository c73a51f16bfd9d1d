"""Baseline methods. Importing this package registers each of them."""

from baselines import bitfit, full, linear  # noqa: F401
