"""Where the Hydra config tree is, and composing it outside `@hydra.main`.

Used by the console scripts, the protocol and the report alike (a neutral home). The
`method` group is two sources: each registered method's dataclass (the ConfigStore,
see san.methods.registry) and the named variants in configs/method/*.yaml.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def prepare_config_store() -> None:
    """Put every registered method's dataclass into Hydra's `method` group (before composing)."""
    from san.methods.registry import store_method_configs

    store_method_configs()


def group_options(group: str) -> list[str]:
    """The options of a config group: its YAML files, and for `method` the registered methods."""
    names = {path.stem for path in Path(config_dir(), group).glob("*.yaml")}
    if group == "method":
        from san.methods.registry import available_methods

        names |= set(available_methods())
    return sorted(names)


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    from hydra import compose, initialize_config_dir

    prepare_config_store()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))
