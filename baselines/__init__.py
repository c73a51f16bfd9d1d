"""Baseline methods. Importing this package registers each of them."""

from baselines import bitfit, full, linear, ssf  # noqa: F401
