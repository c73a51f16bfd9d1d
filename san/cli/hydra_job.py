"""The task Hydra's launchers run for san-sweep: one entry of a jobs file per job.

san-sweep calls `python -m san.cli.hydra_job --multirun launcher=<name> +jobs_file=...
+job_index=0,1,...`; the composed config only carries the launcher settings, the run's
own config comes resolved from the jobs file. On SLURM, submitit requeues a preempted
or timed-out job, and `run()` resumes it from its last epoch checkpoint.
"""

import hydra
from omegaconf import DictConfig

from san.cli.config import config_dir
from san.cli.job import run_entry


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(run_entry(cfg.jobs_file, int(cfg.job_index)), flush=True)


if __name__ == "__main__":
    main()
