"""`san-train`: one run, configured by Hydra overrides; prints the record path last."""

import hydra
from omegaconf import DictConfig

from san.cli.config import config_dir
from san.run import run


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(run(cfg), flush=True)


if __name__ == "__main__":
    main()
