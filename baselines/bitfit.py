"""BitFit (Ben Zaken et al., 2022): train every bias of the backbone, plus the head.

Biases are found structurally: each module's own `bias` parameter (Linear, Conv,
LayerNorm/BatchNorm affine shift), so norm shifts count, as in the published ViT-B/16
count of 102,912.
"""

from dataclasses import dataclass

from torch import nn

from san.methods.base import AdaptedModel, MethodConfig
from san.methods.registry import register_method


@dataclass
class BitFitConfig(MethodConfig):
    """BitFit has no settings beyond the shared ones."""


class BitFit(AdaptedModel):
    config_class = BitFitConfig

    def _method_parameters(self):
        for module in self.model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                yield bias


register_method("bitfit", BitFit)
