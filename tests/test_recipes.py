"""Recipe options (issue 16), each composed from the configs and run on the tiny backbones:
no gradient clipping by default, VPT's SGD recipe (optim=sgd_vpt), the learning-rate schedules
against timm's CosineLRScheduler as SSF drives it, and backbone.normalize."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from conftest import tiny_overrides
from timm.scheduler import CosineLRScheduler

from san.backbones import create_backbone, data_config
from san.config import compose_config
from san.identity import resolved
from san.methods.registry import build_method
from san.run import run
from san.trainer import Trainer, scheduled_lr


def _trainer(tmp_path, tiny_task, *extra, method="linear"):
    # on the CPU also on a GPU machine: these check what the recipe computes, with CPU tensors
    overrides = tiny_overrides(tmp_path, tiny_task, f"method={method}", "trainer.device=cpu", *extra)
    config = resolved(compose_config(overrides))
    model, _ = create_backbone(config["backbone"], 4)
    adapted = build_method(method, model)
    preprocessing = data_config(model, 32, config["backbone"]["normalize"])
    return config, Trainer(adapted, preprocessing, config["trainer"], config["optim"], 0, tmp_path / "t", "x")


def _batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (8, 3, 32, 32), generator=generator, dtype=torch.uint8), torch.arange(8) % 4


# --- gradient clipping ---------------------------------------------------------------------


def test_default_composes_to_no_clipping_and_setting_it_clips(tmp_path, tiny_task, monkeypatch):
    assert compose_config([]).trainer.grad_clip_norm is None
    calls = []
    original = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, n: calls.append(n) or original(p, n))

    _, trainer = _trainer(tmp_path / "a", tiny_task, method="full")
    trainer.train_step(*_batch())
    assert calls == []

    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainer._trainable])
    assert grad_norm > 1e-3  # unclipped

    _, trainer = _trainer(tmp_path / "b", tiny_task, "trainer.grad_clip_norm=1e-3", method="full")
    trainer.train_step(*_batch())
    assert calls == [1e-3]
    clipped = torch.nn.utils.get_total_norm([p.grad for p in trainer._trainable])
    assert clipped == pytest.approx(1e-3, rel=1e-3)


# --- optim=sgd_vpt -----------------------------------------------------------------------


def test_sgd_vpt_composes_to_vpts_recipe(tmp_path, tiny_task):
    config, trainer = _trainer(tmp_path, tiny_task, "optim=sgd_vpt", "optim.lr=0.5", method="vpt_deep")
    optim = config["optim"]
    assert (optim["name"], optim["momentum"], optim["lr_scaling"], optim["schedule"]) == (
        "sgd",
        0.9,
        "batch_over_256",
        "vpt_cosine_per_epoch",
    )
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert trainer.optimizer.defaults["momentum"] == 0.9
    assert trainer.base_lr == pytest.approx(0.5 * 8 / 256)  # tiny_overrides: batch 8
    # weight decay on the prompts (VPT: only the classifier bias is exempt)
    decayed = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    prompts = [p for n, p in trainer.adapted.named_trainable_parameters() if "prompt" in n]
    assert prompts and all(id(p) in decayed for p in prompts)
    exempt = [p for g in trainer.optimizer.param_groups if not g["weight_decay"] for p in g["params"]]
    assert [tuple(p.shape) for p in exempt] == [(4,)]  # the head's bias
    assert trainer.optim_effective["lr"] == pytest.approx(0.5 * 8 / 256)
    loss = trainer.train_step(*_batch())
    assert torch.isfinite(loss)


def test_adamw_default_keeps_prompts_exempt(tmp_path, tiny_task):
    _, trainer = _trainer(tmp_path, tiny_task, method="vpt_deep")
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    decayed = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    prompts = [p for n, p in trainer.adapted.named_trainable_parameters() if "prompt" in n]
    assert prompts and not any(id(p) in decayed for p in prompts)
    assert trainer.base_lr == 0.01  # no scaling


def test_vtab_vpt_sweep_holds_vpts_grids():
    sweep = compose_config(["sweep=vtab_vpt"]).sweep
    assert list(sweep.grid["optim.weight_decay"]) == [1e-2, 1e-3, 1e-4, 0.0]
    assert list(sweep.method_axes.vpt_deep["method.length"]) == [1, 5, 10, 50, 100, 200]
    assert list(sweep.method_axes.vpt_shallow["method.length"]) == [1, 5, 10, 50, 100, 200]


def test_vpt_schedule_is_vpts_warmup_cosine_per_epoch():
    """KMnP/vpt src/solver/lr_scheduler.py WarmupCosineSchedule.lr_lambda, stepped once per epoch."""
    optim = compose_config(["optim=sgd_vpt"]).optim
    epochs, warmup, spe, lr = 100, 10, 3, 0.05

    def vpt_lambda(step):  # the reference's formula, epoch-indexed
        if step < warmup:
            return float(step) / float(max(1.0, warmup))
        progress = float(step - warmup) / float(max(1, epochs - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))

    for step in range(epochs * spe):
        assert scheduled_lr(step, spe, epochs, lr, optim) == pytest.approx(lr * vpt_lambda(step // spe), abs=1e-15)


# --- the schedule against timm -----------------------------------------------------------


def _ssf_timm_lrs(epochs: int, steps_per_epoch: int, lr: float) -> list[float]:
    """timm's CosineLRScheduler driven as dongzelian/SSF train.py drives it: create_scheduler's
    arguments for a VTAB script (t_initial = epochs - cooldown, warmup_lr 1e-7, min_lr 1e-8,
    t_in_epochs), step_update after every step, step(epoch + 1) after every epoch."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=lr)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=epochs - 10,
        lr_min=1e-8,
        warmup_lr_init=1e-7,
        warmup_t=10,
        cycle_limit=1,
        t_in_epochs=True,
    )
    lrs, updates = [], 0
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            lrs.append(optimizer.param_groups[0]["lr"])
            updates += 1
            scheduler.step_update(num_updates=updates)
        scheduler.step(epoch + 1)
    return lrs


@pytest.mark.parametrize("lr", [5e-3, 2e-2])
def test_timm_schedule_matches_timms_cosine_lr_scheduler_as_ssf_runs_it(lr):
    optim = compose_config(["optim=adamw_ssf"]).optim
    epochs, spe = 110, 4  # SSF's VTAB: 100 epochs + 10 cooldown; VTAB-1K at batch 32 x 2 GPUs: 16 steps
    reference = _ssf_timm_lrs(epochs, spe, lr)
    ours = [scheduled_lr(step, spe, epochs, lr, optim) for step in range(epochs * spe)]
    assert ours == pytest.approx(reference, rel=1e-12, abs=1e-18)


def test_default_per_step_schedule_differs_from_ssfs_in_warmup_only_slightly():
    """The default (cosine_per_step) is not SSF's: documented, and the record says which ran."""
    optim = compose_config(["optim.warmup_epochs=10", "optim.cooldown_epochs=10"]).optim
    epochs, spe, lr = 110, 4, 5e-3
    reference = _ssf_timm_lrs(epochs, spe, lr)
    ours = [scheduled_lr(step, spe, epochs, lr, optim) for step in range(epochs * spe)]
    assert ours != pytest.approx(reference)
    assert max(abs(a - b) for a, b in zip(ours, reference)) <= lr * 0.11  # one warmup epoch's increment
    assert ours[-1] == pytest.approx(1e-8) and reference[-1] == pytest.approx(1e-8)


# --- backbone.normalize ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("normalize", "mean", "std"),
    [
        ("pretrained", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # test_vit: timm's ViT default
        ("imagenet", timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD),
    ],
)
def test_backbone_normalize(tmp_path, tiny_task, normalize, mean, std):
    config, trainer = _trainer(tmp_path, tiny_task, f"backbone.normalize={normalize}")
    assert config["backbone"]["normalize"] == normalize
    assert torch.allclose(trainer.mean.flatten(), torch.tensor(mean) * 255)
    assert torch.allclose(trainer.std.flatten(), torch.tensor(std) * 255)
    assert torch.isfinite(trainer.train_step(*_batch()))


def test_unknown_normalize_is_refused():
    from san.errors import ConfigError

    model = timm.create_model("test_vit", pretrained=False, img_size=32)
    with pytest.raises(ConfigError, match="backbone.normalize"):
        data_config(model, 32, "cifar")


# --- the record --------------------------------------------------------------------------


@pytest.mark.slow
def test_record_says_which_optimizer_schedule_and_normalisation_ran(tmp_path, tiny_task):
    extra = ("optim=sgd_vpt", "optim.lr=0.5", "optim.warmup_epochs=1", "backbone.normalize=imagenet")
    record = json.loads(run(compose_config(tiny_overrides(tmp_path, tiny_task, *extra))).read_text())
    assert record["status"] == "complete"
    assert record["optim_effective"]["class"] == "SGD"
    assert record["optim_effective"]["lr"] == pytest.approx(0.5 * 8 / 256)
    assert record["optim_effective"]["base_lr"] == 0.5
    assert record["schedule"]["name"] == "vpt_cosine_per_epoch"
    assert record["schedule"]["updates"] == "per_epoch"
    assert record["preprocessing"]["normalize"] == "imagenet"
    assert record["preprocessing"]["mean"] == pytest.approx(list(timm.data.IMAGENET_DEFAULT_MEAN))
    # epoch 1 is VPT's warmup epoch 0 (lr 0), epoch 2 the peak
    assert [row["lr"] for row in record["metrics"]["per_epoch"]] == pytest.approx([0.0, 0.5 * 8 / 256])
