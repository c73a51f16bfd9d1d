"""Batch augmentation on the device, soft targets and model EMA (issue 16): each piece against a
hand computation or the reference implementation it reproduces (timm's PIL RandAugment ops,
timm's Mixup targets, torch's cross-entropy with label smoothing), the off switch against the
plain training step, and run identities that do not move while the new settings are off."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import timm.data.auto_augment as timm_aa
import torch
import torch.nn.functional as F
from conftest import tiny_overrides
from helpers import run_killed_in_second_epoch, without_timings
from omegaconf import OmegaConf
from PIL import Image

from san.backbones import create_backbone, data_config
from san.config import compose_config, config_dir
from san.data import batch_augment as ba
from san.data.transforms import build_transform, is_deterministic, resize_transform
from san.ema import ModelEma
from san.errors import ConfigError
from san.identity import _NEUTRAL_VALUES, identity, resolved
from san.methods.registry import build_method
from san.run import run
from san.trainer import Trainer, build_optimizer

NONE_YAML = Path(config_dir()) / "augment" / "none.yaml"


def _image_batch(count: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth gradients plus noise: crops, flips and colour ops all change such images visibly."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    base = torch.stack([xx * 7, yy * 6, (xx + yy) * 3]).float()
    noise = torch.randint(-40, 40, (count, 3, size, size), generator=generator)
    return (base + noise).clamp(0, 255).to(torch.uint8)


def _normalize(images: torch.Tensor) -> torch.Tensor:
    return (images.float() - 127.5) / 127.5


def _augment(settings: dict, num_classes: int = 4, smoothing: float = 0.1) -> ba.BatchAugment:
    return ba.BatchAugment(
        ba.AugmentSettings.from_config(settings), _normalize, (0.5, 0.5, 0.5), num_classes, smoothing
    )


SAN_EARLY = OmegaConf.to_container(compose_config(["augment=san_early"]).augment)


# --- the off switch and run identities -----------------------------------------------------


def test_none_yaml_the_dataclass_and_the_neutral_values_agree():
    none = OmegaConf.to_container(OmegaConf.load(NONE_YAML))
    neutral = {key: value for (group, key), value in _NEUTRAL_VALUES.items() if group == "augment"}
    assert set(none) - {"name"} == set(neutral)
    assert {k: v for k, v in none.items() if k != "name"} == neutral
    defaults = ba.AugmentSettings()
    assert ba.AugmentSettings.from_config(none) == defaults
    assert not defaults.active


def _without_new_settings(config: dict) -> dict:
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items() if k != "augment"}
    new_keys = (
        ("trainer", "model_ema"),
        ("trainer", "model_ema_decay"),
        ("optim", "warmup_lr_ratio"),
        ("backbone", "head_init"),
    )
    for group, key in new_keys:
        del config[group][key]
    return config


@pytest.mark.parametrize(
    "overrides",
    [[], ["experiment=vtab", "dataset=cifar"], ["experiment=fgvc", "dataset=cub", "method=ssf"], ["optim=sgd_vpt"]],
)
def test_default_identity_is_the_same_with_and_without_the_new_keys(tmp_path, overrides):
    config = resolved(compose_config([f"paths.root_dir={tmp_path}", *overrides]))
    assert "augment" in config and "model_ema" in config["trainer"] and "warmup_lr_ratio" in config["optim"]
    assert config["backbone"]["head_init"] == "timm"
    assert identity(config) == identity(_without_new_settings(config))


@pytest.mark.parametrize(
    "switch",
    [
        "augment=san_early",
        "augment=ssf_fgvc",
        "augment.hflip=0.5",
        "trainer.model_ema=true",
        "optim.warmup_lr_ratio=0.5",
        "backbone.head_init=zeros",
    ],
)
def test_switched_on_the_new_settings_count(tmp_path, switch):
    base = resolved(compose_config([f"paths.root_dir={tmp_path}"]))
    assert identity(resolved(compose_config([f"paths.root_dir={tmp_path}", switch]))) != identity(base)


def test_the_augment_name_alone_is_a_label(tmp_path):
    base = resolved(compose_config([f"paths.root_dir={tmp_path}"]))
    renamed = resolved(compose_config([f"paths.root_dir={tmp_path}", "augment.name=renamed"]))
    assert identity(renamed) == identity(base)


def _tiny_trainer(tmp_path, tiny_task, *extra, method="linear", augment=None, with_augment=True):
    overrides = tiny_overrides(tmp_path, tiny_task, f"method={method}", "trainer.device=cpu", *extra)
    config = resolved(compose_config(overrides))
    torch.manual_seed(0)
    model, _ = create_backbone(config["backbone"], 4)
    adapted = build_method(method, model)
    preprocessing = data_config(model, 32, config["backbone"]["normalize"])
    kwargs = {"augment": config["augment"] if augment is None else augment, "num_classes": 4} if with_augment else {}
    trainer = Trainer(adapted, preprocessing, config["trainer"], config["optim"], 0, tmp_path / "t", "x", **kwargs)
    return config, trainer


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (8, 3, 32, 32), generator=generator, dtype=torch.uint8), torch.arange(8) % 4


def test_augment_none_takes_the_plain_step_bit_for_bit(tmp_path, tiny_task):
    """augment=none (as run.py passes it) and no augment at all (as san-bench) give the same
    weights, and both equal a hand-written plain step: forward, cross-entropy with the label
    smoothing, the optimizer's step."""
    extra = ("trainer.label_smoothing=0.1",)
    _, composed = _tiny_trainer(tmp_path / "a", tiny_task, *extra, method="ssf")
    _, bare = _tiny_trainer(tmp_path / "b", tiny_task, *extra, method="ssf", with_augment=False)
    config, reference = _tiny_trainer(tmp_path / "c", tiny_task, *extra, method="ssf")
    assert composed.batch_augment is None and bare.batch_augment is None and composed.ema is None
    optimizer = build_optimizer(reference.adapted, config["optim"], torch.device("cpu"), 8)
    for step in range(3):
        images, labels = _batch(step)
        composed.train_step(images, labels)
        bare.train_step(images, labels)
        logits = reference.adapted.model((images.float() - reference.mean) / reference.std)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for a, b, c in zip(composed._trainable, bare._trainable, reference._trainable):
        assert torch.equal(a, b) and torch.equal(a, c)


# --- random-resized crop and flip ----------------------------------------------------------


def test_identity_box_resamples_exactly_and_a_flip_box_mirrors():
    images = _image_batch(4)
    box = torch.tensor([[0.0, 0.0, 32.0, 32.0]]).repeat(4, 1)
    for mode in ba.INTERPOLATIONS:
        same = ba.warp(images, ba.crop_flip_matrices(box, torch.zeros(4, dtype=torch.bool), (32, 32)), (32, 32), mode)
        assert torch.equal(same, images), mode
        mirrored = ba.warp(
            images, ba.crop_flip_matrices(box, torch.ones(4, dtype=torch.bool), (32, 32)), (32, 32), mode
        )
        assert torch.equal(mirrored, images.flip(-1)), mode


def test_a_box_resizes_like_resizing_the_crop():
    """The warp's coordinates are torch's resize convention (pixel centres at +0.5): away from the
    box's border (where the warp reads the image beyond the box and a resize of the cut-out crop
    clamps), a crop resized by the warp equals F.interpolate of the cut-out."""
    images = _image_batch(2)
    top, left, h, w = 5, 3, 16, 12
    box = torch.tensor([[top, left, h, w]], dtype=torch.float64).repeat(2, 1)
    warped = ba.warp(
        images, ba.crop_flip_matrices(box, torch.zeros(2, dtype=torch.bool), (32, 24)), (32, 24), "bilinear"
    )
    crop = images[:, :, top : top + h, left : left + w].float()
    resized = F.interpolate(crop, size=(32, 24), mode="bilinear", align_corners=False).round().to(torch.uint8)
    assert torch.equal(warped[..., 2:-2, 2:-2], resized[..., 2:-2, 2:-2])


def test_random_resized_crop_boxes_follow_torchvisions_rule():
    """Boxes lie inside the image and are distributed as torchvision's RandomResizedCrop.get_params
    (which timm's RandomResizedCropAndInterpolation copies) draws them, one image at a time."""
    from torchvision.transforms import RandomResizedCrop

    count, height, width, scale, ratio = 3000, 40, 30, (0.08, 1.0), (3 / 4, 4 / 3)
    torch.manual_seed(0)
    ours = ba.random_resized_crop_boxes(count, height, width, scale, ratio)
    top, left, h, w = ours.unbind(1)
    assert bool(((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width) & (h >= 1) & (w >= 1)).all())
    canvas = torch.zeros(1, height, width)
    theirs = torch.tensor(
        [RandomResizedCrop.get_params(canvas, scale, ratio) for _ in range(count)], dtype=torch.float64
    )

    def stats(boxes):
        top, left, h, w = boxes.unbind(1)
        return torch.stack(
            [h * w / (height * width), torch.log(w / h), (top + h / 2) / height, (left + w / 2) / width]
        ).mean(1)

    assert torch.allclose(stats(ours), stats(theirs), atol=0.02)


# --- RandAugment against timm's PIL ops ----------------------------------------------------

TIMM_NAMES = {
    "auto_contrast": "AutoContrast",
    "equalize": "Equalize",
    "invert": "Invert",
    "rotate": "Rotate",
    "posterize_increasing": "PosterizeIncreasing",
    "solarize_increasing": "SolarizeIncreasing",
    "solarize_add": "SolarizeAdd",
    "color_increasing": "ColorIncreasing",
    "contrast_increasing": "ContrastIncreasing",
    "brightness_increasing": "BrightnessIncreasing",
    "sharpness_increasing": "SharpnessIncreasing",
    "shear_x": "ShearX",
    "shear_y": "ShearY",
    "translate_x_rel": "TranslateXRel",
    "translate_y_rel": "TranslateYRel",
}


def test_the_op_set_is_timms_increasing_set():
    assert [TIMM_NAMES[name] for name in ba.RAND_AUGMENT_OPS] == timm_aa._RAND_INCREASING_TRANSFORMS


@pytest.mark.parametrize("name", ba.RAND_AUGMENT_OPS)
# levels whose translations are not whole-plus-half pixels: a sample exactly between two pixels
# is a tie that PIL's and torch's nearest break differently
@pytest.mark.parametrize("level", [3.0, 9.0, 10.0])
@pytest.mark.parametrize("negate", [False, True])
def test_each_op_equals_timms_pil_op(monkeypatch, name, level, negate):
    """With nearest resampling (where PIL's and torch's kernels agree) every op gives timm's
    pixels exactly; timm's level-to-argument functions and its sign flip are used as timm runs
    them (its `random.random` pinned to choose the sign)."""
    monkeypatch.setattr(timm_aa.random, "random", lambda: 1.0 if negate else 0.0)
    image = _image_batch(1, size=40, seed=3)[0]
    level_to_arg = timm_aa.LEVEL_TO_ARG[TIMM_NAMES[name]]
    args = level_to_arg(level, {"translate_pct": 0.45}) if level_to_arg else ()
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    if name == "posterize_increasing" and args == (0,):
        # level 10 keeps 0 bits: Pillow < 11 (the references' era) returned a black image,
        # Pillow 11 refuses 0 bits; the black image is what the recipes trained on
        expected = torch.zeros_like(image)
    else:
        expected = timm_aa.NAME_TO_OP[TIMM_NAMES[name]](pil, *args, fillcolor=(128, 128, 128), resample=Image.NEAREST)
        expected = torch.from_numpy(np.array(expected)).permute(2, 0, 1)
    context = ba._Context(mode="nearest", fill=torch.tensor([128.0, 128.0, 128.0]))
    sign = torch.tensor([-1.0 if negate else 1.0], dtype=torch.float64)
    ours = ba._OPS[name](image[None], torch.tensor([level], dtype=torch.float64), sign, context)[0]
    assert ours.dtype == torch.uint8
    assert torch.equal(ours, expected)


def test_rand_augment_changes_images_keeps_shape_and_repeats_under_a_seed():
    images = _image_batch(16)
    before = images.clone()
    context = ba._Context(mode="bicubic", fill=torch.tensor([128.0, 128.0, 128.0]))
    torch.manual_seed(7)
    first = ba.rand_augment(images, 2, 9.0, 0.5, 0.5, context)
    torch.manual_seed(7)
    again = ba.rand_augment(images, 2, 9.0, 0.5, 0.5, context)
    torch.manual_seed(8)
    other = ba.rand_augment(images, 2, 9.0, 0.5, 0.5, context)
    assert torch.equal(images, before)  # the input (a cached split's batch) is never written
    assert first.shape == images.shape and first.dtype == torch.uint8
    assert torch.equal(first, again) and not torch.equal(first, other)
    changed = (first != images).flatten(1).any(1)
    # each image is left alone only when neither of its two layers applied (p = 0.25)
    assert 0 < int(changed.sum()) < 16


# --- the whole pipeline --------------------------------------------------------------------


def test_san_early_batch_differs_keeps_shape_and_repeats_under_a_seed():
    augment = _augment(SAN_EARLY)
    images, labels = _image_batch(8), torch.arange(8) % 4
    random.seed(123)
    np.random.seed(123)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch.manual_seed(5)
    inputs, targets = augment(images, labels)
    assert random.getstate() == python_state  # timm's generators were seeded and restored
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    random.seed(999)  # the global Python and numpy state do not steer the result
    np.random.seed(999)
    torch.manual_seed(5)
    inputs_again, targets_again = augment(images, labels)
    torch.manual_seed(6)
    inputs_other, _ = augment(images, labels)
    assert inputs.shape == (8, 3, 32, 32) and inputs.dtype == torch.float32
    assert targets.shape == (8, 4) and targets.dtype == torch.float32
    assert torch.equal(inputs, inputs_again) and torch.equal(targets, targets_again)
    assert not torch.equal(inputs, inputs_other)
    assert not torch.allclose(inputs, _normalize(images))
    assert torch.allclose(targets.sum(1), torch.ones(8))


def _timm_draws(seed: int):
    """The numpy stream timm's Mixup reads, as the augmentation seeds it from torch's generator."""
    torch.manual_seed(seed)
    return np.random.RandomState(int(torch.randint(0, 2**31 - 1, ())))


def _smoothed(labels: torch.Tensor, classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / classes
    return torch.full((len(labels), classes), off).scatter_(1, labels[:, None], 1 - smoothing + off)


def test_mixup_mixes_images_and_smoothed_targets_by_one_lambda():
    augment = _augment({"mixup_alpha": 0.8, "drop_last": True}, num_classes=5, smoothing=0.1)
    images, labels = _image_batch(6), torch.tensor([0, 1, 2, 3, 4, 1])
    torch.manual_seed(11)
    inputs, targets = augment(images, labels)
    draws = _timm_draws(11)
    assert draws.rand() < 1.0  # mixup_prob 1: every batch mixes
    lam = draws.beta(0.8, 0.8)
    x = _normalize(images)
    assert torch.allclose(inputs, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    y = _smoothed(labels, 5, 0.1)
    assert torch.allclose(targets, lam * y + (1 - lam) * y.flip(0), atol=1e-6)


def test_cutmix_pastes_one_box_and_weights_targets_by_its_area():
    augment = _augment({"cutmix_alpha": 1.0, "drop_last": True}, num_classes=4, smoothing=0.0)
    images, labels = _image_batch(4), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(3)
    inputs, targets = augment(images, labels)
    x = _normalize(images)
    pasted = (inputs != x).any(dim=1)  # (N, H, W): where the reversed batch shows through
    assert torch.equal(inputs[pasted.unsqueeze(1).expand_as(inputs)], x.flip(0)[pasted.unsqueeze(1).expand_as(x)])
    lam = targets[0, 0].item()  # image 0's own class keeps lam, the partner's gets 1 - lam
    assert targets[0, 3].item() == pytest.approx(1 - lam)
    # the box is one rectangle, the same for every image; its area is 1 - lam (timm's correct_lam)
    box = pasted[0] | pasted[1]
    rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
    area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert area.item() == pytest.approx((1 - lam) * 32 * 32, abs=1)


def test_unmixed_soft_targets_give_the_plain_smoothed_loss():
    """mixup_prob 0 leaves the batch unmixed: the soft targets are the smoothed one-hots, and the
    soft-target cross-entropy equals torch's cross-entropy with label smoothing."""
    augment = _augment({"mixup_alpha": 0.8, "mixup_prob": 0.0, "drop_last": True}, num_classes=4, smoothing=0.2)
    images, labels = _image_batch(4), torch.tensor([3, 1, 0, 2])
    inputs, targets = augment(images, labels)
    assert torch.equal(inputs, _normalize(images))
    assert torch.allclose(targets, _smoothed(labels, 4, 0.2))
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    expected = F.cross_entropy(logits, labels, label_smoothing=0.2)
    assert ba.soft_target_cross_entropy(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_random_erasing_blanks_one_box_per_image():
    augment = _augment({"random_erasing": 1.0, "random_erasing_mode": "const"})
    images, labels = _image_batch(8), torch.arange(8) % 4
    torch.manual_seed(2)
    inputs, targets = augment(images, labels)
    assert torch.equal(targets, labels)
    x = _normalize(images)
    for image, erased in zip(x, inputs):
        changed = (image != erased).any(0)
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        box = erased[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert torch.all(box == 0)  # const mode: zeros in normalised units
        area = len(rows) * len(cols) / 32**2
        assert 0.02 * 0.5 < area < 1 / 3 + 0.1  # timm's (0.02, 1/3) up to rounding of the sides


def test_bad_settings_name_the_accepted_values():
    with pytest.raises(ConfigError, match="accepted"):
        ba.AugmentSettings.from_config({"crop": "centre"})
    with pytest.raises(ConfigError, match="accepted"):
        ba.AugmentSettings.from_config({"mixup": 0.8})
    with pytest.raises(ConfigError, match="probability"):
        ba.AugmentSettings.from_config({"hflip": 2})


def test_mixup_needs_full_even_batches(tmp_path, tiny_task):
    with pytest.raises(ConfigError, match="drop_last"):
        _tiny_trainer(tmp_path, tiny_task, "augment.mixup_alpha=0.8")
    with pytest.raises(ConfigError, match="even"):
        _tiny_trainer(tmp_path, tiny_task, "augment=san_early", "trainer.batch_size=7")


# --- model EMA -----------------------------------------------------------------------------


def test_ema_update_is_the_exponential_average():
    live = torch.zeros(3)
    ema = ModelEma({"w": live}, decay=0.9)
    expected = live.clone()
    for value in (1.0, -2.0, 0.5, 4.0):
        live.fill_(value)
        ema.update()
        expected = 0.9 * expected + 0.1 * value
    assert torch.allclose(ema.average[0], expected, atol=1e-6)
    with ema.swapped_in():
        assert torch.allclose(live, expected, atol=1e-6)
    assert torch.all(live == 4.0)


def test_trainer_ema_after_k_steps_equals_a_hand_computation(tmp_path, tiny_task):
    _, trainer = _tiny_trainer(
        tmp_path, tiny_task, "trainer.model_ema=true", "trainer.model_ema_decay=0.8", method="ssf"
    )
    names = trainer.ema.names
    trainable = {id(p) for p in trainer._trainable}
    state = trainer.adapted.model.state_dict(keep_vars=True)
    assert all(id(state[name]) in trainable for name in names)  # test_vit has no float buffers
    assert len(names) == len(trainable)
    expected = [state[name].detach().clone() for name in names]
    for step in range(4):
        trainer.train_step(*_batch(step))
        expected = [0.8 * e + 0.2 * state[name].detach() for e, name in zip(expected, names)]
    for average, hand in zip(trainer.ema.average, expected):
        assert torch.allclose(average, hand, atol=1e-6)
    assert not all(torch.allclose(state[name], e) for name, e in zip(names, expected))  # live weights differ


def test_evaluation_reads_the_ema_weights_and_restores_the_live_ones(tmp_path, tiny_task):
    from san.data.cache import TensorLoader

    _, trainer = _tiny_trainer(
        tmp_path, tiny_task, "trainer.model_ema=true", "trainer.model_ema_decay=0.5", method="full"
    )
    for step in range(3):
        trainer.train_step(*_batch(step))
    images, labels = _batch(9)
    loader = TensorLoader(images, labels, 8, shuffle=False)
    live = [p.detach().clone() for p in trainer._trainable]
    averages = {name: average.clone() for name, average in zip(trainer.ema.names, trainer.ema.average)}
    with_ema = trainer.evaluate(loader)
    assert all(torch.equal(p, q) for p, q in zip(trainer._trainable, live))  # swapped back
    trainer.ema = None
    without = trainer.evaluate(loader)
    state = trainer.adapted.model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, average in averages.items():
            state[name].copy_(average)
    assert with_ema == trainer.evaluate(loader)  # the EMA weights, loaded by hand
    assert with_ema["loss"] != without["loss"]


@pytest.mark.slow
def test_a_resumed_augmented_ema_run_equals_an_uninterrupted_one(tmp_path, tiny_task):
    """Batch augmentation draws from torch's generator (reseeded per epoch) and the EMA is in the
    checkpoint: killed after epoch 1 and resumed, the run computes what an uninterrupted one does
    (the per-epoch evaluations read the EMA weights)."""
    extra = (
        "augment=san_early",
        "trainer.model_ema=true",
        "trainer.model_ema_decay=0.9",
        "trainer.label_smoothing=0.1",
        "trainer.epochs=3",
        "trainer.eval_every=1",
        "trainer.checkpoint_every_epochs=1",
        "method=ssf",
    )
    reference = json.loads(run(compose_config(tiny_overrides(tmp_path / "ref", tiny_task, *extra))).read_text())

    cfg = compose_config(tiny_overrides(tmp_path / "int", tiny_task, *extra))
    run_killed_in_second_epoch(cfg)
    resumed = json.loads(run(cfg).read_text())
    assert resumed["cost"]["resumed_from_epoch"] == 1
    assert without_timings(resumed["metrics"]["per_epoch"]) == without_timings(reference["metrics"]["per_epoch"])
    assert reference["model_ema"]["evaluated_with"] == "ema" and reference["model_ema"]["decay"] == 0.9
    assert reference["augment"]["name"] == "san_early" and reference["augment"]["targets"].startswith("soft")


def test_a_checkpoint_without_ema_is_refused_when_ema_is_on(tmp_path, tiny_task):
    from san.trainer import CheckpointError, TrainOutcome

    _, plain = _tiny_trainer(tmp_path, tiny_task, method="ssf")
    plain._save_checkpoint(1, TrainOutcome())
    _, with_ema = _tiny_trainer(tmp_path, tiny_task, "trainer.model_ema=true", method="ssf")
    with pytest.raises(CheckpointError, match="EMA"):
        with_ema._load_checkpoint()


def test_ema_state_round_trips_through_the_checkpoint(tmp_path, tiny_task):
    from san.trainer import TrainOutcome

    _, trainer = _tiny_trainer(tmp_path, tiny_task, "trainer.model_ema=true", method="ssf")
    for step in range(2):
        trainer.train_step(*_batch(step))
    trainer._save_checkpoint(1, TrainOutcome())
    saved = [average.clone() for average in trainer.ema.average]
    _, fresh = _tiny_trainer(tmp_path, tiny_task, "trainer.model_ema=true", method="ssf")
    assert not all(torch.equal(a, b) for a, b in zip(fresh.ema.average, saved))
    epoch, _ = fresh._load_checkpoint()
    assert epoch == 1 and all(torch.equal(a, b) for a, b in zip(fresh.ema.average, saved))


# --- transforms ----------------------------------------------------------------------------


def test_recipe_transforms(tmp_path):
    image = Image.fromarray(_image_batch(1, size=64)[0].permute(1, 2, 0).numpy()).resize((80, 64))
    torch.manual_seed(0)
    train = build_transform("random_resized_crop_flip", 32, "bicubic", train=True)
    crops = [train(image) for _ in range(4)]
    assert all(c.shape == (3, 32, 32) and c.dtype == torch.uint8 for c in crops)
    assert not all(torch.equal(crops[0], c) for c in crops[1:])
    # evaluation as timm's eval transform with crop_pct 0.9: short side to floor(32 / 0.9) = 35, centre crop
    # (43 x 35, then torchvision's centre-crop offsets round((35 - 32) / 2) = 2 and round((43 - 32) / 2) = 6)
    expected = np.asarray(image.resize((43, 35), Image.BICUBIC))[2:34, 6:38]
    evaluated = build_transform("random_resized_crop_flip", 32, "bicubic", train=False)(image)
    assert (evaluated.permute(1, 2, 0).int() - torch.from_numpy(expected.copy()).int()).abs().max() <= 1
    assert torch.equal(build_transform("resize_center_crop_eval", 32, "bicubic", train=False)(image), evaluated)
    cached_train = build_transform("resize_center_crop_eval", 32, "bicubic", train=True)(image)
    assert torch.equal(cached_train, resize_transform(32, "bicubic", True)(image))
    assert is_deterministic("resize_center_crop_eval", train=True)
    assert not is_deterministic("random_resized_crop_flip", train=True)


# --- on a GPU (make test-gpu) --------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make test-gpu)")


@pytest.mark.gpu
@needs_cuda
def test_the_batch_augmentation_on_cuda_draws_what_the_cpu_draws():
    """Every random choice is drawn on the CPU, so the device changes only the arithmetic: the
    same seed gives the same boxes, ops and mixing on CUDA, up to a rounding step in a few pixels
    (erasing is left out: its noise comes from the device's generator)."""
    settings = dict(SAN_EARLY, random_erasing=0.0)
    augment = _augment(settings)
    images, labels = _image_batch(16), torch.arange(16) % 4
    torch.manual_seed(4)
    cpu_inputs, cpu_targets = augment(images, labels)
    torch.manual_seed(4)
    cuda_inputs, cuda_targets = augment(images.cuda(), labels.cuda())
    assert cuda_inputs.is_cuda and cuda_inputs.shape == cpu_inputs.shape
    assert torch.allclose(cuda_targets.cpu(), cpu_targets)
    off = (cuda_inputs.cpu() - cpu_inputs).abs() > 1.5 / 127.5
    assert off.float().mean() < 0.01


@pytest.mark.gpu
@needs_cuda
def test_an_augmented_ema_run_on_cuda(tmp_path, tiny_task):
    extra = ("augment=san_early", "trainer.model_ema=true", "trainer.label_smoothing=0.1", "method=ssf")
    record_path = run(compose_config(tiny_overrides(tmp_path, tiny_task, "trainer.device=cuda", *extra)))
    record = json.loads(record_path.read_text())
    assert record["status"] == "complete", record.get("error")
    assert record["cost"]["cached_on_device"]["fit"]  # the batch augmentation read the split on the GPU
    assert record["model_ema"]["evaluated_with"] == "ema"
    assert all(np.isfinite(row["train_loss"]) for row in record["metrics"]["per_epoch"])
