"""SSF (Scaling & Shifting Features; Lian et al., NeurIPS 2022): `gamma * x + beta` after
every SSF position, initialised N(1, .02) / N(0, .02), no weight decay, folded on merge.

The same layers as SAN with no propagation edges (SAN is SSF plus synapses).
"""

from dataclasses import dataclass, field

from san.methods.anatomy import ALL_POSITIONS
from san.methods.registry import register_method
from san.methods.san import SANConfig, SANModel


@dataclass
class SSFConfig(SANConfig):
    positions: list[str] = field(default_factory=lambda: list(ALL_POSITIONS),
                                 metadata={"help": "SSF's positions: after patch_embed, the six block outputs, the final norm."})
    edges: list[str] | str = field(default="none", metadata={"help": "SSF propagates nothing."})


class SSFModel(SANModel):
    config_class = SSFConfig


register_method("ssf", SSFModel)
