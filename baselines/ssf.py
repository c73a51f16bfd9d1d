"""SSF (Scaling & Shifting Features; Lian et al., NeurIPS 2022): `gamma * x + beta` after
every SSF position, initialised N(1, .02) / N(0, .02), no weight decay, folded on merge.

The same layers as SAN with no propagation edges (SAN is SSF plus synapses).
"""

from dataclasses import dataclass, field

from san.methods.registry import register_method
from san.methods.san import SANConfig, SANModel


@dataclass
class SSFConfig(SANConfig):
    positions: list[str] | str = field(default="all", metadata={
        "help": "SSF's insertion points on the architecture (see san/methods/anatomy.py), or a list."})
    edges: list[str] | str = field(default="none", metadata={"help": "SSF propagates nothing."})


class SSFModel(SANModel):
    config_class = SSFConfig


register_method("ssf", SSFModel)
