"""The LoRA family through peft, beyond the method table (tests/test_method_table.py):
which layers `target_modules: auto` picks, and AdaLoRA's rank budget as the trainer drives it."""

from __future__ import annotations

import pytest
from conftest import tiny_overrides
from helpers import tiny_model
from peft.tuners.tuners_utils import BaseTunerLayer

from san.methods.registry import build_method


def test_targets_never_include_depthwise_convs_or_the_head():
    adapted = build_method("lora", tiny_model("effnet_lite0"))
    adapted_layers = [m for m in adapted.model.modules() if isinstance(m, BaseTunerLayer)]
    assert adapted_layers and all(m.get_base_layer().groups == 1 for m in adapted_layers)
    assert not isinstance(adapted.model.get_classifier(), BaseTunerLayer)


@pytest.mark.parametrize(
    "backbone, targets", [("test_vit", {"qkv"}), ("test_swin", {"qkv"}), ("test_convnext", {"fc1", "fc2"})]
)
def test_auto_targets_are_attention_else_the_linear_layers(backbone, targets):
    adapted = build_method("lora", tiny_model(backbone))
    names = {n.rsplit(".", 1)[-1] for n, m in adapted.model.named_modules() if isinstance(m, BaseTunerLayer)}
    assert names == targets


def test_adalora_budget_is_driven_by_the_trainer(tmp_path, tiny_task, compose, monkeypatch):
    """Through san-train: the trainer tells AdaLoRA its total steps and calls its budget after
    every step, so by the end the ranks are pruned to the target budget."""
    from baselines.peft_family import AdaLoraMethod
    from san.records import read_record
    from san.run import run

    steps, seen = [], {}
    after_step = AdaLoraMethod.after_optimizer_step

    def spy(self, step):
        after_step(self, step)
        steps.append(step)
        seen["adapted"] = self

    monkeypatch.setattr(AdaLoraMethod, "after_optimizer_step", spy)
    cfg = compose(tiny_overrides(tmp_path, tiny_task, "method=adalora", "trainer.epochs=3", "method.delta_t=1"))
    assert read_record(run(cfg))["status"] == "complete"
    adapted = seen["adapted"]
    budget = adapted._tuner.peft_config["default"]
    assert budget.total_step == len(steps) == 12 and steps == list(range(12))  # 3 epochs of 32 images / 8
    assert 0 < budget.tinit < budget.total_step - budget.tfinal < budget.total_step
    layers = [m for m in adapted.model.modules() if isinstance(m, BaseTunerLayer)]
    ranks = sum(int((layer.lora_E["default"] != 0).sum()) for layer in layers)
    assert 0 < ranks <= adapted.config.target_rank * len(layers) < adapted.config.init_rank * len(layers)
    assert budget.rank_pattern, "the final allocation writes the kept ranks"


def test_adalora_needs_a_budgeting_phase():
    adapted = build_method("adalora", tiny_model("test_vit"), {"warmup_fraction": 0.5, "final_fraction": 0.5})
    with pytest.raises(ValueError, match="no budgeting phase"):
        adapted.on_fit_start(10)
