"""SNELL and SNELLA (baselines/snell.py) against hand computations of the authors' code
(ssfgunner/SNELL): the kernel, the competition as their quantile threshold, one adapted
block, the default settings through the method contract, and SNELLA's allocation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLASSES, tiny_overrides
from helpers import images, one_step, perturb_trainable, tiny_model, trainable_names

from baselines.snell import (
    KernelizedUpdate,
    SnellLinear,
    allocate_budget,
    compete,
    quantile_keep,
)
from san.methods.base import UnsupportedBackboneError
from san.methods.registry import build_method

BACKBONES = ("test_vit", "test_swin", "test_convnext")
NO_DROPOUT = {"dropout": 0.0, "drop_path": 0.0}


def adapted(method: str, backbone: str = "test_vit", seed: int = 0, **settings):
    torch.manual_seed(seed)
    return build_method(method, tiny_model(backbone), settings)


# --- the kernel and the competition ------------------------------------------------------------
@pytest.mark.parametrize("p", [2.0, 1.0])
def test_kernel_is_the_difference_of_two_distance_kernels(p):
    torch.manual_seed(0)
    update = KernelizedUpdate(in_features=5, out_features=4, rank=6, distance_p=p, scale=0.1, keep=None)
    a, b = update.input_points.detach(), update.output_points.detach()
    expected = torch.empty(4, 5)
    for o in range(4):
        for i in range(5):
            distances = [((b[h, o] - a[h, i]).abs() ** p).sum() ** (1 / p) for h in range(2)]
            expected[o, i] = 0.1 * (distances[0] - distances[1])
    assert torch.allclose(update.dense_delta().detach(), expected, atol=1e-6)


@pytest.mark.parametrize("sparsity", [0.1, 0.4, 0.9, 0.995])
def test_competition_is_their_quantile_threshold(sparsity):
    """Their sparsify: weight * F.threshold(|weight|.detach(), torch.quantile(|weight|, s), 0);
    the value and the gradient (which reaches ΔW scaled by the detached magnitude)."""
    delta = torch.randn(20, 30, generator=torch.Generator().manual_seed(3))
    theirs = delta.clone().requires_grad_(True)
    magnitude = theirs.detach().abs()
    reference = theirs * F.threshold(magnitude, float(torch.quantile(magnitude.flatten(), sparsity)), 0)
    reference.sum().backward()
    ours = delta.clone().requires_grad_(True)
    keep = quantile_keep(delta.numel(), sparsity)
    competed = compete(ours, keep)
    competed.sum().backward()
    assert torch.equal(competed.detach(), reference.detach())
    assert int(competed.count_nonzero()) == keep
    assert torch.equal(ours.grad, theirs.grad)


def test_no_competition_at_sparsity_zero_is_their_kernelized_lora():
    """At init_thres 0 their TuningModule builds KLoRA: ΔW itself, dense, not squared."""
    layer = adapted("snell", sparsity=0.0).layers[0]
    update = layer.updates[0]
    assert update.keep is None
    assert torch.equal(update.delta(), update.dense_delta())


def test_the_update_is_not_zero_at_init_but_small():
    """Their points are Kaiming-uniform, so ΔW ≠ 0 at init; competed, ΔW ⊙ |ΔW| is tiny."""
    method = adapted("snell")
    x = images()
    with torch.no_grad():
        expected = tiny_model("test_vit")(x)
        method.set_train_mode(False)
        logits = method.model(x)
        for update in method.updates:
            assert int(update.delta().count_nonzero()) == update.keep == quantile_keep(update.entries, 0.4)
    assert not torch.equal(logits, expected)
    assert (logits - expected).abs().max() < 1e-3


# --- one adapted block by hand -----------------------------------------------------------------
def hand_delta(update: KernelizedUpdate, sparsity: float) -> torch.Tensor:
    """ΔW by their formulas: cdist per head, coefficients ±0.1, quantile threshold, x |ΔW|."""
    a, b = update.input_points.detach(), update.output_points.detach()
    distances = ((b[:, :, None, :] - a[:, None, :, :]) ** 2).sum(-1).sqrt()  # heads x d_out x d_in
    delta = 0.1 * (distances[0] - distances[1])
    magnitude = delta.abs()
    return delta * F.threshold(magnitude, float(torch.quantile(magnitude.flatten(), sparsity)), 0)


def test_an_adapted_block_is_the_block_with_hand_computed_weights():
    sparsity = 0.4
    method = adapted("snell", sparsity=sparsity, **NO_DROPOUT)
    perturb_trainable(method)
    plain = tiny_model("test_vit").blocks[0]
    block = method.model.blocks[0]
    with torch.no_grad():
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            layer = block.get_submodule(name)
            assert isinstance(layer, SnellLinear)
            delta = torch.cat([hand_delta(update, sparsity) for update in layer.updates])
            assert len(layer.updates) == (3 if name == "attn.qkv" else 1)  # q, k and v compete apart
            plain.get_submodule(name).weight += delta
    tokens = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = plain(tokens)
        block.eval()
        assert torch.allclose(block(tokens), expected, atol=1e-5)
        # training computes x W0ᵀ + b + x ΔWᵀ as their parallel branch: the same function
        block.train()
        assert torch.allclose(block(tokens), expected, atol=1e-5)


def test_checkpointing_changes_no_gradient():
    grads = []
    for use_checkpoint in (True, False):
        method = adapted("snell", checkpoint=use_checkpoint, **NO_DROPOUT)
        method.set_train_mode(True)
        method.model(images()).square().sum().backward()
        grads.append([p.grad.clone() for _, p in method.named_trainable_parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# --- the contract at the default settings (the table's rows scale the kernel) -------------------
@pytest.mark.parametrize("method_name", ["snell", "snella"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_default_settings_merge_exactly_into_the_plain_model(method_name, backbone):
    reference = tiny_model(backbone)
    method = adapted(method_name, backbone)
    perturb_trainable(method)
    method.set_train_mode(False)
    x = images()
    with torch.no_grad():
        unmerged = method.model(x)
        assert not torch.allclose(unmerged, reference(x), atol=1e-3)
        merged = method.merge()
        assert type(merged) is type(reference)
        assert merged.state_dict().keys() == reference.state_dict().keys()
        assert not any(isinstance(m, SnellLinear) for m in merged.modules())
        assert (merged(x) - unmerged).abs().max() <= 1e-5


@pytest.mark.parametrize("method_name", ["snell", "snella"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_default_settings_step_moves_only_points_class_token_and_head(method_name, backbone):
    method = adapted(method_name, backbone)
    changed, changed_buffers = one_step(method, images(4))
    points = {n for n, _ in method.model.named_parameters() if n.endswith(("input_points", "output_points"))}
    assert changed <= trainable_names(method)
    assert changed & points and not changed_buffers
    class_token = {"cls_token"} if backbone == "test_vit" else set()
    assert trainable_names(method) - points == class_token | {
        n for n, p in method.model.named_parameters() if id(p) in method.head_parameter_ids()
    }


def test_refusal_lists_the_supported_architectures():
    with pytest.raises(UnsupportedBackboneError) as error:
        adapted("snell", "effnet_lite0")
    message = str(error.value)
    assert all(name in message for name in ("EfficientNet", "VisionTransformer", "SwinTransformer", "ConvNeXt"))


# --- SNELLA's allocation -----------------------------------------------------------------------
def test_allocation_caps_redistributes_and_sums_to_the_budget():
    parts = allocate_budget([1.0, 2.0, 0.0, 5.0], budget=15, capacities=[10, 10, 10, 3])
    assert parts == [4, 8, 0, 3]  # 5/8 of 15 exceeds the last matrix's 3; 12 left split 1 : 2
    uneven = allocate_budget([0.3, 0.3, 0.4], budget=10, capacities=[100, 100, 100])
    assert sum(uneven) == 10 and uneven[2] == max(uneven)
    assert allocate_budget([0.0, 0.0], budget=7, capacities=[10, 10]) in ([4, 3], [3, 4])
    assert allocate_budget([1.0, 1.0], budget=50, capacities=[10, 20]) == [10, 20]


def feed_gradients(method, boosted: str, factor: float = 100.0) -> None:
    """Gradients of equal size everywhere but on one matrix's points."""
    for name, update in zip(method.matrix_names, method.updates):
        for parameter in update.parameters():
            parameter.grad = torch.full_like(parameter, 1e-3 * (factor if name == boosted else 1.0))


def run_until_allocation(method, total_steps: int) -> int:
    applied = method.allocations_applied
    for step in range(total_steps):
        method.after_optimizer_step(step)
        if method.allocations_applied > applied:
            return step
    raise AssertionError("no allocation point was reached")


@pytest.mark.parametrize("boosted", ["blocks.0.attn.proj", "blocks.3.attn.qkv.k"])
def test_the_important_matrix_wins_budget_and_the_global_budget_holds(boosted):
    # the first allocation point already at the target budget (10% of every ΔW on average)
    method = adapted("snella", allocations=10, target_sparsity=0.9, final_fraction=0.95)
    method.on_fit_start(100)
    feed_gradients(method, boosted)
    run_until_allocation(method, 100)
    density = {name: update.keep / update.entries for name, update in zip(method.matrix_names, method.updates)}
    assert sum(update.keep for update in method.updates) == method.budget == method.target_budget
    # its score takes it to its capacity; the others share what is left, far below
    assert density[boosted] == 1.0
    assert max(value for name, value in density.items() if name != boosted) < 0.5
    # the nonzeros the layers really compute are the allocation
    facts = method.record_facts()
    assert facts["nonzero"] == method.budget and facts["density"] == method.budget / sum(method.capacities)


def test_the_budget_follows_their_cubic_schedule():
    method = adapted("snella", allocations=20, warmup_fraction=0.1, final_fraction=0.2)
    initial, target = method.initial_budget, method.target_budget
    assert initial == sum(quantile_keep(u.entries, 0.01) for u in method.updates)
    assert target == round(0.37 * sum(method.capacities))
    assert [method.scheduled_budget(p) for p in (0, 1, 2)] == [None, None, None]  # warmup: 2 points
    for period in range(3, 16):
        expected = int(target + (initial - target) * (1 - (period - 2) / (20 - 4 - 2)) ** 3)
        assert method.scheduled_budget(period) == expected
    assert [method.scheduled_budget(p) for p in range(16, 20)] == [target] * 4
    budgets = [method.scheduled_budget(p) for p in range(3, 20)]
    assert budgets == sorted(budgets, reverse=True)


def test_allocation_points_are_spread_over_the_run_and_skip_its_end():
    method = adapted("snella", allocations=10)
    method.on_fit_start(50)
    feed_gradients(method, boosted="")
    for step in range(50):
        method.after_optimizer_step(step)
    # points 1..9 (every 5 steps); point 10 would fall after the last step
    assert method.allocations_applied == 9
    assert method.budget == method.scheduled_budget(9)


def test_steps_before_fit_start_are_an_error():
    method = adapted("snella")
    with pytest.raises(RuntimeError, match="on_fit_start"):
        method.after_optimizer_step(0)


# --- the run record ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method_name", ["snell", "snella"])
def test_the_record_holds_the_density_reached(tmp_path, tiny_task, compose, method_name):
    from san.records import read_record
    from san.run import run

    cfg = compose(tiny_overrides(tmp_path, tiny_task, f"method={method_name}", "trainer.epochs=1"))
    facts = read_record(run(cfg))["method"]["facts"]
    method = build_method(method_name, tiny_model("test_vit", num_classes=TINY_CLASSES))
    entries = sum(update.entries for update in method.updates)
    assert facts["entries"] == entries and 0 < facts["nonzero"] <= entries
    assert facts["density"] == facts["nonzero"] / entries
    if method_name == "snell":  # fixed: every matrix keeps its quantile's share
        assert facts["nonzero"] == sum(quantile_keep(update.entries, 0.4) for update in method.updates)
    else:
        assert facts["nonzero"] == facts["budget"] and facts["allocations_applied"] > 0


def test_san_params_counts_both_methods():
    from san.cli.params import parameter_counts

    for method_name in ("snell", "snella"):
        counts = parameter_counts(["backbone=test_swin", f"method={method_name}"])
        method = adapted(method_name, "test_swin")
        assert counts["trainable_without_head"] == method.parameter_counts()["trainable_without_head"] > 0


@pytest.mark.slow
def test_a_resumed_snella_run_allocates_as_the_uninterrupted_one(tmp_path, tiny_task, compose):
    """The importance averages and the allocation reached are in the checkpoint: a run killed in
    its second epoch resumes to the same losses, budget and allocation count. (Averages restarted
    from zeros would reallocate at the resumed run's first step by importance zero.)"""
    from helpers import run_killed_in_second_epoch, without_timings

    from san.identity import resolved, run_dir_for
    from san.records import read_record
    from san.run import run

    extra = ("method=snella", "method.allocations=6", "trainer.epochs=3", "trainer.checkpoint_every_epochs=1")
    reference = read_record(run(compose(tiny_overrides(tmp_path / "ref", tiny_task, *extra))))
    cfg = compose(tiny_overrides(tmp_path / "int", tiny_task, *extra))
    run_killed_in_second_epoch(cfg)
    saved = torch.load(run_dir_for(resolved(cfg)) / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["method"]["allocations_applied"] > 0
    resumed = read_record(run(cfg))
    assert resumed["cost"]["resumed_from_epoch"] == 1
    assert resumed["method"]["facts"] == reference["method"]["facts"]
    assert reference["method"]["facts"]["allocations_applied"] > saved["method"]["allocations_applied"]
    assert without_timings(resumed["metrics"]["per_epoch"]) == without_timings(reference["metrics"]["per_epoch"])
