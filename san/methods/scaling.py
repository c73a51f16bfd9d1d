"""Layers shared by SSF and SAN: a per-channel scale/shift on a module's output
("neuron"), and a linear layer whose input columns are scaled by another layer's scale
("synapse", propagation). Both fold into plain weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

# Modules whose output channels sit on axis 1 (NCHW); everything else is channels-last.
_CHANNEL_FIRST = (nn.Conv2d, nn.BatchNorm2d, LayerNorm2d)


def output_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
        return module.weight.shape[0]
    raise TypeError(f"cannot scale the output of {type(module).__name__}")


class ScaledOutput(nn.Module):
    """`base(x) * gamma + beta` per output channel; `beta` only when shifting."""

    def __init__(self, base: nn.Module, shift: bool, init_std: float):
        super().__init__()
        channels = output_channels(base)
        self.base = base
        self.channel_dim = 1 if isinstance(base, _CHANNEL_FIRST) else -1
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels)) if shift else None
        if init_std:
            nn.init.normal_(self.gamma, mean=1.0, std=init_std)
            if self.beta is not None:
                nn.init.normal_(self.beta, mean=0.0, std=init_std)
        # Switched off only by SAN's "weights only" inference ablation.
        self.apply_feature_scale = True

    def _broadcast(self, vector: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.channel_dim == 1:
            return vector.view(1, -1, *([1] * (ndim - 2)))
        return vector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.apply_feature_scale:
            return y
        y = y * self._broadcast(self.gamma, y.ndim)
        if self.beta is not None:
            y = y + self._broadcast(self.beta, y.ndim)
        return y

    @torch.no_grad()
    def folded(self) -> nn.Module:
        """The base module with the scale and shift folded into its weights."""
        base = self.base
        weight = base.weight
        if weight is None:
            raise ValueError(f"cannot fold a scale into {type(base).__name__} without affine weights")
        shape = (-1,) + (1,) * (weight.ndim - 1)
        weight.mul_(self.gamma.view(shape))
        shift = self.beta if self.beta is not None else torch.zeros_like(self.gamma)
        if base.bias is None:
            base.bias = nn.Parameter(shift.clone())
        else:
            base.bias.mul_(self.gamma).add_(shift)
        return base


class PropagatedLinear(nn.Module):
    """`F.linear(x, W diag(s), b)`, where `s` multiplies the scales of source layers.

    Each source is a (ScaledOutput, start, stop, interpolate) tuple: its gamma, or the slice
    start:stop of it, or its whole gamma linearly resized to this layer's input width.
    Sources are held outside the module tree: their parameters belong to their own layers.
    """

    def __init__(self, base: nn.Linear, sources: Sequence[tuple[ScaledOutput, int, int, bool]], recalibrate: bool):
        super().__init__()
        self.base = base
        self._sources = list(sources)
        self.recalibration = nn.Parameter(torch.ones(base.in_features)) if recalibrate else None
        self.apply_propagation = True

    def input_scale(self) -> torch.Tensor:
        scale = torch.ones(self.base.in_features, device=self.base.weight.device, dtype=self.base.weight.dtype)
        for source, start, stop, interpolate in self._sources:
            gamma = source.gamma
            if interpolate:
                gamma = F.interpolate(gamma.view(1, 1, -1), size=self.base.in_features, mode="linear",
                                      align_corners=True).view(-1)
            else:
                gamma = gamma[start:stop]
            scale = scale * gamma
        if self.recalibration is not None:
            scale = scale * self.recalibration
        return scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.apply_propagation:
            return self.base(x)
        return F.linear(x, self.base.weight * self.input_scale(), self.base.bias)

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        self.base.weight.mul_(self.input_scale())
        return self.base


def replace_module(root: nn.Module, target: nn.Module, replacement: nn.Module) -> None:
    """Put `replacement` where `target` sits in `root` (module replacement, no forked model code)."""
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is target:
                setattr(parent, name, replacement)
                return
    raise KeyError(f"{type(target).__name__} is not a submodule")


def fold_all(model: nn.Module) -> nn.Module:
    """Fold every propagation (first: it reads source scales) and then every scale-shift."""
    for kind in (PropagatedLinear, ScaledOutput):
        while True:
            wrapper = next((m for m in model.modules() if isinstance(m, kind)), None)
            if wrapper is None:
                break
            replace_module(model, wrapper, wrapper.folded())
    return model
