"""The VTAB-1K / FGVC protocol: tune on val, select, refit on train+val with seeds, test once.

`plan` turns an experiment config into jobs, `selection` chooses a grid point per cell
from validation metrics only, `executors` run jobs (in this process, in parallel local
processes, or through a Hydra launcher such as submitit), and `sweep` chains them.
"""
