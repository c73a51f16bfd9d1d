"""FLOPs per image, counted by torch's FlopCounterMode on the architecture alone, and the
peak throughput of known accelerators for model FLOP utilisation (MFU).

timm's fused attention (scaled_dot_product_attention) hides the attention matmuls from
the counter, so it is switched off while counting (ViT-B/16 at 224: 35.1 GFLOPs counted
this way, timm's published 17.6 GMACs).

Training FLOPs are counted, not assumed: one forward and backward of the adapted model,
so a frozen backbone (no weight gradients, only activation gradients) and linear probing
(no backward through the backbone at all) cost what they really cost, rather than the
3x-forward rule of thumb that holds only for full fine-tuning.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Mapping

import torch
from timm.layers import config as timm_layer_config
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

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


def count_flops(model: torch.nn.Module, input_size: int, device: str | torch.device = "cpu") -> int:
    """Forward FLOPs (matmuls and convs; elementwise scaling is not counted)."""
    model.eval()
    # Grad mode stays on: FlopCounterMode's module tracker rejects parameters that reach a
    # module as arguments under no_grad (VPT's prompts do).
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, input_size, input_size, device=device))
    return counter.get_total_flops()


def flops_per_image(config: Mapping[str, Any], merged: bool = False) -> int:
    """Forward FLOPs for one image of a run's resolved config (random weights suffice)."""
    backbone = dict(config["backbone"], pretrained=False, checkpoint_path=None)
    with unfused_attention():  # fused attention is chosen when a module is built
        model, _ = create_backbone(backbone, config["dataset"]["num_classes"])
        adapted = build_method_from_config(model, config["method"])
        target = adapted.merge() if merged else adapted.model
        return count_flops(target, data_config(model, config["backbone"]["input_size"]).input_size)


def _conv_backward_flops(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape,
    **kwargs,
) -> int:
    """Each gradient of a convolution (input, weight) costs what its forward costs.

    torch's own formula (torch.utils.flop_counter.conv_backward_flop, torch 2.14) ignores
    `groups` for the weight gradient and counts a depthwise conv's as if it were dense: `groups`
    times too many (1,152x for EfficientNet's widest depthwise conv, a 40x error on the model)."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_training_flops(model: torch.nn.Module, input_size: int, device: str | torch.device = "cpu") -> int:
    """FLOPs of one forward + backward for one image, as autograd runs them for this model's
    trainable set (matmuls and convs).

    Counted on one image. In training mode a BatchNorm that sees a 1x1 map (EfficientNet at
    32 px) refuses a batch of one; such a model is counted on two images and halved, which
    counts a product made once per batch (SNELL's ΔW, DoRA's norm) at half its one-image cost."""
    try:
        return _training_flops(model, input_size, device, batch=1)
    except ValueError as error:
        if "Expected more than 1 value per channel" not in str(error):
            raise
        return _training_flops(model, input_size, device, batch=2) // 2


def _training_flops(model: torch.nn.Module, input_size: int, device: str | torch.device, batch: int) -> int:
    model.train()
    with FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops}
    ) as counter:
        logits = model(torch.zeros(batch, 3, input_size, input_size, device=device))
        logits.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run_flops(config: Mapping[str, Any]) -> dict[str, Any]:
    """Forward and training FLOPs per image of a run's resolved config.

    Counted on the meta device (shapes only: no memory, no arithmetic) when the method can be
    built there, else on the CPU at batch 1 (methods whose initialisation reads the weights,
    such as PiSSA's SVD). Global RNG state is left untouched, so counting never changes a
    run's result."""
    backbone, num_classes = config["backbone"], config["dataset"]["num_classes"]
    # Counting takes seconds (2.6 s for EfficientNet-Lite0, more than a demo run's evaluation), and
    # a sweep run in one process repeats the same model for every lr and seed: count it once.
    key = json.dumps([backbone, config["method"], num_classes], sort_keys=True, default=str)
    if key not in _RUN_FLOPS:
        with torch.random.fork_rng(devices=[]):
            try:
                _RUN_FLOPS[key] = count_adapted(backbone, config["method"], num_classes, "meta")[0]
            except (NotImplementedError, RuntimeError):
                _RUN_FLOPS[key] = count_adapted(backbone, config["method"], num_classes, "cpu")[0]
    return dict(_RUN_FLOPS[key])


_RUN_FLOPS: dict[str, dict[str, Any]] = {}


def count_adapted(
    backbone: Mapping[str, Any], method: Mapping[str, Any], num_classes: int, device: str
) -> tuple[dict[str, Any], Any]:
    """Build the adapted model on `device` (random weights) and count its forward and training
    FLOPs per image; returns the counts and the adapted model (for its parameter counts)."""
    with unfused_attention():  # fused attention is chosen when a module is built
        with torch.device(device):
            model, _ = create_backbone(dict(backbone, pretrained=False, checkpoint_path=None), num_classes)
            adapted = build_method_from_config(model, method)
        size = data_config(model, backbone["input_size"]).input_size
        counts = {
            "forward_flops_per_image": count_flops(adapted.model, size, device),
            "train_flops_per_image": count_training_flops(adapted.model, size, device),
            "input_size": size,
            "counted_on": device,
        }
    return counts, adapted


# Dense bf16 tensor-core peak, TFLOP/s, keyed by the exact name torch.cuda.get_device_name()
# reports. Sources: NVIDIA's data sheets (H100 SXM5 989.4, H100 PCIe 756.5, H100 NVL 835.5 per
# GPU, H200 SXM 989.4, A100 312, L40S 362.1), without sparsity. A name not listed has an
# unknown peak: MFU is then left empty rather than guessed from a similar name.
PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4,
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA H200": 989.4,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.1,
}


def peak_tflops(device_name: str) -> float | None:
    return PEAK_BF16_TFLOPS.get(device_name)


def model_flop_utilisation(
    train_flops_per_image: float | None, images_per_s: float | None, device_name: str
) -> float | None:
    peak = peak_tflops(device_name)
    if not (peak and train_flops_per_image and images_per_s):
        return None
    return train_flops_per_image * images_per_s / (peak * 1e12)
