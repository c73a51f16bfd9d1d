"""Baseline methods. Importing this package registers each of them."""

from baselines import adapter, bitfit, full, linear, peft_family, ssf, vpt  # noqa: F401
