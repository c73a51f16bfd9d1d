"""Full fine-tuning: every parameter trains (the upper-cost reference point)."""

from dataclasses import dataclass, field

from san.methods.base import AdaptedModel, MethodConfig
from san.methods.registry import register_method


@dataclass
class FullFinetuneConfig(MethodConfig):
    update_batchnorm_stats: bool = field(
        default=True, metadata={"help": "Full fine-tuning updates BatchNorm statistics too."}
    )


class FullFinetune(AdaptedModel):
    config_class = FullFinetuneConfig

    def _method_parameters(self):
        return self.model.parameters()


register_method("full", FullFinetune)
