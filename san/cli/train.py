"""`san-train`: one run, configured by Hydra overrides; prints the record path last."""

from omegaconf import DictConfig

from san.cli.console import hydra_script


def train(cfg: DictConfig) -> None:
    from san.run import run  # imported after composition: a bad override is reported sooner

    print(run(cfg), flush=True)


main = hydra_script("san-train", train)


if __name__ == "__main__":
    main()
