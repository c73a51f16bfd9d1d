"""The task Hydra's launchers run for san-sweep: one entry of a jobs file per job.

san-sweep calls `python -m san.cli.hydra_job --multirun launcher=<name> +jobs_file=...
+job_index=0,1,...`; the composed config only carries the launcher settings, the run's
own config comes resolved from the jobs file. On SLURM, submitit requeues a preempted
or timed-out job, and `run()` resumes it from its last epoch checkpoint.
"""

from omegaconf import DictConfig

from san.cli.console import hydra_script


def run_job(cfg: DictConfig) -> None:
    from san.cli.job import run_entry

    print(run_entry(cfg.jobs_file, int(cfg.job_index)), flush=True)


main = hydra_script("san.cli.hydra_job", run_job)


if __name__ == "__main__":
    main()
