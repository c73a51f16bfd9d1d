"""Method layers compute in the activation dtype under autocast.

An fp32 method parameter multiplied into a bf16 activation promotes the product, and with
it everything downstream, to fp32: twice the activation memory and bandwidth on a GPU.
Here, on the CPU's bf16 autocast, every module the adapted model shares with the plain
model (by name) must return the dtype the plain model's module returns.
"""

from __future__ import annotations

import pytest
import timm
import torch

from san.methods.registry import build_method

METHODS = ["ssf", "san", "san_early", "bitfit", "lora", "dora", "adapter", "adaptformer", "vpt_deep", "full"]
BACKBONES = {"test_vit": dict(img_size=32), "test_convnext": {}}
# On a CPU without native bf16, one bf16 forward of the tiny ConvNeXt takes ~20 s (measured
# here): ConvNeXt is checked with SAN alone, which has every conv-side layer (scaled conv and
# norm outputs, propagation into conv weights); the casts are the same code for both layouts.
CASES = [(method, "test_vit") for method in METHODS] + [("san", "test_convnext")]


def output_dtypes(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.dtype]:
    seen: dict[str, torch.dtype] = {}
    hooks = []
    for name, module in model.named_modules():
        def record(module, args, output, name=name):
            if isinstance(output, torch.Tensor):
                seen[name] = output.dtype
        hooks.append(module.register_forward_hook(record))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("method, backbone", CASES)
def test_method_keeps_the_plain_models_activation_dtypes(method, backbone):
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    plain = timm.create_model(backbone, num_classes=3, **BACKBONES[backbone]).eval()
    expected = output_dtypes(plain, x)
    torch.manual_seed(0)
    adapted = build_method(method, timm.create_model(backbone, num_classes=3, **BACKBONES[backbone]).eval())
    got = output_dtypes(adapted.model, x)
    shared = sorted(set(expected) & set(got))
    assert len(shared) > 10, "the adapted model should keep most of the plain model's module names"
    differ = {name: (expected[name], got[name]) for name in shared if expected[name] != got[name]}
    assert not differ, f"{method} changes activation dtypes under bf16 autocast: {differ}"
    assert torch.bfloat16 in set(expected.values())  # the check is not vacuous
