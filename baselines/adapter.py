"""Bottleneck adapters around every transformer MLP: sequential, after the MLP, as in
Houlsby / Pfeiffer-style adapters (`adapter`), or parallel to the MLP and scaled (the
`adaptformer` variant, configs/method/adaptformer.yaml).

Sequential:  h = MLP(u);  out = h + up(act(down(h)))
Parallel:    out = MLP(u) + scale * up(act(down(u)))      (AdaptFormer's equations, u = LN(x))

`up` starts at zero, so the initial function is the backbone's. One dim-8 bottleneck with
biases per ViT-B/16 block is 12 x (768*8 + 8 + 8*768 + 768) = 156,768 parameters (the
published 0.16 M). The MLPs are found structurally: every timm `Mlp` module (ViT, DINOv2,
Swin, and ConvNeXt's channels-last MLP). Not mergeable: the bottleneck is nonlinear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from timm.layers import Mlp
from torch import nn

from san.methods.base import AdaptedModel, MethodConfig, UnsupportedBackboneError
from san.methods.registry import register_method
from san.methods.surgery import replace_module

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


@dataclass
class AdapterConfig(MethodConfig):
    dim: int = field(default=8, metadata={"help": "Bottleneck width."})
    activation: str = field(default="relu", metadata={"help": f"Bottleneck non-linearity: {sorted(ACTIVATIONS)}."})
    scale: float = field(default=1.0, metadata={"help": "Multiplier of the adapter's output."})
    parallel: bool = field(
        default=False,
        metadata={"help": "Parallel to the MLP, reading its input (AdaptFormer), or sequential after it."},
    )

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown adapter activation {self.activation!r}; accepted: {sorted(ACTIVATIONS)}")


class Bottleneck(nn.Module):
    def __init__(self, width: int, dim: int, activation: str, scale: float):
        super().__init__()
        self.down = nn.Linear(width, dim)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(dim, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, x):
        return self.scale * self.up(self.act(self.down(x)))


class AdaptedMlp(nn.Module):
    def __init__(self, mlp: Mlp, adapter: Bottleneck, parallel: bool):
        super().__init__()
        self.mlp, self.adapter, self.parallel = mlp, adapter, parallel

    def forward(self, x):
        h = self.mlp(x)
        return h + self.adapter(x if self.parallel else h)


class Adapter(AdaptedModel):
    """A bottleneck adapter around every transformer MLP (timm Mlp); not mergeable."""

    config_class = AdapterConfig
    mergeable = False

    def _adapt(self, model: nn.Module) -> None:
        mlps = [m for m in model.modules() if isinstance(m, Mlp)]
        if not mlps:
            raise UnsupportedBackboneError(
                f"{self.method_name} wraps transformer MLP blocks (timm Mlp); {type(model).__name__} has none"
            )
        cfg = self.config
        for mlp in mlps:
            # the MLP's input width is its output width in every pre-norm block
            width = mlp.fc2.out_features
            replace_module(
                model, mlp, AdaptedMlp(mlp, Bottleneck(width, cfg.dim, cfg.activation, cfg.scale), cfg.parallel)
            )

    def _method_parameters(self):
        for module in self.model.modules():
            if isinstance(module, Bottleneck):
                yield from module.parameters()


register_method("adapter", Adapter)
