"""Every backbone x method x dataset composes, names resolve to real things, and the config
groups hold what the spec tables (and the method registry) say they hold."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from san.config import compose_config, config_dir, group_options, prepare_config_store
from san.data import demo_suite, fgvc_sources, vtab_spec
from san.methods.registry import available_methods, method_label

GROUPS = Path(config_dir())
DATA_ROOTS = {"vtab": "vtab-1k", "fgvc": "fgvc", "demo": "demo", "gic": "gic"}
# VTAB-1K's groups (Zhai et al. 2019): the benchmark's definition, not a count of files.
VTAB_GROUPS = {"natural": 7, "specialized": 4, "structured": 8}


def yaml_options(group: str) -> list[str]:
    return sorted(p.stem for p in (GROUPS / group).glob("*.yaml"))


def quirk_pairs() -> set[tuple[str, str]]:
    """The (backbone, method) pairs with a quirks file, configs/backbone_method/<backbone>_<method>.yaml."""
    backbones, methods = group_options("backbone"), group_options("method")
    files = set(yaml_options("backbone_method"))
    return {(b, m) for b in backbones for m in methods if f"{b}_{m}" in files}


@pytest.fixture(scope="module")
def composed() -> dict[tuple[str, str, str], dict]:
    """Every backbone, every method option (the registered methods and the named variants) and
    every dataset, each at least once, in rotation, plus every pair that has a quirks file.
    The groups share no defaults: what a backbone x method pair composes to differs from its
    parts only through its quirks file (the root defaults list's `optional backbone_method`),
    so this covers the product at a tenth of Hydra's compose cost."""
    backbones, methods, datasets = group_options("backbone"), group_options("method"), group_options("dataset")
    width = max(len(backbones), len(methods), len(datasets))
    cases = {
        (backbones[i % len(backbones)], methods[i % len(methods)], datasets[i % len(datasets)]) for i in range(width)
    }
    cases |= {(b, m, datasets[0]) for b, m in quirk_pairs()}
    prepare_config_store()
    results = {}
    with initialize_config_dir(config_dir=str(GROUPS), version_base="1.3"):
        for backbone, method, dataset in sorted(cases):
            cfg = compose("config", [f"backbone={backbone}", f"method={method}", f"dataset={dataset}"])
            results[backbone, method, dataset] = OmegaConf.to_container(cfg, resolve=True)
    return results


def test_every_backbone_method_and_dataset_composes(composed):
    options = {group: set(group_options(group)) for group in ("backbone", "method", "dataset")}
    assert {b for b, _, _ in composed} == options["backbone"]
    assert {m for _, m, _ in composed} == options["method"]
    assert {d for _, _, d in composed} == options["dataset"]
    assert quirk_pairs() <= {(b, m) for b, m, _ in composed}
    for (backbone, method, dataset), resolved in composed.items():
        assert (resolved["backbone"]["name"], method_label(resolved["method"]), resolved["dataset"]["name"]) == (
            backbone,
            method,
            dataset,
        )
        assert resolved["method"]["name"] in available_methods()
        assert resolved["dataset"]["num_classes"] > 1
        assert Path(resolved["dataset"]["root"]).name == DATA_ROOTS[resolved["dataset"]["suite"]]


def test_a_quirks_file_reaches_its_pair_only(tmp_path):
    """The mechanism the rotation relies on: configs/backbone_method/<backbone>_<method>.yaml
    changes that pair's composition and no other's."""
    quirk = tmp_path / "backbone_method"
    quirk.mkdir()
    (quirk / "test_vit_ssf.yaml").write_text("# @package _global_\ntrainer:\n  epochs: 7\n")
    prepare_config_store()
    with initialize_config_dir(config_dir=str(GROUPS), version_base="1.3"):
        extra = [f"hydra.searchpath=[file://{tmp_path}]"]
        pair = compose("config", ["backbone=test_vit", "method=ssf", *extra])
        other_method = compose("config", ["backbone=test_vit", "method=bitfit", *extra])
        other_backbone = compose("config", ["backbone=test_convnext", "method=ssf", *extra])
    assert pair.trainer.epochs == 7
    assert other_method.trainer.epochs != 7 and other_backbone.trainer.epochs != 7


def test_method_group_is_the_registry_plus_named_variants(composed):
    """`method=<registered>` comes from the method's dataclass (no YAML repeating its
    defaults); each configs/method/*.yaml is a variant: another name for a registered method."""
    variants = yaml_options("method")
    assert set(group_options("method")) == set(available_methods()) | set(variants)
    assert not set(variants) & set(available_methods()), "a YAML named as a registered method would shadow it"
    methods = {m: resolved["method"] for (_, m, _), resolved in composed.items()}
    for name in available_methods():
        assert methods[name]["name"] == name and methods[name]["label"] is None
    for variant in variants:
        assert methods[variant]["label"] == variant and methods[variant]["name"] in available_methods()
    keys = ("name", "label", "placement", "scale", "dropout", "dim")
    assert {k: methods["adaptformer"][k] for k in keys} == {
        "name": "adapter",
        "label": "adaptformer",
        "placement": "residual_stream",
        "scale": 0.1,
        "dropout": 0.1,
        "dim": 8,
    }
    assert methods["adaptformer_64"]["dim"] == 64 and methods["adaptformer_64"]["placement"] == "residual_stream"


def test_datasets_are_the_spec_tables(composed):
    """Each suite's configs are its spec table's tasks, with the table's class counts."""
    datasets = {d: resolved["dataset"] for (_, _, d), resolved in composed.items()}
    by_suite: dict[str, dict[str, dict]] = {}
    for name, dataset in datasets.items():
        by_suite.setdefault(dataset["suite"], {})[name] = dataset
    assert set(by_suite) == set(DATA_ROOTS)
    vtab, fgvc, demo = by_suite["vtab"], by_suite["fgvc"], by_suite["demo"]
    assert {name: d["num_classes"] for name, d in vtab.items()} == {
        name: spec.num_classes for name, spec in vtab_spec.TASKS.items()
    }
    assert {name: d["num_classes"] for name, d in fgvc.items()} == {
        name: spec.num_classes for name, spec in fgvc_sources.SPECS.items()
    }
    assert {d["folder"]: d["num_classes"] for d in demo.values()} == {
        task: classes for task, (_, classes, _) in demo_suite.TASKS.items()
    }
    groups = {}
    for name, dataset in vtab.items():
        groups.setdefault(dataset["group"], []).append(name)
    assert {group: len(names) for group, names in groups.items()} == VTAB_GROUPS


@pytest.mark.parametrize("group", ["backbone", "method", "dataset"])
def test_unknown_name_lists_accepted(group):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as error:
        compose_config([f"{group}=no_such_thing"])
    assert set(group_options(group)) <= set(error.value.options)


def test_backbones_pin_full_timm_tags(composed):
    backbones = {b: resolved["backbone"] for (b, _, _), resolved in composed.items()}
    for name, cfg in backbones.items():
        if cfg["pretrained"]:
            assert "." in cfg["timm_name"] or cfg["weights"] != "timm_hub", name
    assert backbones["vit_b16_in21k"]["timm_name"] == "vit_base_patch16_224.orig_in21k"
