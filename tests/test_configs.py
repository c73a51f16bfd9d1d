"""Every backbone x method x dataset composes, and names resolve to real things."""

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from san.config import compose_config, config_dir
from san.methods.registry import available_methods

GROUPS = Path(config_dir())


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (GROUPS / group).glob("*.yaml"))


def test_every_backbone_method_pair_and_every_dataset_composes():
    """Every backbone x method pair (whose quirks file may differ per pair), and every
    dataset under a rotating pair. Datasets share no defaults with backbones or methods,
    so this covers the product at a fraction of Hydra's compose cost."""
    backbones, methods, datasets = options("backbone"), options("method"), options("dataset")
    assert len(datasets) == 19 + 5 + 4
    pairs = list(itertools.product(backbones, methods))
    cases = [(b, m, datasets[i % len(datasets)]) for i, (b, m) in enumerate(pairs)]
    cases += [(*pairs[i % len(pairs)], d) for i, d in enumerate(datasets)]
    with initialize_config_dir(config_dir=str(GROUPS), version_base="1.3"):
        for backbone, method, dataset in cases:
            cfg = compose("config", [f"backbone={backbone}", f"method={method}", f"dataset={dataset}"])
            resolved = OmegaConf.to_container(cfg, resolve=True)
            assert (resolved["backbone"]["name"], resolved["method"]["name"], resolved["dataset"]["name"]) == (
                backbone, method, dataset)
            assert resolved["dataset"]["num_classes"] > 1
            assert Path(resolved["dataset"]["root"]).name in {"vtab-1k", "fgvc", "demo"}


def test_method_configs_match_registry():
    assert set(options("method")) <= set(available_methods())


def test_vtab_groups_and_class_counts():
    groups = {}
    for name in options("dataset"):
        cfg = compose_config([f"dataset={name}"]).dataset
        if cfg.suite == "vtab":
            groups.setdefault(cfg.group, []).append(name)
    assert {g: len(v) for g, v in groups.items()} == {"natural": 7, "specialized": 4, "structured": 8}
    assert compose_config(["dataset=sun397"]).dataset.num_classes == 397
    assert compose_config(["dataset=smallnorb_azi"]).dataset.num_classes == 18


@pytest.mark.parametrize("group", ["backbone", "method", "dataset"])
def test_unknown_name_lists_accepted(group):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as error:
        compose_config([f"{group}=no_such_thing"])
    assert options(group)[0] in str(error.value)


def test_backbones_pin_full_timm_tags():
    for name in options("backbone"):
        cfg = compose_config([f"backbone={name}"]).backbone
        if cfg.pretrained:
            assert "." in cfg.timm_name or cfg.weights != "timm_hub", name
    assert compose_config(["backbone=vit_b16_in21k"]).backbone.timm_name == "vit_base_patch16_224.orig_in21k"
