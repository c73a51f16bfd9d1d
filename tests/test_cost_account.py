"""The dry-run's cost account: its JSON line, hand-computed totals, split sizes and FLOP counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TWO_POINT_GRID, meta_model
from omegaconf import OmegaConf

from san.cli.params import parameter_counts
from san.cli.sweep import main as sweep_main
from san.config import compose_config, config_dir
from san.efficiency import flops_per_image
from san.identity import resolved
from san.protocol.costs import CHECKPOINT_BYTES_PER_TRAINABLE, checkpoint_writes, evaluations
from san.protocol.model_costs import REFERENCE_CLASSES, ModelCosts, _count, measure
from san.protocol.split_sizes import role_size
from san.protocol.sweep import dry_run_report

# Pinned so the hand computation below holds whatever the trainer defaults become: one
# checkpoint per run (a demo run is far shorter than 5 minutes).
CHECKPOINT_POLICY = ["++trainer.checkpoint_every_minutes=5", "++trainer.checkpoint_every_epochs=null"]
DEMO_LINEAR = ["experiment=demo", *TWO_POINT_GRID, "method=linear", "dataset=demo_digits", *CHECKPOINT_POLICY]


def test_dry_run_prints_the_account_as_its_last_line_with_hand_computed_totals(capsys):
    assert sweep_main([*DEMO_LINEAR, "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    account = json.loads(lines[-1])
    assert lines[0] == "cells: 1, tune_runs: 2, final_runs: 2, total_runs: 4"
    for field in (
        "runs",
        "train_image_steps",
        "eval_image_forwards",
        "checkpoint_bytes",
        "overhead_ratio",
        "predicted_h100_hours",
        "mfu",
        "peak_flops_per_s",
        "assumptions",
        "per_method",
        "per_stage",
    ):
        assert field in account, field
    assert account["runs"] == 4
    assert account["per_stage"]["tune"]["runs"] == 2 and account["per_stage"]["final"]["runs"] == 2
    # demo: 3 epochs, 2 grid points (tune, seed 0), 2 seeds (final).
    # tune: 2 runs x 3 epochs x train800; final: 2 runs x 3 epochs x train800val200.
    assert account["train_image_steps"] == 2 * 3 * 800 + 2 * 3 * 1000
    # One evaluation per run (trainer.eval_every 0): val200 twice, the digits test split
    # (1,797 - 1,000 images) twice.
    assert account["eval_image_forwards"] == 2 * 200 + 2 * 797
    # Linear probing trains the head only: (1280 features + bias) x 10 classes, one write per run.
    assert account["checkpoint_bytes"] == 4 * 12 * (1280 + 1) * 10


def test_account_fields_are_consistent():
    methods = "plan.methods=[linear,bitfit,san,full]"
    _, account = dry_run_report(["experiment=demo", "plan.tasks=[demo_shape_loc]", methods, *CHECKPOINT_POLICY])
    train, evaluation = account["train_flops"], account["eval_flops"]
    assert account["overhead_ratio"] == pytest.approx((train + evaluation) / train, abs=1e-4)
    assert account["predicted_h100_hours"] == pytest.approx(
        (train + evaluation) / (account["mfu"] * account["peak_flops_per_s"]) / 3600, abs=0.01
    )
    assert sorted(account["per_method"]) == ["bitfit", "full", "linear", "san"]
    for field in ("runs", "train_image_steps", "eval_image_forwards", "checkpoint_bytes"):
        assert sum(m[field] for m in account["per_method"].values()) == pytest.approx(account[field], abs=2)
        assert sum(s[field] for s in account["per_stage"].values()) == pytest.approx(account[field], abs=2)
    # Full fine-tuning computes weight gradients; linear probing does not go backward through the backbone.
    per_method = account["per_method"]
    assert per_method["full"]["train_gflops_per_image"] > 2.5 * per_method["full"]["forward_gflops_per_image"]
    assert per_method["linear"]["train_gflops_per_image"] < 1.1 * per_method["linear"]["forward_gflops_per_image"]


def test_vtab_san_overhead_with_one_evaluation_per_run():
    # The configs' own policy (trainer.eval_every: 0): tune runs read val once, final runs test once.
    counts, account = dry_run_report(["experiment=vtab", "method=san"])
    assert account["runs"] == counts["total_runs"] == 19 * 11
    assert account["train_image_steps"] == 19 * 8 * 110 * 800 + 19 * 3 * 110 * 1000
    # val200 once per tune run; the 19 test splits (387,904 images, tfds catalogue) once per seed.
    assert account["eval_image_forwards"] == 19 * 8 * 200 + 3 * 387_904
    assert account["overhead_ratio"] <= 1.10
    assert account["counted_at_planning"] == 0  # ViT-B/16 x SAN is in the stored table


def test_evaluation_and_checkpoint_rules():
    assert evaluations({"epochs": 110, "eval_every": 10}) == 11
    assert evaluations({"epochs": 10, "eval_every": 3}) == 4  # 3, 6, 9 and the last
    assert evaluations({"epochs": 110, "eval_every": 0}) == evaluations({"epochs": 5, "eval_every": None}) == 1
    assert checkpoint_writes({"epochs": 100}, 60.0)[0] == 100
    assert checkpoint_writes({"epochs": 100, "checkpoint_every_minutes": 5}, 22.0)[0] == 4
    assert checkpoint_writes({"epochs": 100, "checkpoint_every_minutes": 5}, 0.3)[0] == 1
    assert checkpoint_writes({"epochs": 100, "checkpoint_every_epochs": 25, "checkpoint_every_minutes": 5}, 1)[0] == 4
    assert CHECKPOINT_BYTES_PER_TRAINABLE == 12


def _dataset(name: str) -> dict:
    """A dataset config merged onto its dataset_base, as its defaults list says (no composition:
    28 of them would take seconds)."""
    own = OmegaConf.load(Path(config_dir(), "dataset", f"{name}.yaml"))
    base = OmegaConf.load(Path(config_dir(), own.defaults[0].split("@")[0].lstrip("/") + ".yaml"))
    del own["defaults"]
    return OmegaConf.to_container(OmegaConf.merge(base, own))


def test_split_sizes_come_from_the_stated_tables():
    assert role_size(_dataset("dsprites_loc"), "test") == 737_280 - 663_552
    assert role_size(_dataset("eurosat"), "test") == 5_400  # train[80%:] of 27,000
    assert role_size(_dataset("smallnorb_ele"), "test") == 12_150
    assert role_size(_dataset("cifar"), "trainval") == 1_000
    assert role_size(_dataset("cub"), "trainval") == 5_994  # VPT's train + val = the official train split
    assert role_size(_dataset("demo_shape_ori"), "test") == 500
    assert role_size(compose_config(["dataset=cub"]).dataset, "trainval") == 5_994  # as composed
    protocols = [OmegaConf.load(p) for p in Path(config_dir(), "protocol").glob("*.yaml")]
    for path in Path(config_dir(), "dataset").glob("*.yaml"):
        dataset = _dataset(path.stem)
        if dataset.get("evaluation_only"):  # ImageNet-A/R/C: a model fitted elsewhere is tested here
            assert all(role_size(dataset, role) > 0 for role in dataset.get("expected_counts") or {})
            continue
        for protocol in protocols:
            assert role_size(dataset, protocol.fit) > 0 and role_size(dataset, protocol.evaluate) > 0


@pytest.mark.parametrize("method", ["san", "lora"])  # own layers; peft's, on the meta device too
def test_counts_on_the_meta_device_equal_real_weights_and_the_suites_counter(method):
    config = resolved(compose_config(["backbone=test_vit", f"method={method}", "dataset=demo_digits"]))
    meta = _count(config["backbone"], config["method"], "meta")
    assert meta == {**_count(config["backbone"], config["method"], "cpu"), "counted_on": "meta"}
    # The table counts a REFERENCE_CLASSES-way head (its share of the FLOPs is negligible).
    assert meta["forward_flops"] == flops_per_image(
        {**config, "dataset": {**config["dataset"], "num_classes": REFERENCE_CLASSES}}
    )
    params = parameter_counts(["backbone=test_vit", f"method={method}", "dataset=demo_digits"])
    assert meta["trainable_without_head"] == params["trainable_without_head"]
    assert meta["trainable_without_head"] + meta["head_params_per_class"] * 10 == params["trainable"]


def test_depthwise_convs_train_at_three_forwards_not_forty():
    # torch's own counter charges a depthwise conv's weight gradient as a dense conv's.
    config = resolved(compose_config(["backbone=test_convnext", "method=full"]))
    counted = _count(config["backbone"], config["method"], "meta")
    assert 2.9 < counted["train_flops"] / counted["forward_flops"] < 3.1
    stored = [e for e in ModelCosts().entries.values() if e["backbone"] == "effnet_lite0" and e["method"] == "full"]
    assert stored and all(2.9 < e["train_flops"] / e["forward_flops"] < 3.1 for e in stored)


def test_stored_table_holds_the_readme_parameter_counts():
    # If this fails after a method config changed, refresh the table:
    #   python -m san.protocol.model_costs experiment=vtab dataset=cifar
    costs = ModelCosts()
    vit = OmegaConf.to_container(OmegaConf.load(Path(config_dir(), "backbone", "vit_b16_in21k.yaml")))
    # ViT-B/16: 12 blocks of width 768, MLP 3,072; README's table, by its arithmetic.
    depth, width, mlp = 12, 768, 3_072
    block_outputs = width + 3 * width + width + width + mlp + width  # norm1, qkv, proj, norm2, fc1, fc2
    every_bias = width + depth * block_outputs + width  # patch_embed, the blocks, the final norm
    backbone = sum(p.numel() for n, p in meta_model("vit_b16_in21k").named_parameters() if not n.startswith("head."))
    expected = {
        "san": 2 * every_bias,  # SSF's gamma and beta; propagation adds none
        "ssf": 2 * every_bias,
        "bitfit": every_bias,
        "lora": depth * 8 * (width + 3 * width),  # r = 8 on the fused qkv
        "vpt_deep": depth * 10 * width,  # 10 prompts per block
        "adapter": depth * (width * 8 + 8 + 8 * width + width),  # dim-8 bottleneck with biases
        "full": backbone,
        "linear": 0,
    }
    assert expected["ssf"] == 205_824 and expected["full"] == 85_798_656  # README's printed counts
    entries = {method: costs.get(vit, resolved(compose_config([f"method={method}"]))["method"]) for method in expected}
    assert {m: e["trainable_without_head"] for m, e in entries.items()} == expected
    assert costs.counted_now == []
    # ViT-B/16 at 224, counted with fused attention off (san/efficiency.py): 35.1 GFLOPs.
    assert round(entries["linear"]["forward_flops"] / 1e9, 1) == 35.1


def test_an_unsupported_pair_is_named_not_counted():
    config = resolved(compose_config(["backbone=test_convnext", "method=vpt_deep"]))
    assert "unsupported" in measure(config["backbone"], config["method"])
