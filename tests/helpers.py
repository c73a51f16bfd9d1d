"""Helpers shared by the method tests: tiny timm backbones, the same architectures shape-only
on the meta device, moving a method off its initialisation, and one optimiser step.

Every backbone is built from its config (configs/backbone/<name>.yaml: timm_name and
kwargs) with timm directly, random weights, so the tests and `backbone=<name>` agree on the
architecture (the tiny Swin's dimensions live in test_swin.yaml only).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from san.config import config_dir

# Small enough to run on a CPU in milliseconds; all run at 32 px. effnet_lite0 is the real
# EfficientNet-Lite0 (4.7 M parameters; timm has no smaller one), the BatchNorm convnet.
TINY_BACKBONES = ("test_vit", "test_convnext", "test_swin", "effnet_lite0")
IMAGE_SIZE = 32
# A two-point learning-rate grid that protocol tests pin on experiment=demo, so their run counts
# do not follow configs/sweep/demo.yaml (sized for the demo's cells).
TWO_POINT_GRID = ("sweep.grid={optim.lr:[1.0e-2,2.0e-3]}", "~sweep.method_axes")
# Settings that make a method the AdaptFormer variant (configs/method/adaptformer.yaml).
ADAPTFORMER = {
    "dim": 8,
    "scale": 0.1,
    "dropout": 0.1,
    "placement": "residual_stream",
    "init": "lora",
    "activation": "relu",
}


def backbone_config(name: str) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "backbone" / f"{name}.yaml"), resolve=True)


def tiny_model(name: str, num_classes: int = 5, seed: int = 0) -> nn.Module:
    """A backbone config's architecture with random weights, in eval mode: a fresh copy of
    one model built per (name, num_classes, seed) (timm's initialisation costs more than
    the tests that use it).

    ConvNeXt's layer scale starts at 1e-6, which would hide every block from a test that
    compares outputs; it is set to 1, the order a trained model has."""
    return copy.deepcopy(_tiny_model(name, num_classes, seed))


@functools.lru_cache(maxsize=None)
def _tiny_model(name: str, num_classes: int, seed: int) -> nn.Module:
    cfg = backbone_config(name)
    torch.manual_seed(seed)
    model = timm.create_model(
        cfg["timm_name"], pretrained=False, num_classes=num_classes, **(cfg.get("kwargs") or {})
    ).eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith(".gamma"):
                parameter.fill_(1.0)
    return model


def meta_model(name: str, num_classes: int = 10) -> nn.Module:
    """A backbone config's architecture on the meta device: shapes only, no memory, no
    initialisation (ViT-B/16 in ~0.1 s), for parameter counts."""
    cfg = backbone_config(name)
    with torch.device("meta"):
        return timm.create_model(
            cfg["timm_name"], pretrained=False, num_classes=num_classes, **(cfg.get("kwargs") or {})
        )


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def perturb_trainable(adapted, scale: float = 0.05, seed: int = 1) -> None:
    """Add noise to every trainable tensor, so that a method is off its initialisation (an
    identity-initialised method would make a merge test pass trivially)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in adapted.named_trainable_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(scale * noise.to(parameter.device, parameter.dtype))


def one_step(adapted, x: torch.Tensor, lr: float = 0.1) -> tuple[set[str], set[str]]:
    """One optimiser step as the trainer takes it (fit start, train mode, the method's
    regulariser, the after-step hook); returns the names of the parameters and of the
    buffers it changed."""
    model = adapted.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    optimizer = torch.optim.SGD([p for _, p in adapted.named_trainable_parameters()], lr=lr)
    adapted.on_fit_start(10)
    adapted.set_train_mode(True)
    labels = torch.arange(x.shape[0]) % model.num_classes
    loss = F.cross_entropy(model(x), labels)
    regularization = adapted.regularization_loss()
    (loss if regularization is None else loss + regularization).backward()
    optimizer.step()
    adapted.after_optimizer_step(0)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    changed_buffers = {n for n, b in model.named_buffers() if n in buffers and not torch.equal(b, buffers[n])}
    return changed, changed_buffers


def head_names(adapted) -> set[str]:
    head = adapted.head_parameter_ids()
    return {n for n, p in adapted.model.named_parameters() if id(p) in head}


def trainable_names(adapted) -> set[str]:
    return {n for n, _ in adapted.named_trainable_parameters()}


def without_timings(rows: list[dict]) -> list[dict]:
    """Per-epoch metric rows without their wall-clock fields, which differ between equal runs."""
    return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in rows]


def run_killed_in_second_epoch(cfg) -> None:
    """Run `cfg` and kill it as its second epoch starts (a KeyboardInterrupt from inside the
    trainer), leaving what the run had written by then: its record and its checkpoint."""
    from san.run import run
    from san.trainer import Trainer

    original_epoch = Trainer._fit_epoch
    calls = {"n": 0}

    def dies_in_second_epoch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return original_epoch(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_fit_epoch", dies_in_second_epoch)
        with pytest.raises(KeyboardInterrupt):
            run(cfg)
