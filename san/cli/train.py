"""`san-train`: one run, configured by Hydra overrides; prints the record path last."""

from omegaconf import DictConfig

from san.cli.console import hydra_script


def train(cfg: DictConfig) -> None:
    from san.distributed import placement_from_environment
    from san.run import run  # imported after composition: a bad override is reported sooner

    path = run(cfg)
    placement = placement_from_environment()  # torchrun / srun: one line from rank 0, not one per process
    if placement is None or placement.rank == 0:
        print(path, flush=True)


main = hydra_script("san-train", train)


if __name__ == "__main__":
    main()
