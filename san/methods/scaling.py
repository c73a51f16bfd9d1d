"""Layers shared by SSF and SAN: a per-channel scale/shift on a module's output
("neuron"), and a Linear/Conv2d whose input channels are scaled by other layers' scales
("synapse", propagation). Both fold into plain weights. `place_scales` puts the output
scales at an anatomy's positions; SSF stops there, SAN adds the propagation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torch.nn.utils import parametrize

from san.methods.anatomy import Anatomy
from san.methods.base import UnsupportedBackboneError
from san.methods.surgery import fold_wrappers, replace_module

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


def scale_shift_parameters(channels: int, shift: bool, init_std: float) -> tuple[nn.Parameter, nn.Parameter | None]:
    """SSF's vectors: gamma ~ N(1, std), beta ~ N(0, std) (exactly 1 and 0 when std is 0)."""
    gamma = nn.Parameter(torch.ones(channels))
    beta = nn.Parameter(torch.zeros(channels)) if shift else None
    if init_std:
        nn.init.normal_(gamma, mean=1.0, std=init_std)
        if beta is not None:
            nn.init.normal_(beta, mean=0.0, std=init_std)
    return gamma, beta


class ScaledOutput(nn.Module):
    """`base(x) * gamma + beta` per output channel; `beta` only when shifting.

    `channels` and `channel_dim` (1: NCHW, -1: channels last) are read from the base unless
    given; a base without weights (an nn.Identity slot, such as the one SSF scales on ConvNeXt's
    features before pooling) needs them given, and has nothing to fold into."""

    def __init__(
        self,
        base: nn.Module,
        shift: bool,
        init_std: float,
        channels: int | None = None,
        channel_dim: int | None = None,
    ):
        super().__init__()
        channels = output_channels(base) if channels is None else channels
        self.base = base
        if channel_dim is None:
            channel_dim = 1 if isinstance(base, _CHANNEL_FIRST) else -1
        self.channel_dim = channel_dim
        self.gamma, self.beta = scale_shift_parameters(channels, shift, init_std)
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
        # In the activation's dtype: under bf16 autocast an fp32 gamma would promote the whole
        # output (and everything downstream of it) to fp32. The parameters stay fp32; the cast's
        # backward returns their gradient in fp32.
        y = y * self._broadcast(self.gamma.to(y.dtype), y.ndim)
        if self.beta is not None:
            y = y + self._broadcast(self.beta.to(y.dtype), y.ndim)
        return y

    @torch.no_grad()
    def folded(self) -> nn.Module:
        """The base module with the scale and shift folded into its weights."""
        base = self.base
        weight = getattr(base, "weight", None)
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


class NormAffineScale(nn.Module):
    """SSF's scale and shift on a BatchNorm's output *before* its activation.

    timm fuses BatchNorm and activation (BatchNormAct2d), so a wrapper around the module
    would scale after the ReLU6, where folding is not exact. Instead the scale is a
    reparametrisation of the norm's own affine (torch.nn.utils.parametrize):
    weight' = gamma * weight, bias' = gamma * bias + beta, which is
    gamma * BN(x) + beta before the activation. Folding materialises weight' and bias'
    under the norm's original parameter names.
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, shift: bool, init_std: float):
        super().__init__()
        if not norm.affine:
            raise ValueError("cannot scale a BatchNorm without affine parameters")
        channels = norm.num_features
        self.gamma, self.beta = scale_shift_parameters(channels, shift, init_std)
        self.apply_feature_scale = True
        self.norm = [norm]  # a list: the norm is not a child of its own parametrisation
        parametrize.register_parametrization(norm, "weight", self, unsafe=True)
        parametrize.register_parametrization(norm, "bias", _ShiftedBias(self), unsafe=True)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.gamma if self.apply_feature_scale else weight

    @torch.no_grad()
    def folded(self) -> nn.Module:
        norm = self.norm[0]
        parametrize.remove_parametrizations(norm, "weight", leave_parametrized=True)
        parametrize.remove_parametrizations(norm, "bias", leave_parametrized=True)
        return norm


class _ShiftedBias(nn.Module):
    def __init__(self, owner: NormAffineScale):
        super().__init__()
        self.owner = [owner]  # not a submodule: its parameters belong to the weight's parametrisation

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        owner = self.owner[0]
        if not owner.apply_feature_scale:
            return bias
        bias = bias * owner.gamma
        return bias + owner.beta if owner.beta is not None else bias


class ScaledInput(nn.Module):
    """A Linear or Conv2d computing `W diag(s)` on its input, `s` the product of source layers' scales.

    The base is a Linear (`F.linear(x, W diag(s), b)`) or a Conv2d, whose input channels
    are scaled (`W[:, c] *= s_c`; for a depthwise conv input channel c is output channel c,
    so the vector scales axis 0). Each source is a (ScaledOutput, start, stop, interpolate)
    tuple: its gamma, or the slice start:stop of it, or its whole gamma linearly resized to
    this layer's input width. Sources are held outside the module tree: their parameters
    belong to their own layers.
    """

    def __init__(
        self, base: nn.Linear | nn.Conv2d, sources: Sequence[tuple[ScaledOutput, int, int, bool]], recalibrate: bool
    ):
        super().__init__()
        self.base = base
        self._sources = list(sources)
        self.recalibration = nn.Parameter(torch.ones(self.in_features)) if recalibrate else None
        self.apply_propagation = True

    @property
    def plain_base(self) -> nn.Module:
        """The Linear/Conv2d itself, also when a LoRA layer wraps it (peft's get_base_layer)."""
        return self.base.get_base_layer() if hasattr(self.base, "get_base_layer") else self.base

    @property
    def in_features(self) -> int:
        base = self.plain_base
        return base.in_features if isinstance(base, nn.Linear) else base.in_channels

    def input_scale(self) -> torch.Tensor:
        weight = self.plain_base.weight
        scale = torch.ones(self.in_features, device=weight.device, dtype=weight.dtype)
        for source, start, stop, interpolate in self._sources:
            gamma = source.gamma
            if interpolate:
                gamma = F.interpolate(
                    gamma.view(1, 1, -1), size=self.in_features, mode="linear", align_corners=True
                ).view(-1)
            else:
                gamma = gamma[start:stop]
            scale = scale * gamma
        if self.recalibration is not None:
            scale = scale * self.recalibration
        return scale

    @property
    def depthwise(self) -> bool:
        base = self.plain_base
        return isinstance(base, nn.Conv2d) and base.groups == base.in_channels and base.weight.shape[1] == 1

    def scaled_weight(self) -> torch.Tensor:
        weight, scale = self.base.weight, self.input_scale()
        if isinstance(self.base, nn.Linear):
            return weight * scale
        return weight * (scale.view(-1, 1, 1, 1) if self.depthwise else scale.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.apply_propagation:
            return self.base(x)
        # Scaling the weight makes autograd compute the frozen weight's full gradient (SAN's
        # training FLOPs are full fine-tuning's, counted). Scaling the input instead (the same
        # map, W (s * x)) saves those FLOPs but was measured slower on an H100 (ViT-B/16, bf16,
        # batch 64: 1,282 vs 1,350 img/s eager, 2,348 vs 2,557 compiled, +0.5 GiB peak): the
        # activation-sized product costs more than the matmul it saves. So the weight is scaled.
        if type(self.base) is nn.Linear:
            return F.linear(x, self.scaled_weight(), self.base.bias)
        if type(self.base) is nn.Conv2d and not self.depthwise:
            return self.base._conv_forward(x, self.scaled_weight(), self.base.bias)
        # A depthwise conv is the exception: a scaled weight makes autograd compute its weight
        # gradient, a kernel far slower than the conv itself (SAN on EfficientNet-Lite0, CPU, the
        # demo's shape_loc run: 17.0 s of training with the weight scaled, 11.5 s with the input
        # scaled), while the input product costs one pass over an activation the conv reads anyway.
        # A base that computes more than its weight (a LoRA layer composed with SAN): scale
        # the input instead, which is the same map, W_eff diag(s) x = W_eff (s * x).
        channel_shape = (1, -1, 1, 1) if isinstance(self.plain_base, nn.Conv2d) else (-1,)
        return self.base(x * self.input_scale().to(x.dtype).view(channel_shape))

    @torch.no_grad()
    def folded(self) -> nn.Module:
        self.base.weight.copy_(self.scaled_weight())
        return self.base


def fold_all(model: nn.Module) -> nn.Module:
    """Fold every propagation first (it reads the source scales), then every scale-shift."""
    fold_wrappers(model, ScaledInput)
    for norm_scale in [m for m in model.modules() if isinstance(m, NormAffineScale)]:
        norm_scale.folded()
    fold_wrappers(model, ScaledOutput)
    return model


Scale = ScaledOutput | NormAffineScale


@dataclass
class PlacedScales:
    """The output scales put at an anatomy's positions, by where they sit."""

    global_scales: dict[str, Scale]
    block_scales: list[dict[str, Scale]]
    stage_scales: list[dict[str, Scale]]

    def all(self) -> list[Scale]:
        units = [self.global_scales, *self.block_scales, *self.stage_scales]
        return [scale for unit in units for scale in unit.values()]


def positions_on(anatomy: Anatomy, requested: list[str], from_preset: bool, method: str) -> set[str]:
    """The requested positions this architecture has: a preset is a menu filtered to the
    architecture, an explicit list must exist as written."""
    available = anatomy.positions
    missing = sorted(set(requested) - available)
    if missing and not from_preset:
        raise UnsupportedBackboneError(
            f"{method}: {anatomy.architecture} has no position(s) {missing}; it has {sorted(available)}"
        )
    positions = set(requested) & available
    if not positions:
        raise UnsupportedBackboneError(
            f"{method}: none of its positions {requested} exist on {anatomy.architecture} "
            f"(which has {sorted(available)})"
        )
    return positions


def place_scales(model: nn.Module, anatomy: Anatomy, positions: set[str], shift: bool, init_std: float) -> PlacedScales:
    """A scale (and shift) on the output of every module at `positions`: global modules,
    then blocks, then stage transitions (the order fixes the initialisation's random draws)."""

    def scaled(module: nn.Module) -> Scale:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return NormAffineScale(module, shift, init_std)  # before the fused activation
        wrapper = ScaledOutput(module, shift, init_std)
        replace_module(model, module, wrapper)
        return wrapper

    def place(unit: dict[str, nn.Module]) -> dict[str, Scale]:
        return {name: scaled(module) for name, module in unit.items() if name in positions}

    return PlacedScales(
        place(anatomy.global_modules),
        [place(unit) for unit in anatomy.blocks],
        [place(unit) for unit in anatomy.stages],
    )


def scale_parameters(scales: Sequence[Scale]) -> Iterator[nn.Parameter]:
    for scale in scales:
        yield scale.gamma
        if scale.beta is not None:
            yield scale.beta
