"""The method interface on tiny real timm models: trainable sets are structural and exact."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from san.methods.registry import UnknownMethodError, available_methods, build_method

TINY = {"test_vit": dict(img_size=32), "test_convnext": dict()}


def tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **TINY[name])


@pytest.mark.parametrize("backbone", sorted(TINY))
@pytest.mark.parametrize("method", ["linear", "full", "bitfit"])
def test_training_step_changes_only_trainable(backbone, method):
    peft = build_method(method, tiny(backbone))
    before = {n: p.detach().clone() for n, p in peft.model.named_parameters()}
    trainable = {n for n, _ in peft.named_trainable_parameters()}
    optimizer = torch.optim.SGD([p for _, p in peft.named_trainable_parameters()], lr=0.1)
    peft.set_train_mode(True)
    loss = peft.model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    optimizer.step()
    changed = {n for n, p in peft.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    head = {n for n, p in peft.model.named_parameters() if id(p) in peft.head_parameter_ids()}
    assert head <= trainable


def test_bitfit_trains_exactly_the_biases():
    model = tiny("test_vit")
    biases = {id(m.bias) for m in model.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)}
    peft = build_method("bitfit", model)
    trainable = {id(p) for _, p in peft.named_trainable_parameters()}
    assert trainable == biases | peft.head_parameter_ids()


def test_linear_probe_is_the_head_only_and_merges_to_itself():
    peft = build_method("linear", tiny("test_convnext"))
    assert {id(p) for _, p in peft.named_trainable_parameters()} == peft.head_parameter_ids()
    assert peft.merge() is peft.model


def test_no_weight_decay_covers_1d_and_backbone_exemptions():
    peft = build_method("full", tiny("test_vit"))
    exempt = peft.no_weight_decay_ids()
    assert id(peft.model.cls_token) in exempt and id(peft.model.pos_embed) in exempt
    assert id(peft.model.blocks[0].norm1.weight) in exempt
    assert id(peft.model.blocks[0].attn.qkv.weight) not in exempt


def test_batchnorm_stays_frozen_for_peft_methods():
    model = timm.create_model("tf_efficientnet_lite0", num_classes=3)
    peft = build_method("bitfit", model)
    peft.set_train_mode(True)
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    full = build_method("full", timm.create_model("tf_efficientnet_lite0", num_classes=3))
    full.set_train_mode(True)
    assert all(m.training for m in full.model.modules() if isinstance(m, nn.BatchNorm2d))


def test_unknown_method_and_setting_list_accepted():
    with pytest.raises(UnknownMethodError, match="accepted: .*bitfit"):
        build_method("nope", tiny("test_vit"))
    with pytest.raises(ValueError, match="accepted: .*train_head"):
        build_method("linear", tiny("test_vit"), {"rank": 4})
    assert {"linear", "full", "bitfit"} <= set(available_methods())
