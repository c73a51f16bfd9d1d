"""SAN (both readings) and SSF on tiny real timm models, through one table of checks,
plus SAN's propagation against a hand-written computation of one block."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from san.cli.params import parameter_counts
from san.methods.base import UnsupportedBackboneError
from san.methods.registry import build_method
from san.methods.scaling import NormAffineScale, PropagatedLinear, ScaledOutput

# timm has no test-sized Swin; this one has Swin-B's structure (two stages, a PatchMerging).
TINY_SWIN = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), img_size=32, window_size=4)
TINY = {"test_vit": ("test_vit", dict(img_size=32)), "test_convnext": ("test_convnext", dict()),
        "tiny_swin": ("swin_tiny_patch4_window7_224", TINY_SWIN),
        "tf_efficientnet_lite0": ("tf_efficientnet_lite0", dict())}
SCALING_METHODS = ["ssf", "san", "san_early"]
# Which (method, backbone) pairs are supported; the README's matrix mirrors this table.
SUPPORTED = {(m, b) for m in SCALING_METHODS for b in ("test_vit", "test_convnext", "tiny_swin")} | {
    ("ssf", "tf_efficientnet_lite0"), ("san", "tf_efficientnet_lite0")}  # reading B has no position there
CASES = [(m, b) for m in ["linear", "full", "bitfit", *SCALING_METHODS] for b in TINY
         if m not in SCALING_METHODS or (m, b) in SUPPORTED]


def tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    architecture, kwargs = TINY[name]
    model = timm.create_model(architecture, num_classes=5, **kwargs).eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith(".gamma"):
                parameter.fill_(1.0)  # ConvNeXt's layer scale starts at 1e-6 and would hide its blocks
    return model


def perturb(peft) -> None:
    """Make every method tensor non-identity, so a merge test cannot pass trivially."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in peft.model.modules():
            if isinstance(module, (ScaledOutput, NormAffineScale)):
                module.gamma.copy_(1 + 0.3 * torch.randn(module.gamma.shape, generator=generator))
                if module.beta is not None:
                    module.beta.copy_(0.3 * torch.randn(module.beta.shape, generator=generator))
            if isinstance(module, PropagatedLinear) and module.recalibration is not None:
                module.recalibration.copy_(1 + 0.3 * torch.randn(module.recalibration.shape, generator=generator))


def method_tensors(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        if isinstance(module, (ScaledOutput, NormAffineScale)):
            ids |= {id(module.gamma)} | ({id(module.beta)} if module.beta is not None else set())
        if isinstance(module, PropagatedLinear) and module.recalibration is not None:
            ids.add(id(module.recalibration))
    return ids


@pytest.mark.parametrize("method, backbone", CASES)
def test_method_contract(method, backbone):
    reference = tiny(backbone)
    original_keys = set(reference.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)
    settings = {"init_std": 0.0} if method in SCALING_METHODS else {}
    peft = build_method(method, tiny(backbone), settings)
    peft.set_train_mode(False)
    with torch.no_grad():
        assert torch.allclose(peft.model(x), expected, atol=1e-5), "identity init must not change the logits"

    if method in SCALING_METHODS:
        trainable = {id(p) for _, p in peft.named_trainable_parameters()}
        norms = {id(p) for m in peft.model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        expected_set = method_tensors(peft.model) | peft.head_parameter_ids()
        if method == "san_early":
            expected_set |= norms
        assert trainable == expected_set

    perturb(peft)
    with torch.no_grad():
        unmerged = peft.model(x)
    if method in SCALING_METHODS:
        assert not torch.allclose(unmerged, expected, atol=1e-3)
    merged = peft.merge()
    assert not any(isinstance(m, (ScaledOutput, PropagatedLinear, NormAffineScale)) for m in merged.modules())
    assert set(merged.state_dict()) == original_keys
    assert type(merged) is type(reference)
    with torch.no_grad():
        assert (merged(x) - unmerged).abs().max() <= 1e-4


@pytest.mark.parametrize("method, backbone", [(m, b) for m in SCALING_METHODS for b in TINY
                                               if (m, b) not in SUPPORTED])
def test_unsupported_backbone_is_a_named_error(method, backbone):
    with pytest.raises(UnsupportedBackboneError, match="EfficientNet"):
        build_method(method, tiny(backbone))


@pytest.mark.parametrize("method, expected", [("ssf", 205_824), ("san", 205_824), ("san_early", 122_112)])
def test_vit_b16_published_counts(method, expected):
    assert parameter_counts(["backbone=vit_b16_in21k", f"method={method}"])["trainable_without_head"] == expected


def test_recalibration_adds_parameters_and_merges():
    peft = build_method("san", tiny("test_vit"), {"recalibrate": True})
    plain = build_method("san", tiny("test_vit"))
    assert peft.parameter_counts()["trainable"] > plain.parameter_counts()["trainable"]
    perturb(peft)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        unmerged = peft.model(x)
        assert (peft.merge()(x) - unmerged).abs().max() <= 1e-4


def test_inference_modes_switch_neurons_and_synapses():
    peft = build_method("san", tiny("test_vit"))
    perturb(peft)
    x = torch.randn(2, 3, 32, 32)
    outputs = {}
    for mode in ("both", "features_only", "weights_only"):
        peft.config.inference_mode = mode
        peft.set_train_mode(False)
        with torch.no_grad():
            outputs[mode] = peft.model(x)
    assert not torch.allclose(outputs["both"], outputs["features_only"])
    assert not torch.allclose(outputs["both"], outputs["weights_only"])
    with pytest.raises(ValueError, match="inference_mode"):
        peft.merge()


def _attention(block, qkv: torch.Tensor) -> torch.Tensor:
    batch, tokens, _ = qkv.shape
    heads = block.attn.num_heads
    q, k, v = qkv.reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
    return (weights @ v).transpose(1, 2).reshape(batch, tokens, -1)


def _scales(peft, block_index: int) -> dict[str, ScaledOutput]:
    block = peft.model.blocks[block_index]
    found = {"norm1": block.norm1, "qkv": block.attn.qkv, "proj": block.attn.proj, "norm2": block.norm2,
             "fc1": block.mlp.fc1, "fc2": block.mlp.fc2}
    return {k: v for k, v in found.items() if isinstance(v, ScaledOutput)}


def _plain(module: nn.Module) -> nn.Module:
    while isinstance(module, (ScaledOutput, PropagatedLinear)):
        module = module.base
    return module


def test_reading_a_matches_hand_computation_on_one_block():
    peft = build_method("san", tiny("test_vit"))
    perturb(peft)
    block = peft.model.blocks[0]
    s = _scales(peft, 0)
    g = {k: v.gamma for k, v in s.items()}
    b = {k: v.beta for k, v in s.items()}
    W = {k: _plain(v.base) for k, v in s.items()}
    x = torch.randn(2, 5, peft.model.embed_dim)
    with torch.no_grad():
        h = F.layer_norm(x, (x.shape[-1],), W["norm1"].weight, W["norm1"].bias, W["norm1"].eps) * g["norm1"] + b["norm1"]
        qkv = F.linear(h, W["qkv"].weight * g["norm1"], W["qkv"].bias) * g["qkv"] + b["qkv"]
        width = peft.model.embed_dim
        attended = _attention(block, qkv)
        o = F.linear(attended, W["proj"].weight * g["qkv"][2 * width:], W["proj"].bias) * g["proj"] + b["proj"]
        x1 = x + block.ls1(o)
        h2 = F.layer_norm(x1, (width,), W["norm2"].weight, W["norm2"].bias, W["norm2"].eps) * g["norm2"] + b["norm2"]
        f1 = F.linear(h2, W["fc1"].weight * g["norm2"], W["fc1"].bias) * g["fc1"] + b["fc1"]
        f2 = F.linear(F.gelu(f1), W["fc2"].weight * g["fc1"], W["fc2"].bias) * g["fc2"] + b["fc2"]
        expected = x1 + block.ls2(f2)
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_reading_b_matches_hand_computation_on_one_block():
    peft = build_method("san_early", tiny("test_vit"))
    perturb(peft)
    block = peft.model.blocks[1]
    s = _scales(peft, 1)
    g = {k: v.gamma for k, v in s.items()}
    assert set(g) == {"qkv", "proj", "fc1", "fc2"}
    s_pe = peft.model.patch_embed.proj.gamma  # one vector feeding every block's qkv
    W = {k: _plain(v.base) for k, v in s.items()}
    width = peft.model.embed_dim
    x = torch.randn(2, 5, width)
    with torch.no_grad():
        qkv = F.linear(block.norm1(x), W["qkv"].weight * s_pe, W["qkv"].bias) * g["qkv"]
        o = F.linear(_attention(block, qkv), W["proj"].weight, W["proj"].bias) * g["proj"]
        x1 = x + block.ls1(o)
        h = F.linear(block.norm2(x1), W["fc1"].weight * g["proj"], W["fc1"].bias) * g["fc1"]
        expected = x1 + block.ls2(F.linear(F.gelu(h), W["fc2"].weight * g["fc1"], W["fc2"].bias) * g["fc2"])
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_san_trains_end_to_end(tmp_path, tiny_task):
    import json

    from conftest import tiny_overrides
    from san.config import compose_config
    from san.run import run

    for method in SCALING_METHODS:
        record = json.loads(run(compose_config(tiny_overrides(tmp_path, tiny_task, f"method={method}"))).read_text())
        assert record["status"] == "complete" and record["method"]["name"] == method


def _propagated_targets(peft) -> list[str]:
    wrappers = {id(m) for m in peft.model.modules() if isinstance(m, PropagatedLinear)}
    # a propagated layer that also has a scale sits inside its ScaledOutput, as `<position>.base`
    return [name.removesuffix(".base").rsplit(".", 1)[-1] for name, m in peft.model.named_modules()
            if id(m) in wrappers]


def test_san_edges_on_convnext_and_swin():
    convnext = build_method("san", tiny("test_convnext"))
    blocks = len([m for m in convnext.model.modules() if type(m).__name__ == "ConvNeXtBlock"])
    targets = _propagated_targets(convnext)
    # norm_dw -> fc1 and fc1 -> fc2 in every block; downsample_norm -> downsample conv per stage transition
    assert targets.count("fc1") == blocks and targets.count("fc2") == blocks
    assert targets.count("1") == 3  # stages[i].downsample[1], the conv, in the 3 later stages

    effnet = build_method("san", tiny("tf_efficientnet_lite0"))
    inverted = [m for m in effnet.model.modules() if type(m).__name__ == "InvertedResidual"]
    targets = _propagated_targets(effnet)
    # expand_bn -> depthwise conv and dw_bn -> projection in every inverted residual, dw_bn -> conv_pw once
    assert targets.count("conv_dw") == targets.count("conv_pwl") == len(inverted) and targets.count("conv_pw") == 1

    swin = build_method("san", tiny("tiny_swin"))
    targets = _propagated_targets(swin)
    assert sorted(set(targets)) == ["fc1", "fc2", "proj", "qkv", "reduction"]
    assert targets.count("qkv") == 2 and targets.count("reduction") == 1


@pytest.mark.parametrize("groups", [1, 6])
def test_conv_propagation_scales_input_channels(groups):
    """W diag(s) for a conv: the same as scaling the input's channels, depthwise included."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=groups)
    source = ScaledOutput(nn.Linear(4, 6), shift=False, init_std=0.5)
    propagated = PropagatedLinear(conv, [(source, 0, 6, False)], recalibrate=False)
    x = torch.randn(2, 6, 5, 5)
    expected = conv(x * source.gamma.view(1, -1, 1, 1))
    assert torch.allclose(propagated(x), expected, atol=1e-6)
    assert torch.allclose(propagated.folded()(x), expected, atol=1e-6)


@pytest.mark.parametrize("backbone, method", [("swin_b_in22k", "ssf"), ("swin_b_in22k", "san"),
                                              ("convnext_b_in22k", "ssf"), ("convnext_b_in22k", "san")])
def test_san_matches_ssf_count_on_swin_and_convnext(backbone, method):
    counts = parameter_counts([f"backbone={backbone}", f"method={method}"])
    ssf = parameter_counts([f"backbone={backbone}", "method=ssf"])
    assert counts["trainable_without_head"] == ssf["trainable_without_head"] > 0


@pytest.mark.parametrize("dora", [False, True])
def test_san_composes_with_lora_and_merges_to_a_plain_model(dora):
    from peft.tuners.tuners_utils import BaseTunerLayer

    reference = tiny("test_vit")
    x = torch.randn(3, 3, 32, 32)
    peft = build_method("san_lora", tiny("test_vit"), {"init_std": 0.0, "dora": dora})
    peft.set_train_mode(False)
    with torch.no_grad():
        assert torch.allclose(peft.model(x), reference(x), atol=1e-5)
    trainable = {n for n, _ in peft.named_trainable_parameters()}
    assert any("lora_A" in n for n in trainable) and any(n.endswith("gamma") for n in trainable)
    perturb(peft)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in peft.model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
        unmerged = peft.model(x)
        # LoRA acts inside the propagated qkv: switching it off changes the output
        for layer in (m for m in peft.model.modules() if isinstance(m, BaseTunerLayer)):
            layer.enable_adapters(False)
        without_lora = peft.model(x)
        for layer in (m for m in peft.model.modules() if isinstance(m, BaseTunerLayer)):
            layer.enable_adapters(True)
    assert not torch.allclose(unmerged, without_lora, atol=1e-4)
    merged = peft.merge()
    assert set(merged.state_dict()) == set(reference.state_dict()) and type(merged) is type(reference)
    assert not any(isinstance(m, (ScaledOutput, PropagatedLinear, BaseTunerLayer)) for m in merged.modules())
    with torch.no_grad():
        assert (merged(x) - unmerged).abs().max() <= 1e-4


def test_san_lora_count_is_san_plus_lora():
    counts = parameter_counts(["backbone=vit_b16_in21k", "method=san_lora"])
    assert counts["trainable_without_head"] == 205_824 + 294_912
