"""The VTAB-1K / FGVC protocol: tune on val, select, refit on train+val with seeds, test once.

`plan` turns an experiment config into jobs (`compose`: one Hydra composition per cell and
stage, the jobs' own overrides written into it), `selection` chooses a grid point per cell
from validation metrics only, `executors` run jobs (in this process, in parallel local
processes, or through a Hydra launcher such as submitit), and `sweep` chains them. `costs`
is the dry run's account of what a sweep will cost, from `split_sizes` and `model_costs`.
"""
