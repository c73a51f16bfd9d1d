"""Where the scale positions of SSF/SAN sit in a timm model, found by module class.

Positions are named the same on every supported architecture where the architectures
agree (a pre-norm transformer block is norm1, qkv, proj, norm2, fc1, fc2 in ViT and Swin
alike), so a method config ("norm1->qkv") means the same thing everywhere. Each anatomy
follows SSF's insertion points for that architecture:

- ViT / DINOv2: patch_embed (conv), every block's six positions, the final norm.
- Swin: patch_embed (conv) and patch_embed_norm, every block's six positions, each
  PatchMerging norm (downsample_norm, feeding its `reduction` Linear), the final norm.
- ConvNeXt: stem_conv and stem_norm; per block conv_dw, norm_dw (the norm after the
  depthwise conv), fc1, fc2; per stage downsample_norm and downsample_conv; the head's norm.

- EfficientNet (no SSF reference; the same rule for a BatchNorm convnet): after every
  BatchNorm's affine and before its activation: stem_bn, head_bn, and per block
  expand_bn, dw_bn, project_bn; the convs they feed are dw_conv and project_conv.

An architecture without an entry here is unsupported, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.convnext import ConvNeXt, ConvNeXtBlock
from timm.models.efficientnet import EfficientNet
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from san.methods.base import UnsupportedBackboneError

TRANSFORMER_BLOCK = ("norm1", "qkv", "proj", "norm2", "fc1", "fc2")
CONVNEXT_BLOCK = ("conv_dw", "norm_dw", "fc1", "fc2")
EFFICIENTNET_BLOCK = ("expand_bn", "dw_bn", "project_bn")
GLOBAL_POSITIONS = ("patch_embed", "patch_embed_norm", "stem_conv", "stem_norm", "stem_bn", "head_bn", "norm")
STAGE_POSITIONS = ("downsample_norm", "downsample_conv")
# Inputs a scale can be propagated into (weights whose input channels it multiplies).
TARGETS = ("qkv", "proj", "fc1", "fc2", "reduction", "downsample_conv", "dw_conv", "project_conv")
ALL_POSITIONS = tuple(
    dict.fromkeys(GLOBAL_POSITIONS + TRANSFORMER_BLOCK + CONVNEXT_BLOCK + EFFICIENTNET_BLOCK + STAGE_POSITIONS)
)


@dataclass
class Anatomy:
    """Modules by position: global ones once, block ones per block, stage ones per
    stage transition (each unit also names the propagation targets it holds)."""

    architecture: str
    global_modules: dict[str, nn.Module]
    blocks: list[dict[str, nn.Module]]
    stages: list[dict[str, nn.Module]] = field(default_factory=list)
    head_input_dim: int = 0

    @property
    def positions(self) -> set[str]:
        names = set(self.global_modules)
        for unit in self.blocks + self.stages:
            names |= set(unit)
        return names


def _transformer_block(block: nn.Module) -> dict[str, nn.Module]:
    return {
        "norm1": block.norm1,
        "qkv": block.attn.qkv,
        "proj": block.attn.proj,
        "norm2": block.norm2,
        "fc1": block.mlp.fc1,
        "fc2": block.mlp.fc2,
    }


def _vit(model: VisionTransformer) -> Anatomy:
    global_modules = {"patch_embed": model.patch_embed.proj}
    if isinstance(model.norm, nn.LayerNorm):
        global_modules["norm"] = model.norm
    blocks = [_transformer_block(b) for b in model.modules() if isinstance(b, Block)]
    return Anatomy("VisionTransformer", global_modules, blocks, head_input_dim=model.embed_dim)


def _swin(model: SwinTransformer) -> Anatomy:
    global_modules = {"patch_embed": model.patch_embed.proj, "norm": model.norm}
    if isinstance(model.patch_embed.norm, nn.LayerNorm):
        global_modules["patch_embed_norm"] = model.patch_embed.norm
    blocks = [_transformer_block(b) for b in model.modules() if isinstance(b, SwinTransformerBlock)]
    stages = [
        {"downsample_norm": m.norm, "reduction": m.reduction} for m in model.modules() if isinstance(m, PatchMerging)
    ]
    return Anatomy("SwinTransformer", global_modules, blocks, stages, head_input_dim=model.num_features)


def _convnext(model: ConvNeXt) -> Anatomy:
    stem_conv, stem_norm = model.stem[0], model.stem[1]
    global_modules = {"stem_conv": stem_conv, "stem_norm": stem_norm}
    if isinstance(getattr(model.head, "norm", None), nn.LayerNorm):
        global_modules["norm"] = model.head.norm
    blocks = []
    for block in (m for m in model.modules() if isinstance(m, ConvNeXtBlock)):
        if not isinstance(block.mlp.fc1, nn.Linear):
            raise UnsupportedBackboneError("SSF/SAN support ConvNeXt with Linear MLPs (conv_mlp=False)")
        blocks.append({"conv_dw": block.conv_dw, "norm_dw": block.norm, "fc1": block.mlp.fc1, "fc2": block.mlp.fc2})
    stages = [
        {"downsample_norm": stage.downsample[0], "downsample_conv": stage.downsample[1]}
        for stage in model.stages
        if isinstance(stage.downsample, nn.Sequential)
    ]
    return Anatomy("ConvNeXt", global_modules, blocks, stages, head_input_dim=model.num_features)


def _efficientnet(model: EfficientNet) -> Anatomy:
    blocks = []
    for block in model.modules():
        if isinstance(block, DepthwiseSeparableConv):
            blocks.append({"dw_bn": block.bn1, "project_conv": block.conv_pw, "project_bn": block.bn2})
        elif isinstance(block, InvertedResidual):
            blocks.append(
                {
                    "expand_bn": block.bn1,
                    "dw_conv": block.conv_dw,
                    "dw_bn": block.bn2,
                    "project_conv": block.conv_pwl,
                    "project_bn": block.bn3,
                }
            )
    return Anatomy(
        "EfficientNet", {"stem_bn": model.bn1, "head_bn": model.bn2}, blocks, head_input_dim=model.num_features
    )


ANATOMIES = {VisionTransformer: _vit, SwinTransformer: _swin, ConvNeXt: _convnext, EfficientNet: _efficientnet}


def backbone_anatomy(model: nn.Module, method: str) -> Anatomy:
    for architecture, describe in ANATOMIES.items():
        if isinstance(model, architecture):
            return describe(model)
    raise UnsupportedBackboneError(
        f"method {method!r} is not defined for {type(model).__name__} yet; supported: "
        f"{[a.__name__ for a in ANATOMIES]} (ViT-B/16, DINOv2, Swin-B, ConvNeXt-B, EfficientNet-Lite0 and the tiny "
        "test models)"
    )


def attention_qkv(model: nn.Module) -> dict[str, nn.Linear]:
    """The fused qkv projections of attention modules (ViT, DINOv2, Swin), found by structure
    (a module with `num_heads` and a Linear `qkv`), by their module names in model order."""
    return {
        f"{name}.qkv" if name else "qkv": module.qkv
        for name, module in model.named_modules()
        if isinstance(getattr(module, "qkv", None), nn.Linear) and hasattr(module, "num_heads")
    }
