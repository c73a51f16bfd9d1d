"""Backbones: real weights offline, local checkpoints, and failing fast without weights."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image

from san.backbones import WeightsUnavailableError, create_backbone, data_config, file_sha256, tensors_sha256
from san.config import compose_config
from san.errors import ConfigError


def backbone_cfg(name: str, *overrides: str) -> dict:
    cfg = compose_config([f"backbone={name}", *overrides])
    return OmegaConf.to_container(cfg.backbone, resolve=True)


def test_effnet_lite0_real_weights_classify_china_jpg():
    """The packaged ImageNet weights load strictly and recognise a real photo."""
    from sklearn.datasets import load_sample_image

    model, weights = create_backbone(backbone_cfg("effnet_lite0"), num_classes=1000)
    assert weights.source == "efficientnet_lite0_package" and len(weights.file_sha256) == 64
    preprocessing = data_config(model, 224)
    assert preprocessing.mean == (0.5, 0.5, 0.5) and preprocessing.interpolation == "bicubic"
    image = Image.fromarray(load_sample_image("china.jpg")).resize((224, 224), Image.BICUBIC)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255
    pixels = (pixels - 0.5) / 0.5
    model.eval()
    with torch.no_grad():
        probabilities = model(pixels).softmax(-1)[0]
    top = set(probabilities.topk(3).indices.tolist())
    palace, bell_cote, church, monastery = 698, 442, 497, 663
    assert top & {palace, bell_cote, church, monastery}
    assert probabilities.max() > 0.2  # random weights give ~0.04


def test_effnet_head_is_replaced_for_a_new_task():
    model, _ = create_backbone(backbone_cfg("effnet_lite0"), num_classes=7)
    assert model.get_classifier().out_features == 7


def test_head_init_zeros_starts_at_the_uniform_prediction_with_the_same_backbone():
    timm_init, timm_weights = create_backbone(backbone_cfg("effnet_lite0"), num_classes=8)
    zeroed, zero_weights = create_backbone(backbone_cfg("effnet_lite0", "backbone.head_init=zeros"), num_classes=8)
    assert timm_init.get_classifier().weight.abs().sum() > 0  # timm's init: uniform weights (biases zero)
    assert all(torch.count_nonzero(p) == 0 for p in zeroed.get_classifier().parameters())
    assert zero_weights.sha256 == timm_weights.sha256  # the backbone's weights hash leaves the head out
    zeroed.eval()
    with torch.no_grad():
        probabilities = zeroed(torch.randn(2, 3, 64, 64)).softmax(-1)
    assert torch.allclose(probabilities, torch.full_like(probabilities, 1 / 8))


def test_unknown_head_init_lists_the_accepted_ones():
    with pytest.raises(ConfigError, match=r"accepted: \['timm', 'zeros'\]"):
        create_backbone(backbone_cfg("test_vit", "backbone.head_init=small"), num_classes=10)


def test_hub_weights_unavailable_fail_fast_with_advice():
    with pytest.raises(WeightsUnavailableError, match="backbone.checkpoint_path=") as error:
        create_backbone(backbone_cfg("test_vit", "backbone.pretrained=true"), num_classes=10)
    assert "backbone.pretrained=false" in str(error.value)


def test_local_checkpoint_loads_through_timm(tmp_path):
    source = timm.create_model("test_vit", img_size=32, num_classes=5)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model, weights = create_backbone(
        backbone_cfg("test_vit", "backbone.pretrained=true", f"backbone.checkpoint_path={path}"), num_classes=3
    )
    assert weights.source == "local_file" and weights.file_sha256 == file_sha256(path)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert model.get_classifier().out_features == 3
    head_ids = {id(p) for p in source.get_classifier().parameters()}
    assert weights.sha256 == tensors_sha256(source, head_ids)


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="nothing.pth"):
        create_backbone(
            backbone_cfg(
                "test_vit", "backbone.pretrained=true", f"backbone.checkpoint_path={tmp_path / 'nothing.pth'}"
            ),
            num_classes=3,
        )


def test_san_params_cli_prints_json_last_line():
    output = subprocess.run(
        [sys.executable, "-m", "san.cli.params", "backbone=test_vit", "method=bitfit"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    counts = json.loads(output.strip().splitlines()[-1])
    assert set(counts) == {"trainable", "trainable_without_head", "total"}
    assert counts["total"] > counts["trainable"] > counts["trainable_without_head"] > 0
