"""Linear probing: only the classifier head trains."""

from dataclasses import dataclass

from san.methods.base import AdaptedModel, MethodConfig
from san.methods.registry import register_method


@dataclass
class LinearProbeConfig(MethodConfig):
    """Linear probing has no settings beyond the shared ones."""


class LinearProbe(AdaptedModel):
    config_class = LinearProbeConfig


register_method("linear", LinearProbe)
