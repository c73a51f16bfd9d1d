"""`san-prepare weights` and loading from a seeded hub cache, with the hub unreachable or offline.

A hub cache is built in a temporary folder with the hub's own layout (refs/main ->
snapshots/<commit>/<file> -> blobs/<sha256>), holding a tiny safetensors file saved from
timm's `test_vit`, under the repo id that a pinned tag maps to.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from san.backbones import WeightsUnavailableError, create_backbone
from san.cli.weights import pinned_weights
from san.config import compose_config, config_dir

BIN = Path(sys.executable).parent
PINNED = {  # backbone config -> hub repo of its pinned arch.tag (what `make weights` fetches)
    "convnext_b_in22k": "timm/convnext_base.fb_in22k",
    "dinov2_vitb14": "timm/vit_base_patch14_dinov2.lvd142m",
    "swin_b_in22k": "timm/swin_base_patch4_window7_224.ms_in22k",
    "vit_b16_in21k": "timm/vit_base_patch16_224.orig_in21k",
    "vit_b16_in21k_augreg": "timm/vit_base_patch16_224.augreg_in21k",
}


def seed_hub_cache(hub: Path, repo_id: str, filename: str, data: bytes) -> Path:
    """Put `data` into a hub cache folder the way huggingface_hub stores a download."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(data).hexdigest()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit / filename
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    return snapshot


def tiny_vit_safetensors(tmp_path: Path) -> tuple[bytes, dict[str, torch.Tensor]]:
    state = timm.create_model("test_vit", img_size=32).state_dict()
    save_file(state, tmp_path / "model.safetensors")
    return (tmp_path / "model.safetensors").read_bytes(), state


def test_pinned_weights_are_the_real_pretrained_backbones():
    pinned = {w.backbone: w for w in pinned_weights(config_dir())}
    assert {name: w.repo_id for name, w in pinned.items()} == PINNED  # no test_*, no packaged EfficientNet
    for weights in pinned.values():
        assert weights.repo_id == f"timm/{weights.timm_name}"
        assert weights.filenames == ("model.safetensors", "pytorch_model.bin")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_san_prepare_weights_from_a_seeded_cache_and_with_the_hub_unreachable(tmp_path):
    data, _ = tiny_vit_safetensors(tmp_path)
    hf_home = tmp_path / "hf"
    snapshot = seed_hub_cache(hf_home / "hub", PINNED["vit_b16_in21k"], "model.safetensors", data)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HYDRA_FULL_ERROR"))}
    seeded = subprocess.Popen(
        [str(BIN / "san-prepare"), "weights", "--backbones", "vit_b16_in21k"],
        env={**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Not offline, but the endpoint refuses connections: the cache is checked, nothing is there.
    unreachable = subprocess.Popen(
        [str(BIN / "san-prepare"), "weights"],
        env={**env, "HF_HOME": str(tmp_path / "empty"), "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    stdout, stderr = seeded.communicate(timeout=300)
    assert seeded.returncode == 0, stderr
    line = next(line for line in stdout.splitlines() if line.startswith("OK"))
    assert "vit_b16_in21k" in line and f"sha256 {hashlib.sha256(data).hexdigest()}" in line
    assert str(snapshot) in line
    assert f"hub cache: {hf_home / 'hub'}" in stdout

    stdout, stderr = unreachable.communicate(timeout=300)
    assert unreachable.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert stdout.count("MISSING") == len(PINNED)
    assert f"san-prepare: error: {len(PINNED)} of {len(PINNED)} checkpoint(s) could not be fetched (the hub" in stderr
    assert "unreachable from here" in stderr and "Run `make weights`" in stderr and "HF_HUB_CACHE" in stderr


def test_backbone_loads_from_a_seeded_hub_cache_offline(tmp_path, monkeypatch):
    """The fix the weights error names (HF_HOME / HF_HUB_CACHE at a seeded copy) really loads through timm."""
    from huggingface_hub import constants

    data, state = tiny_vit_safetensors(tmp_path)
    hub = tmp_path / "hub"
    repo_id = timm.models.get_pretrained_cfg("test_vit").hf_hub_id
    seed_hub_cache(hub, repo_id, "model.safetensors", data)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))  # what HF_HUB_CACHE=<hub> sets at import
    cfg = OmegaConf.to_container(compose_config(["backbone=test_vit", "backbone.pretrained=true"]).backbone)
    model, weights = create_backbone(cfg, num_classes=3)
    assert weights.source == "timm_hub"
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WeightsUnavailableError) as error:
        create_backbone(cfg, num_classes=3)
    message = str(error.value)
    assert f"HF_HUB_OFFLINE=1 and the hub cache {tmp_path / 'empty'} does not hold {repo_id}" in message
    for fix in ("make weights", "HF_HOME (or HF_HUB_CACHE)", "backbone.checkpoint_path=", "backbone.pretrained=false"):
        assert fix in message


def test_only_tests_demo_and_bench_are_forced_offline():
    """`make vtab` and friends use the hub when it is reachable; the offline targets say so on their command line."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    root = Path(__file__).resolve().parents[1]

    def dry_run(*targets: str) -> str:
        return subprocess.run(
            ["make", "-n", "-C", str(root), *targets], capture_output=True, text=True, check=True, env=env
        ).stdout

    for target in ("vtab", "fgvc", "sweep", "weights"):
        assert "HF_HUB_OFFLINE" not in dry_run(target), target
    assert "san-prepare weights" in dry_run("weights")
    for target, command in (("test", "pytest"), ("demo", "san-sweep experiment=demo"), ("bench", "san-bench")):
        assert any(line.startswith("HF_HUB_OFFLINE=1 ") and command in line for line in dry_run(target).splitlines())
    probe = subprocess.run(
        [
            "make",
            "-C",
            str(root),
            "--no-print-directory",
            "--eval",
            'probe: ; @echo "$${HF_HUB_OFFLINE-unset}"',
            "probe",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    assert probe.strip() == "unset"  # nothing exports it to every recipe
