"""SSF (Scaling & Shifting Features; Lian et al., NeurIPS 2022): `gamma * x + beta` after
every SSF position, initialised N(1, .02) / N(0, .02), no weight decay, folded on merge.

Built on the scaling layers SAN shares (san.methods.scaling); SSF places them and stops,
SAN also propagates each scale into the next weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from san.methods.anatomy import ALL_POSITIONS, backbone_anatomy
from san.methods.base import AdaptedModel, MethodConfig
from san.methods.registry import register_method
from san.methods.scaling import fold_all, place_scales, positions_on, scale_parameters

# SSF's insertion points on each architecture are what san/methods/anatomy.py names.
ALL = "all"


@dataclass
class SSFConfig(MethodConfig):
    positions: list[str] | str = field(
        default=ALL,
        metadata={
            "help": f"'all' (SSF's insertion points on the architecture, san/methods/anatomy.py) or a list from "
            f"{list(ALL_POSITIONS)}."
        },
    )
    # SSF's code (ssf_ada): gamma ~ N(1, .02), beta ~ N(0, .02).
    shift: bool = field(default=True, metadata={"help": "Add the shift vector beta beside each scale."})
    init_std: float = field(
        default=0.02, metadata={"help": "Scales ~ N(1, std), shifts ~ N(0, std); 0 starts at the identity."}
    )

    def __post_init__(self):
        if isinstance(self.positions, str) and self.positions != ALL:
            raise ValueError(f"positions is {ALL!r} or a list, not {self.positions!r}")
        unknown = sorted(set(self.position_list()) - set(ALL_POSITIONS))
        if unknown:
            raise ValueError(f"unknown SSF positions {unknown}; accepted: {list(ALL_POSITIONS)}")

    def position_list(self) -> list[str]:
        return list(ALL_POSITIONS) if self.positions == ALL else list(self.positions)


class SSFModel(AdaptedModel):
    """SSF: a learned scale and shift after every SSF position; merges into the weights."""

    config_class = SSFConfig

    def _adapt(self, model: nn.Module) -> None:
        cfg = self.config
        anatomy = backbone_anatomy(model, self.method_name)
        positions = positions_on(anatomy, cfg.position_list(), cfg.positions == ALL, self.method_name)
        self.scales = place_scales(model, anatomy, positions, cfg.shift, cfg.init_std).all()

    def _method_parameters(self):
        return scale_parameters(self.scales)

    def _no_weight_decay_parameters(self):
        return self._method_parameters()

    def _merge_into(self, model: nn.Module) -> nn.Module:
        return fold_all(model)


register_method("ssf", SSFModel)
