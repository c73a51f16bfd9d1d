"""Method layers compute in the activation dtype under autocast.

An fp32 method parameter multiplied into a bf16 activation promotes the product, and with
it everything downstream, to fp32: twice the activation memory and bandwidth on a GPU.
Here, on the CPU's bf16 autocast, every module the adapted model shares with the plain
model (by name) must return the dtype the plain model's module returns.
"""

from __future__ import annotations

import pytest
import torch
from helpers import ADAPTFORMER, tiny_model

from san.methods.registry import build_method

# (label, registered method, settings)
METHODS = [
    ("ssf", "ssf", {}),
    ("san", "san", {}),
    ("san_early", "san_early", {}),
    ("bitfit", "bitfit", {}),
    ("lora", "lora", {}),
    ("dora", "dora", {}),
    ("adapter", "adapter", {}),
    ("adaptformer", "adapter", ADAPTFORMER),
    ("vpt_deep", "vpt_deep", {}),
    ("full", "full", {}),
]
# On a CPU without native bf16, one bf16 forward of the tiny ConvNeXt takes ~20 s (measured
# here): ConvNeXt is checked with SAN alone, which has every conv-side layer (scaled conv and
# norm outputs, propagation into conv weights); the casts are the same code for both layouts.
CASES = [(*method, "test_vit") for method in METHODS] + [("san", "san", {}, "test_convnext")]


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


@pytest.mark.parametrize("label, method, settings, backbone", CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_method_keeps_the_plain_models_activation_dtypes(label, method, settings, backbone):
    x = torch.randn(2, 3, 32, 32)
    plain = tiny_model(backbone, num_classes=3)
    expected = output_dtypes(plain, x)
    adapted = build_method(method, tiny_model(backbone, num_classes=3), settings)
    got = output_dtypes(adapted.model, x)
    shared = sorted(set(expected) & set(got))
    assert len(shared) > 10, "the adapted model should keep most of the plain model's module names"
    differ = {name: (expected[name], got[name]) for name in shared if expected[name] != got[name]}
    assert not differ, f"{label} changes activation dtypes under bf16 autocast: {differ}"
    assert torch.bfloat16 in set(expected.values())  # the check is not vacuous
