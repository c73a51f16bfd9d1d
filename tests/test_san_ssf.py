"""SAN (both readings) and SSF semantics that the method table (tests/test_method_table.py)
does not state: SAN's propagation against a hand-written computation of one block, the
edges on each architecture, recalibration, the inference ablation, and SAN x LoRA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import perturb_trainable, tiny_model
from torch import nn

from san.methods.registry import build_method
from san.methods.scaling import ScaledInput, ScaledOutput


def perturb(adapted) -> None:
    """Scales well away from 1 and shifts from 0, so a wrong formula shows."""
    perturb_trainable(adapted, scale=0.3)


def test_recalibration_adds_a_vector_per_propagated_input():
    adapted = build_method("san", tiny_model("test_vit"), {"recalibrate": True})
    plain = build_method("san", tiny_model("test_vit"))
    added = adapted.parameter_counts()["trainable"] - plain.parameter_counts()["trainable"]
    assert added == sum(p.in_features for p in adapted.propagations) > 0


@pytest.mark.parametrize("backbone", ["test_vit", "effnet_lite0"])
def test_ssf_scales_the_outputs_san_scales_and_propagates_none(backbone):
    """SSF is SAN without synapses: the same scaled outputs (same count), no propagated input."""
    ssf = build_method("ssf", tiny_model(backbone))
    san = build_method("san", tiny_model(backbone))
    assert [s.gamma.shape for s in ssf.scales] == [s.gamma.shape for s in san.scales]
    assert san.propagations and not any(isinstance(m, ScaledInput) for m in ssf.model.modules())


def test_inference_modes_switch_neurons_and_synapses():
    adapted = build_method("san", tiny_model("test_vit"))
    perturb(adapted)
    x = torch.randn(2, 3, 32, 32)
    outputs = {}
    for mode in ("both", "features_only", "weights_only"):
        adapted.config.inference_mode = mode
        adapted.set_train_mode(False)
        with torch.no_grad():
            outputs[mode] = adapted.model(x)
    assert not torch.allclose(outputs["both"], outputs["features_only"])
    assert not torch.allclose(outputs["both"], outputs["weights_only"])
    with pytest.raises(ValueError, match="inference_mode"):
        adapted.merge()


def _attention(block, qkv: torch.Tensor) -> torch.Tensor:
    batch, tokens, _ = qkv.shape
    heads = block.attn.num_heads
    q, k, v = qkv.reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
    return (weights @ v).transpose(1, 2).reshape(batch, tokens, -1)


def _scales(adapted, block_index: int) -> dict[str, ScaledOutput]:
    # Read from timm's Block attributes on purpose, not san.methods.anatomy's mapping: the hand
    # computations below are the oracle for where the method put its scales.
    block = adapted.model.blocks[block_index]
    found = {
        "norm1": block.norm1,
        "qkv": block.attn.qkv,
        "proj": block.attn.proj,
        "norm2": block.norm2,
        "fc1": block.mlp.fc1,
        "fc2": block.mlp.fc2,
    }
    return {k: v for k, v in found.items() if isinstance(v, ScaledOutput)}


def _plain(module: nn.Module) -> nn.Module:
    while isinstance(module, (ScaledOutput, ScaledInput)):
        module = module.base
    return module


def test_reading_a_matches_hand_computation_on_one_block():
    adapted = build_method("san", tiny_model("test_vit"))
    perturb(adapted)
    block = adapted.model.blocks[0]
    s = _scales(adapted, 0)
    g = {k: v.gamma for k, v in s.items()}
    b = {k: v.beta for k, v in s.items()}
    W = {k: _plain(v.base) for k, v in s.items()}
    x = torch.randn(2, 5, adapted.model.embed_dim)
    with torch.no_grad():
        h = F.layer_norm(x, (x.shape[-1],), W["norm1"].weight, W["norm1"].bias, W["norm1"].eps)
        h = h * g["norm1"] + b["norm1"]
        qkv = F.linear(h, W["qkv"].weight * g["norm1"], W["qkv"].bias) * g["qkv"] + b["qkv"]
        width = adapted.model.embed_dim
        attended = _attention(block, qkv)
        o = F.linear(attended, W["proj"].weight * g["qkv"][2 * width :], W["proj"].bias) * g["proj"] + b["proj"]
        x1 = x + block.ls1(o)
        h2 = F.layer_norm(x1, (width,), W["norm2"].weight, W["norm2"].bias, W["norm2"].eps) * g["norm2"] + b["norm2"]
        f1 = F.linear(h2, W["fc1"].weight * g["norm2"], W["fc1"].bias) * g["fc1"] + b["fc1"]
        f2 = F.linear(F.gelu(f1), W["fc2"].weight * g["fc1"], W["fc2"].bias) * g["fc2"] + b["fc2"]
        expected = x1 + block.ls2(f2)
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_reading_b_matches_hand_computation_on_one_block():
    adapted = build_method("san_early", tiny_model("test_vit"))
    perturb(adapted)
    block = adapted.model.blocks[1]
    s = _scales(adapted, 1)
    g = {k: v.gamma for k, v in s.items()}
    assert set(g) == {"qkv", "proj", "fc1", "fc2"}
    s_pe = adapted.model.patch_embed.proj.gamma  # one vector feeding every block's qkv
    W = {k: _plain(v.base) for k, v in s.items()}
    width = adapted.model.embed_dim
    x = torch.randn(2, 5, width)
    with torch.no_grad():
        qkv = F.linear(block.norm1(x), W["qkv"].weight * s_pe, W["qkv"].bias) * g["qkv"]
        o = F.linear(_attention(block, qkv), W["proj"].weight, W["proj"].bias) * g["proj"]
        x1 = x + block.ls1(o)
        h = F.linear(block.norm2(x1), W["fc1"].weight * g["proj"], W["fc1"].bias) * g["fc1"]
        expected = x1 + block.ls2(F.linear(F.gelu(h), W["fc2"].weight * g["fc1"], W["fc2"].bias) * g["fc2"])
        assert torch.allclose(block(x), expected, atol=1e-5)


def _propagated_targets(adapted) -> list[str]:
    wrappers = {id(m) for m in adapted.model.modules() if isinstance(m, ScaledInput)}
    # a propagated layer that also has a scale sits inside its ScaledOutput, as `<position>.base`
    return [
        name.removesuffix(".base").rsplit(".", 1)[-1] for name, m in adapted.model.named_modules() if id(m) in wrappers
    ]


def test_san_edges_on_convnext_and_swin():
    convnext = build_method("san", tiny_model("test_convnext"))
    blocks = len([m for m in convnext.model.modules() if type(m).__name__ == "ConvNeXtBlock"])
    targets = _propagated_targets(convnext)
    # norm_dw -> fc1 and fc1 -> fc2 in every block; downsample_norm -> downsample conv per stage transition
    assert targets.count("fc1") == blocks and targets.count("fc2") == blocks
    assert targets.count("1") == 3  # stages[i].downsample[1], the conv, in the 3 later stages

    effnet = build_method("san", tiny_model("effnet_lite0"))
    inverted = [m for m in effnet.model.modules() if type(m).__name__ == "InvertedResidual"]
    targets = _propagated_targets(effnet)
    # expand_bn -> depthwise conv and dw_bn -> projection in every inverted residual, dw_bn -> conv_pw once
    assert targets.count("conv_dw") == targets.count("conv_pwl") == len(inverted) and targets.count("conv_pw") == 1

    swin = build_method("san", tiny_model("test_swin"))
    targets = _propagated_targets(swin)
    assert sorted(set(targets)) == ["fc1", "fc2", "proj", "qkv", "reduction"]
    assert targets.count("qkv") == 2 and targets.count("reduction") == 1


@pytest.mark.parametrize("groups", [1, 6])
def test_conv_propagation_scales_input_channels(groups):
    """W diag(s) for a conv: the same as scaling the input's channels, depthwise included."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=groups)
    source = ScaledOutput(nn.Linear(4, 6), shift=False, init_std=0.5)
    propagated = ScaledInput(conv, [(source, 0, 6, False)], recalibrate=False)
    x = torch.randn(2, 6, 5, 5)
    expected = conv(x * source.gamma.view(1, -1, 1, 1))
    assert torch.allclose(propagated(x), expected, atol=1e-6)
    assert torch.allclose(propagated.folded()(x), expected, atol=1e-6)


@pytest.mark.parametrize("dora", [False, True])
def test_lora_acts_inside_sans_propagated_qkv(dora):
    """SAN x LoRA: both kinds of tensors train, and the LoRA update sits inside the
    propagated qkv (switching it off changes the output). Identity at init and the merge
    are rows of the method table."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = build_method("san_lora", tiny_model("test_vit"), {"dora": dora})
    trainable = {n for n, _ in adapted.named_trainable_parameters()}
    assert any("lora_A" in n for n in trainable) and any(n.endswith("gamma") for n in trainable)
    qkv = adapted.model.blocks[0].attn.qkv  # scale(propagated(LoRA(Linear)))
    assert isinstance(qkv, ScaledOutput) and isinstance(qkv.base, ScaledInput)
    assert isinstance(qkv.base.base, BaseTunerLayer)
    perturb(adapted)
    adapted.set_train_mode(False)
    x = torch.randn(3, 3, 32, 32)
    layers = [m for m in adapted.model.modules() if isinstance(m, BaseTunerLayer)]
    with torch.no_grad():
        with_lora = adapted.model(x)
        for layer in layers:
            layer.enable_adapters(False)
        without_lora = adapted.model(x)
        for layer in layers:
            layer.enable_adapters(True)
    assert not torch.allclose(with_lora, without_lora, atol=1e-4)
