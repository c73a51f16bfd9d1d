"""VPT (shallow/deep) and bottleneck adapters on tiny real timm models."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from baselines.adapter import Bottleneck
from san.cli.params import parameter_counts
from san.methods.base import NotMergeableError, UnsupportedBackboneError
from san.methods.registry import build_method

TINY = {"test_vit": dict(img_size=32), "test_convnext": dict(), "tf_efficientnet_lite0": dict()}
# The supported pairs; the README's matrix mirrors this table.
SUPPORTED = {("vpt_shallow", "test_vit"), ("vpt_deep", "test_vit"), ("adapter", "test_vit"),
             ("adaptformer", "test_vit"), ("adapter", "test_convnext"), ("adaptformer", "test_convnext")}
METHODS = ["vpt_shallow", "vpt_deep", "adapter", "adaptformer"]


def tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **TINY[name]).eval()


def method_tensors(peft) -> set[int]:
    ids = set()
    if hasattr(peft.model, "prompts"):
        ids.add(id(peft.model.prompts.tokens))
    for module in peft.model.modules():
        if isinstance(module, Bottleneck):
            ids |= {id(p) for p in module.parameters()}
    return ids


@pytest.mark.parametrize("method, backbone", sorted(SUPPORTED))
def test_method_contract(method, backbone):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = tiny(backbone)(x)
    peft = build_method(method, tiny(backbone))
    peft.set_train_mode(False)
    trainable = {id(p) for _, p in peft.named_trainable_parameters()}
    assert trainable == method_tensors(peft) | peft.head_parameter_ids()
    with torch.no_grad():
        logits = peft.model(x)
    if method.startswith("adapt"):
        assert torch.allclose(logits, expected, atol=1e-6), "a zero-initialised up-projection is the identity"
    else:
        assert logits.shape == expected.shape and not torch.allclose(logits, expected, atol=1e-4)
    with pytest.raises(NotMergeableError):
        peft.merge()

    before = {n: p.detach().clone() for n, p in peft.model.named_parameters()}
    optimizer = torch.optim.SGD([p for _, p in peft.named_trainable_parameters()], lr=0.5)
    peft.set_train_mode(True)
    F.cross_entropy(peft.model(x), torch.tensor([0, 1, 2])).backward()
    optimizer.step()
    changed = {n for n, p in peft.model.named_parameters() if not torch.equal(p, before[n])}
    names = {n for n, _ in peft.named_trainable_parameters()}
    assert changed <= names and changed - {n for n, p in peft.model.named_parameters()
                                           if id(p) in peft.head_parameter_ids()}


@pytest.mark.parametrize("method, backbone", [(m, b) for m in METHODS for b in TINY if (m, b) not in SUPPORTED])
def test_unsupported_pairs_are_named_errors(method, backbone):
    with pytest.raises(UnsupportedBackboneError, match=method):
        build_method(method, tiny(backbone))


def test_vpt_deep_replaces_prompts_at_every_block():
    model = tiny("test_vit")
    peft = build_method("vpt_deep", model, {"length": 3})
    lengths = []
    hooks = [b.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        peft.model(torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    tokens = 1 + (32 // model.patch_embed.patch_size[0]) ** 2
    # the method's own hooks run first, so every block sees prefix + prompts + patches
    assert lengths == [tokens + 3] * len(model.blocks)
    assert model.prompts.tokens.shape == (len(model.blocks), 3, model.embed_dim)


def test_vpt_shallow_prompts_reach_the_output_only_through_attention():
    peft = build_method("vpt_shallow", tiny("test_vit"), {"length": 4})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = peft.model(x)
        peft.model.prompts.tokens.mul_(2)
        second = peft.model(x)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("method, expected", [("adapter", 156_768), ("adaptformer", 156_768),
                                              ("vpt_shallow", 7_680), ("vpt_deep", 92_160)])
def test_vit_b16_counts(method, expected):
    assert parameter_counts(["backbone=vit_b16_in21k", f"method={method}"])["trainable_without_head"] == expected
