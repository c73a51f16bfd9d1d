"""Where the Hydra config tree is, and composing it outside `@hydra.main`."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from san.errors import ConfigError


def config_dir() -> str:
    """`configs/` at the project root (the package is installed editable), or $SAN_CONFIG_DIR."""
    directory = Path(os.environ.get("SAN_CONFIG_DIR") or Path(__file__).resolve().parents[1] / "configs")
    if not (directory / "config.yaml").is_file():
        raise ConfigError(
            f"no Hydra config tree at {directory} (no config.yaml there); run from a checkout installed "
            "editable (`make install`), or point SAN_CONFIG_DIR at the checkout's configs/ folder: "
            "export SAN_CONFIG_DIR=/path/to/checkout/configs"
        )
    return str(directory)


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))
