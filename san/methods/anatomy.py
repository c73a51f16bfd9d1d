"""Where the scale positions of SSF/SAN sit in a timm model, found by module class.

Positions are named the same on every supported architecture, so that a method config
("norm1->qkv") means the same thing everywhere. An architecture without an entry here
is unsupported, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from san.methods.base import UnsupportedBackboneError

BLOCK_POSITIONS = ("norm1", "qkv", "proj", "norm2", "fc1", "fc2")
GLOBAL_POSITIONS = ("patch_embed", "norm")
ALL_POSITIONS = GLOBAL_POSITIONS + BLOCK_POSITIONS


@dataclass
class Anatomy:
    """The modules at each named position: global ones once, block ones per block."""

    global_modules: dict[str, nn.Module]
    blocks: list[dict[str, nn.Module]]
    embed_dim: int


def _vit_block(block: Block) -> dict[str, nn.Module]:
    return {"norm1": block.norm1, "qkv": block.attn.qkv, "proj": block.attn.proj,
            "norm2": block.norm2, "fc1": block.mlp.fc1, "fc2": block.mlp.fc2}


def transformer_anatomy(model: nn.Module, method: str) -> Anatomy:
    if isinstance(model, VisionTransformer):
        blocks = [m for m in model.modules() if isinstance(m, Block)]
        global_modules = {"patch_embed": model.patch_embed.proj}
        if isinstance(model.norm, nn.LayerNorm):
            global_modules["norm"] = model.norm
        return Anatomy(global_modules, [_vit_block(b) for b in blocks], model.embed_dim)
    raise UnsupportedBackboneError(
        f"method {method!r} is not defined for {type(model).__name__} yet; supported: VisionTransformer "
        "(vit_b16_in21k, vit_b16_in21k_augreg, dinov2_vitb14, test_vit)"
    )
