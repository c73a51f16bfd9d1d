"""The LoRA family through peft, on tiny real timm models, through one table of checks."""

from __future__ import annotations

import pytest
import timm
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from san.cli.params import parameter_counts
from san.methods.base import UnsupportedBackboneError
from san.methods.registry import build_method

TINY = {"test_vit": dict(img_size=32), "test_convnext": dict(), "tf_efficientnet_lite0": dict()}
PEFT_METHODS = ["lora", "dora", "pissa", "adalora", "boft", "ia3", "vera"]
# (method, backbone) pairs that are not supported; the README's matrix mirrors this.
# VeRA adapts Linear layers only; peft's PiSSA initialisation has no Conv2d path.
UNSUPPORTED = {("vera", "tf_efficientnet_lite0"), ("pissa", "tf_efficientnet_lite0")}
CASES = [(m, b) for m in PEFT_METHODS for b in TINY if (m, b) not in UNSUPPORTED]
# Name fragments of peft's trainable adapter tensors: an oracle independent of the
# structural walk the methods use.
ADAPTER_NAMES = ("lora_A", "lora_B", "lora_E", "lora_magnitude_vector", "boft_R", "boft_s", "ia3_l",
                 "vera_lambda_b", "vera_lambda_d")


def tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **TINY[name]).eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith(".gamma"):
                # ConvNeXt's layer scale starts at 1e-6, which would hide every block from the
                # merge check; a trained model's is of order 1.
                parameter.fill_(1.0)
    return model


def perturb(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in ADAPTER_NAMES):
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("method, backbone", CASES)
def test_peft_method_contract(method, backbone):
    reference = tiny(backbone)
    original_keys = set(reference.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)
    peft = build_method(method, tiny(backbone))
    peft.set_train_mode(False)
    with torch.no_grad():
        assert torch.allclose(peft.model(x), expected, atol=1e-4), "the initial function must be the backbone's"

    trainable = {n for n, _ in peft.named_trainable_parameters()}
    head = {n for n, p in peft.model.named_parameters() if id(p) in peft.head_parameter_ids()}
    adapters = {n for n, _ in peft.model.named_parameters() if any(part in n for part in ADAPTER_NAMES)}
    assert adapters and trainable == adapters | head

    perturb(peft.model)
    with torch.no_grad():
        unmerged = peft.model(x)
    assert not torch.allclose(unmerged, expected, atol=1e-3)
    merged = peft.merge()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules()), "merge must leave no peft layer"
    assert set(merged.state_dict()) == original_keys and type(merged) is type(reference)
    with torch.no_grad():
        assert (merged(x) - unmerged).abs().max() <= 1e-4


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3"])
def test_training_step_changes_only_trainable(method):
    peft = build_method(method, tiny("test_vit"))
    before = {n: p.detach().clone() for n, p in peft.model.named_parameters()}
    trainable = {n for n, _ in peft.named_trainable_parameters()}
    optimizer = torch.optim.SGD([p for _, p in peft.named_trainable_parameters()], lr=0.1)
    peft.on_fit_start(100)
    peft.set_train_mode(True)
    loss = peft.model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean()
    regularization = peft.regularization_loss()
    (loss if regularization is None else loss + regularization).backward()
    optimizer.step()
    peft.after_optimizer_step(0)
    changed = {n for n, p in peft.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


@pytest.mark.parametrize("method, backbone", sorted(UNSUPPORTED))
def test_unsupported_pairs_are_named_errors(method, backbone):
    with pytest.raises(UnsupportedBackboneError, match=method):
        build_method(method, tiny(backbone))


def test_targets_never_include_depthwise_convs_or_the_head():
    peft = build_method("lora", tiny("tf_efficientnet_lite0"))
    adapted = [m for m in peft.model.modules() if isinstance(m, BaseTunerLayer)]
    assert adapted and all(m.get_base_layer().groups == 1 for m in adapted)
    assert not isinstance(peft.model.get_classifier(), BaseTunerLayer)


def test_lora_published_count_on_vit_b16():
    assert parameter_counts(["backbone=vit_b16_in21k", "method=lora"])["trainable_without_head"] == 294_912


def test_adalora_budget_is_driven_by_the_trainer(tmp_path, tiny_task, compose):
    from san.run import run
    from san.records import read_record
    from tests.conftest import tiny_overrides

    record = read_record(run(compose(tiny_overrides(tmp_path, tiny_task, "method=adalora", "trainer.epochs=3"))))
    assert record["status"] == "complete"
    assert record["params"]["trainable_without_head"] > 0


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_each_method_trains_through_san_train(tmp_path, tiny_task, compose, method):
    from san.run import run
    from san.records import read_record
    from tests.conftest import tiny_overrides

    record = read_record(run(compose(tiny_overrides(tmp_path, tiny_task, f"method={method}", "debug=fdr"))))
    assert record["status"] == "complete" and record["method"]["name"] == method
