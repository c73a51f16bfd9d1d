"""q,v-only LoRA on timm's fused qkv (`lora_qv`), as V-PETL Bench's ViT LoRA
(synbol/Parameter-Efficient-Transfer-Learning-Benchmark,
ImageClassification/models/vision_transformer_lora.py `Attention`: linear_a_q/linear_b_q and
linear_a_v/linear_b_v added to the first and last `dim` columns of the fused qkv output).

qkv(x) = [q | k | v];  q' = q + s * x A_qᵀ B_qᵀ,  k' = k,  v' = v + s * x A_vᵀ B_vᵀ,
with s = alpha / rank. The fused Linear is not split: merging adds s * B_q A_q to the q rows
and s * B_v A_v to the v rows of its weight, exactly, and the merged model has timm's keys.
A starts Kaiming-uniform(a=sqrt 5), B at zero (the LoRA paper's init), so the model starts at
the backbone's function. V-PETL's code initialises B_q Kaiming too and A_v, B_v both at zero
(which leaves v's update without gradient); that is not reproduced.
On ViT-B/16, r = 8: 12 x 2 x (768 x 8 + 8 x 768) = 294,912 trainable without the head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from san.methods.anatomy import attention_qkv
from san.methods.base import AdaptedModel, MethodConfig, UnsupportedBackboneError
from san.methods.registry import register_method
from san.methods.surgery import fold_wrappers, replace_module


@dataclass
class LoraQVConfig(MethodConfig):
    # r = 8: the 0.29 M LoRA row printed by NOAH/SSF/V-PETL's VTAB tables (12 x 2 x 2 x 768 x 8).
    rank: int = field(default=8, metadata={"help": "r of the q and v updates."})
    # alpha = r (s = 1): V-PETL's ViT LoRA (vision_transformer_lora.py) and NOAH's
    # (model/module/qkv_super_prompt.py) add B A unscaled.
    alpha: float = field(default=8.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank."})
    # 0: neither V-PETL's nor NOAH's LoRA has dropout on the LoRA input.
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input."})

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora_qv rank must be positive, not {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora_qv dropout is a probability in [0, 1), not {self.dropout}")


class LowRank(nn.Module):
    """B A for one row block of the fused weight (A: rank x d_in, B: d_out x rank)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.a = nn.Linear(in_features, rank, bias=False)
        self.b = nn.Linear(rank, out_features, bias=False)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.a.weight, a=math.sqrt(5))
            nn.init.zeros_(self.b.weight)

    def forward(self, x):
        return self.b(self.a(x))

    def delta_weight(self) -> torch.Tensor:
        return self.b.weight @ self.a.weight


class QVLoraLinear(nn.Module):
    """A frozen fused qkv Linear with LoRA updates on its q and v output slices."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        if base.out_features % 3:
            raise ValueError(f"a fused qkv has 3 x width outputs, not {base.out_features}")
        self.base = base
        self.width = base.out_features // 3
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.q = LowRank(base.in_features, self.width, rank)
        self.v = LowRank(base.in_features, self.width, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        d = self.width
        h = self.dropout(x)
        q = y[..., :d] + self.scaling * self.q(h)
        v = y[..., 2 * d :] + self.scaling * self.v(h)
        return torch.cat([q, y[..., d : 2 * d], v], dim=-1)

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        d, weight = self.width, self.base.weight
        weight[:d] += (self.scaling * self.q.delta_weight()).to(weight.dtype)
        weight[2 * d :] += (self.scaling * self.v.delta_weight()).to(weight.dtype)
        return self.base


class LoraQV(AdaptedModel):
    """LoRA on the q and v slices of every fused attention qkv; merges exactly."""

    config_class = LoraQVConfig

    def _adapt(self, model: nn.Module) -> None:
        qkvs = list(attention_qkv(model).values())
        if not qkvs:
            raise UnsupportedBackboneError(
                f"{self.method_name} adapts attention q and v of a fused qkv; {type(model).__name__} has no "
                "fused qkv attention"
            )
        cfg = self.config
        self.layers: list[QVLoraLinear] = []
        for qkv in qkvs:
            layer = QVLoraLinear(qkv, cfg.rank, cfg.alpha, cfg.dropout)
            replace_module(model, qkv, layer)
            self.layers.append(layer)

    def _method_parameters(self):
        for layer in self.layers:
            yield from layer.q.parameters()
            yield from layer.v.parameters()

    def _merge_into(self, model: nn.Module) -> nn.Module:
        fold_wrappers(model, QVLoraLinear)
        return model


register_method("lora_qv", LoraQV)
