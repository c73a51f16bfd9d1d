"""Every registered method trains through san-train on each tiny backbone it supports, and
fails with a named error on each it does not: the README's support matrix, executed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from san.backbones import create_backbone
from san.cli.params import parameter_counts
from san.methods.base import UnsupportedBackboneError
from san.methods.registry import available_methods, build_method_from_config
from san.records import read_record
from san.run import run

from conftest import tiny_overrides

# (method, backbone config) pairs that must refuse; every other pair must train.
UNSUPPORTED = {
    ("vpt_shallow", "test_convnext"), ("vpt_deep", "test_convnext"),  # no token sequence
    ("vpt_shallow", "test_swin"), ("vpt_deep", "test_swin"),  # windowed attention: VPT's Swin variant not built
    ("san_lora", "test_convnext"),  # no qkv for the LoRA half
}
BACKBONES = ["test_vit", "test_convnext", "test_swin"]


def test_every_registered_method_has_a_config(compose):
    for method in available_methods():
        assert compose([f"method={method}"]).method.name == method


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method", available_methods())
def test_method_trains_or_refuses_by_name(tmp_path, tiny_task, compose, method, backbone):
    cfg = compose(tiny_overrides(tmp_path, tiny_task, f"method={method}", f"backbone={backbone}", "debug=fdr"))
    if (method, backbone) in UNSUPPORTED:
        with pytest.raises(UnsupportedBackboneError, match=method):
            run(cfg)
        return
    record = read_record(run(cfg))
    assert record["status"] == "complete" and record["method"]["name"] == method
    assert record["params"]["trainable"] > 0


@pytest.mark.parametrize("method", available_methods())
def test_a_training_step_changes_only_the_trainable_parameters(compose, method):
    """The same check for every method, on the tiny ViT every method supports."""
    cfg = OmegaConf.to_container(compose(["backbone=test_vit", f"method={method}"]), resolve=True)
    torch.manual_seed(0)
    model, _ = create_backbone(cfg["backbone"], 4)
    peft = build_method_from_config(model, cfg["method"])
    before = {n: p.detach().clone() for n, p in peft.model.named_parameters()}
    trainable = {n for n, _ in peft.named_trainable_parameters()}
    head = {n for n, p in peft.model.named_parameters() if id(p) in peft.head_parameter_ids()}
    optimizer = torch.optim.SGD([p for _, p in peft.named_trainable_parameters()], lr=0.1)
    peft.on_fit_start(10)
    peft.set_train_mode(True)
    loss = F.cross_entropy(peft.model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    regularization = peft.regularization_loss()
    (loss if regularization is None else loss + regularization).backward()
    optimizer.step()
    changed = {n for n, p in peft.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable and head <= trainable
    if method != "linear":
        assert changed - head, f"{method}: its own parameters did not move"


@pytest.mark.parametrize("method, expected", [("linear", 0), ("bitfit", 102_912), ("ssf", 205_824),
                                              ("san", 205_824), ("san_early", 122_112), ("lora", 294_912),
                                              ("adapter", 156_768)])
def test_published_vit_b16_counts(method, expected):
    assert parameter_counts(["backbone=vit_b16_in21k", f"method={method}"])["trainable_without_head"] == expected
