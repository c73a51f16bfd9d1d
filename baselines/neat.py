"""NEAT (nonlinear weight-aware adaptation; Zhong et al., arXiv 2410.01870).

The update of a frozen weight is a small network of the weight itself:
ΔW = σ(W0 Θ1) Θ2 (W0 as d_in x d_out, Θ1 d_out x r, Θ2 r x d_out, σ = ReLU), so a layer
computes h = x (W0 + ΔW) + b. Θ2 starts at zero (the model is unchanged at init), Θ1 keeps
nn.Linear's Kaiming-uniform init, as the authors' code (yibozhong/neat,
image-classification/neat.py). The deep variant puts (depth - 2) r x r layers with ReLU and
residual skips between Θ1 and Θ2 (their `neat_multilayers`). The forward never builds ΔW:
x σ(W0 Θ1) is r wide, then Θ2. Merging adds ΔW to W0, exactly.

Targets as the authors' ViT code: mode 1 = the query and value projections (here the q and
v row blocks of timm's fused qkv Linear, each adapted on its own as in their separate
q/v layers), mode 2 = those and every transformer MLP's fc1 and fc2.
On ViT-B/16, mode 1, r = 7: 12 x 2 x (768 x 7 + 7 x 768) = 258,048 trainable without head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.layers import Mlp
from torch import nn

from san.methods.anatomy import attention_qkv
from san.methods.base import AdaptedModel, MethodConfig, UnsupportedBackboneError
from san.methods.registry import register_method
from san.methods.surgery import fold_wrappers, replace_module

MODES = {1: "q and v of attention", 2: "q and v of attention, and the MLP's fc1 and fc2"}
# qkv is [q | k | v] along its output rows; NEAT adapts q and v.
QV_BLOCKS = (0, 2)


@dataclass
class NeatConfig(MethodConfig):
    # Their image-classification run script: --mhsa_dim 7 --neat_mode 1; --ffn_dim defaults to 16.
    rank: int = field(default=7, metadata={"help": "r of the attention (q, v) updates (NEAT's mhsa_dim)."})
    mlp_rank: int = field(default=16, metadata={"help": "r of the MLP (fc1, fc2) updates in mode 2 (ffn_dim)."})
    mode: int = field(default=1, metadata={"help": f"Targets: {MODES}."})
    depth: int = field(
        default=2,
        metadata={
            "help": "Layers of the weight network: 2 is Θ1 and Θ2 (vanilla NEAT); more adds depth-2 r x r layers "
            "with residual skips (even depth)."
        },
    )

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"NEAT mode must be one of {sorted(MODES)}, not {self.mode!r}")
        if self.depth < 2 or self.depth % 2:
            raise ValueError(f"NEAT depth is an even number >= 2 (Θ1, Θ2 and pairs of r x r layers), not {self.depth}")
        if self.rank < 1 or self.mlp_rank < 1:
            raise ValueError("NEAT ranks must be positive")


class WeightNetwork(nn.Module):
    """ΔW = σ(W0 Θ1) [r x r layers] Θ2 for one weight block of d_out rows, applied to x."""

    def __init__(self, out_features: int, rank: int, depth: int):
        super().__init__()
        self.first = nn.Linear(out_features, rank, bias=False)  # Θ1ᵀ, Kaiming-uniform as nn.Linear
        pairs = (depth - 2) // 2
        self.encoders = nn.ModuleList(nn.Linear(rank, rank, bias=False) for _ in range(pairs))
        self.decoders = nn.ModuleList(nn.Linear(rank, rank, bias=False) for _ in range(pairs))
        self.last = nn.Linear(rank, out_features, bias=False)  # Θ2ᵀ
        nn.init.zeros_(self.last.weight)

    def hidden(self, weight: torch.Tensor) -> torch.Tensor:
        """σ(W0 Θ1) through the intermediate layers: d_in x r. `weight` is torch's (d_out, d_in)."""
        h = torch.relu(weight.t() @ self.first.weight.t())
        skips = []
        for encoder in self.encoders:
            skips.append(h)
            h = torch.relu(encoder(h))
        for decoder in self.decoders:
            h = torch.relu(decoder(h)) + skips.pop()
        return h

    def update(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x ΔW without forming ΔW (d_in x d_out)."""
        return self.last(x @ self.hidden(weight).to(x.dtype))

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW in torch's (d_out, d_in) layout, for merging."""
        return (self.hidden(weight) @ self.last.weight.t()).t()


class NeatLinear(nn.Module):
    """A frozen Linear plus NEAT updates on row blocks of its weight (all rows, or q and v of a fused qkv)."""

    def __init__(self, base: nn.Linear, blocks: list[tuple[int, int]], rank: int, depth: int):
        super().__init__()
        self.base = base
        self.blocks = blocks
        self.networks = nn.ModuleList(WeightNetwork(stop - start, rank, depth) for start, stop in blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        pieces, cursor = [], 0
        for (start, stop), network in zip(self.blocks, self.networks):
            pieces += [y[..., cursor:start], y[..., start:stop] + network.update(x, self.base.weight[start:stop])]
            cursor = stop
        pieces.append(y[..., cursor:])
        return torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        deltas = [
            network.delta_weight(self.base.weight[start:stop])
            for (start, stop), network in zip(self.blocks, self.networks)
        ]
        for (start, stop), delta in zip(self.blocks, deltas):  # every ΔW from the original W0 first
            self.base.weight[start:stop] += delta.to(self.base.weight.dtype)
        return self.base


class Neat(AdaptedModel):
    """NEAT: a nonlinear function of each frozen weight as its update; merges exactly."""

    config_class = NeatConfig

    def _adapt(self, model: nn.Module) -> None:
        cfg = self.config
        qkvs = list(attention_qkv(model).values())
        if not qkvs:
            raise UnsupportedBackboneError(
                f"{self.method_name} adapts attention q and v (NEAT's targets); {type(model).__name__} has no "
                "fused qkv attention"
            )
        self.layers: list[NeatLinear] = []
        for qkv in qkvs:
            width = qkv.out_features // 3
            blocks = [(index * width, (index + 1) * width) for index in QV_BLOCKS]
            self._wrap(model, qkv, blocks, cfg.rank)
        if cfg.mode == 2:
            for mlp in (m for m in model.modules() if isinstance(m, Mlp)):
                for linear in (mlp.fc1, mlp.fc2):
                    self._wrap(model, linear, [(0, linear.out_features)], cfg.mlp_rank)

    def _wrap(self, model: nn.Module, linear: nn.Linear, blocks: list[tuple[int, int]], rank: int) -> None:
        layer = NeatLinear(linear, blocks, rank, self.config.depth)
        replace_module(model, linear, layer)
        self.layers.append(layer)

    def _method_parameters(self):
        for layer in self.layers:
            yield from layer.networks.parameters()

    def _merge_into(self, model: nn.Module) -> nn.Module:
        fold_wrappers(model, NeatLinear)
        return model


register_method("neat", Neat)
