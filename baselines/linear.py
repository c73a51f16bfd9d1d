"""Linear probing: only the classifier head trains."""

from dataclasses import dataclass

from san.methods.base import MethodConfig, PeftModel
from san.methods.registry import register_method


@dataclass
class LinearProbeConfig(MethodConfig):
    """Linear probing has no settings beyond the shared ones."""


class LinearProbe(PeftModel):
    config_class = LinearProbeConfig


register_method("linear", LinearProbe)
