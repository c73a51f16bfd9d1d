"""VPT (Jia et al., 2022): learnable prompt tokens in a ViT's token sequence.

Shallow: `length` prompts inserted after the prefix tokens (class/register tokens) at the
input of the first block. Deep: a fresh set of prompts for every block, replacing the
previous block's prompt outputs. Prompts carry no position embedding. After the last
block the prompt tokens are dropped again, so the final norm, pooling and head see the
sequence they were built for (with `avg` pooling too).

Done with forward hooks on timm's blocks; the prompts live in a `prompts` submodule of
the model. Initialisation as VPT: uniform(-v, v), v = sqrt(6 / (3 * patch^2 + dim)).
Not mergeable: prompts add tokens, and so computation, at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from san.methods.base import AdaptedModel, MethodConfig, UnsupportedBackboneError
from san.methods.registry import register_method


@dataclass
class VPTConfig(MethodConfig):
    length: int = field(default=10, metadata={"help": "Number of prompt tokens (per block for deep)."})
    deep: bool = field(default=False, metadata={"help": "A prompt set per block (VPT-Deep) or only at the input."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the prompt tokens (VPT used 0.1)."})


class Prompts(nn.Module):
    def __init__(self, sets: int, length: int, dim: int, patch_area: int, dropout: float):
        super().__init__()
        bound = math.sqrt(6.0 / float(3 * patch_area + dim))
        self.tokens = nn.Parameter(torch.empty(sets, length, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)

    def batch(self, index: int, batch_size: int) -> torch.Tensor:
        return self.dropout(self.tokens[index]).unsqueeze(0).expand(batch_size, -1, -1)


class VPT(AdaptedModel):
    config_class = VPTConfig
    mergeable = False

    def _adapt(self, model: nn.Module) -> None:
        if not isinstance(model, VisionTransformer):
            # Swin would need VPT's per-window variant; convnets have no token sequence at all
            raise UnsupportedBackboneError(
                f"{self.method_name} is defined for ViT-style token sequences (ViT, DINOv2), not {type(model).__name__}"
            )
        cfg = self.config
        blocks = list(model.blocks)
        patch = model.patch_embed.patch_size
        model.prompts = Prompts(
            len(blocks) if cfg.deep else 1, cfg.length, model.embed_dim, patch[0] * patch[1], cfg.dropout
        )
        prefix, length = model.num_prefix_tokens, cfg.length

        def insert(module, args):
            x = args[0]
            return (torch.cat([x[:, :prefix], model.prompts.batch(0, x.shape[0]), x[:, prefix:]], dim=1), *args[1:])

        def replace(index):
            def hook(module, args):
                x = args[0]
                prompts = model.prompts.batch(index, x.shape[0])
                return (torch.cat([x[:, :prefix], prompts, x[:, prefix + length :]], dim=1), *args[1:])

            return hook

        def drop(module, args, output):
            return torch.cat([output[:, :prefix], output[:, prefix + length :]], dim=1)

        self._hooks = [blocks[0].register_forward_pre_hook(insert)]
        if cfg.deep:
            self._hooks += [block.register_forward_pre_hook(replace(i)) for i, block in enumerate(blocks) if i]
        self._hooks.append(blocks[-1].register_forward_hook(drop))

    def _method_parameters(self):
        yield self.model.prompts.tokens

    def _no_weight_decay_parameters(self):
        yield self.model.prompts.tokens


@dataclass
class VPTDeepConfig(VPTConfig):
    deep: bool = field(default=True, metadata={"help": "A prompt set per block (VPT-Deep) or only at the input."})


class VPTShallow(VPT):
    config_class = VPTConfig


class VPTDeep(VPT):
    config_class = VPTDeepConfig


register_method("vpt_shallow", VPTShallow)
register_method("vpt_deep", VPTDeep)
