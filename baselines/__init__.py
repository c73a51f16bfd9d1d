"""Baseline methods, a plugin of the suite (entry point `baselines` in pyproject.toml).

Importing the package imports every module in it, and each registers its methods: a new
baseline is one new module here, nothing else to list.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
