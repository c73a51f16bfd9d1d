"""FLOPs per image, counted by torch's FlopCounterMode on the architecture alone.

timm's fused attention (scaled_dot_product_attention) hides the attention matmuls from
the counter, so it is switched off while counting (ViT-B/16 at 224: 35.1 GFLOPs counted
this way, timm's published 17.6 GMACs).
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch
from timm.layers import config as timm_layer_config
from torch.utils.flop_counter import FlopCounterMode

import san  # noqa: F401  (registers every method)
from san.backbones import create_backbone, data_config
from san.methods.registry import build_method_from_config


@contextlib.contextmanager
def unfused_attention():
    previous = timm_layer_config._USE_FUSED_ATTN
    timm_layer_config.set_fused_attn(False)
    try:
        yield
    finally:
        timm_layer_config._USE_FUSED_ATTN = previous


def count_flops(model: torch.nn.Module, input_size: int) -> int:
    """Forward FLOPs (matmuls and convs; elementwise scaling is not counted)."""
    model.eval()
    # Grad mode stays on: FlopCounterMode's module tracker rejects parameters that reach a
    # module as arguments under no_grad (VPT's prompts do).
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, input_size, input_size))
    return counter.get_total_flops()


def flops_per_image(config: Mapping[str, Any], merged: bool = False) -> int:
    """Forward FLOPs for one image of a run's resolved config (random weights suffice)."""
    backbone = dict(config["backbone"], pretrained=False, checkpoint_path=None)
    with unfused_attention():  # fused attention is chosen when a module is built
        model, _ = create_backbone(backbone, config["dataset"]["num_classes"])
        peft = build_method_from_config(model, config["method"])
        target = peft.merge() if merged else peft.model
        return count_flops(target, data_config(model, config["backbone"]["input_size"]).input_size)
