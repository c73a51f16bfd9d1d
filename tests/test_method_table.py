"""Every method, one flat table (as Hugging Face peft's `TEST_CASES`): one row per (method,
backbone, settings), and the contract tests that run over it.

A new method is one row here (its registered name on a tiny backbone it supports); a row
with `trainable` also pins its parameter count, on the full-size backbone (built on the
meta device: shapes only, no weights). The contract, per row:

- the trainable set is structural: the method's own tensors plus the classifier. The
  method's tensors come from an oracle that does not use the method's code (ORACLES: layer
  types, peft's tensor names; by default every tensor the method added to the model);
- at init the adapted model computes the backbone's function, where the row says it does
  (`identity`), and differs from it where it says it does not;
- one optimiser step moves only the trainable set, and moves the method's own tensors;
  BatchNorm statistics stay frozen except for full fine-tuning;
- merging a perturbed method gives the unmerged function in a plain model of the original
  class with the original state-dict keys, or NotMergeableError for methods that add
  computation;
- an unsupported (method, backbone) pair is an UnsupportedBackboneError naming the method
  and the architecture;
- each method option of the config (registered methods and named variants) trains through
  `san-train`'s function (`san.run.run`) and writes a complete record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import TINY_CLASSES, tiny_overrides
from helpers import (
    ADAPTFORMER,
    TINY_BACKBONES,
    head_names,
    images,
    meta_model,
    one_step,
    perturb_trainable,
    tiny_model,
    trainable_names,
)
from torch import nn

from san.config import group_options
from san.methods.base import NotMergeableError, UnsupportedBackboneError
from san.methods.registry import available_methods, build_method, method_config, method_settings
from san.methods.scaling import NormAffineScale, ScaledInput, ScaledOutput

# SSF/SAN's vectors start at exactly 1 and 0 with init_std 0 (the default, N(1, .02), is
# deliberately off the identity; the record test trains the default).
ZERO_INIT = {"init_std": 0.0}
# NOAH's Adapter (configs/method/adapter_noah.yaml)
ADAPTER_NOAH = {"placement": "sequential", "activation": "quick_gelu", "init": "xavier", "dim": 8}


@dataclass(frozen=True)
class Row:
    method: str  # the registered method
    backbone: str  # a config of configs/backbone/
    settings: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # the named variant (configs/method/<label>.yaml) these settings are
    trainable: int | None = None  # trainable parameters without the head, where a count is stated
    identity: bool = True  # the adapted model computes the backbone's function at init
    unsupported: bool = False  # the pair must be refused with UnsupportedBackboneError

    def __str__(self) -> str:
        extra = ",".join(
            f"{k}={v}" for k, v in self.settings.items() if not (self.label or (k, v) in ZERO_INIT.items())
        )
        return f"{self.label or self.method}-{self.backbone}" + (f"[{extra}]" if extra else "")


def refused(method: str, *backbones: str) -> list[Row]:
    return [Row(method, backbone, unsupported=True) for backbone in backbones]


TABLE: list[Row] = [
    # --- linear probing, full fine-tuning, BitFit -----------------------------------------
    Row("linear", "test_vit"),
    Row("linear", "test_convnext"),
    Row("linear", "test_swin"),
    Row("linear", "effnet_lite0"),
    Row("full", "test_vit"),
    Row("full", "test_convnext"),
    Row("full", "test_swin"),
    Row("full", "effnet_lite0"),
    Row("bitfit", "test_vit"),
    Row("bitfit", "test_convnext"),
    Row("bitfit", "test_swin"),
    Row("bitfit", "effnet_lite0"),
    # --- SSF and SAN (both readings) --------------------------------------------------------
    Row("ssf", "test_vit", ZERO_INIT),
    Row("ssf", "test_convnext", ZERO_INIT),
    Row("ssf", "test_swin", ZERO_INIT),
    Row("ssf", "effnet_lite0", ZERO_INIT),
    Row("san", "test_vit", ZERO_INIT),
    Row("san", "test_convnext", ZERO_INIT),
    Row("san", "test_swin", ZERO_INIT),
    Row("san", "effnet_lite0", ZERO_INIT),
    Row("san", "test_vit", {**ZERO_INIT, "recalibrate": True}),
    Row("san_early", "test_vit"),
    Row("san_early", "test_convnext"),
    Row("san_early", "test_swin"),
    *refused("san_early", "effnet_lite0"),  # reading B's positions are transformer ones
    Row("san_lora", "test_vit", ZERO_INIT),
    Row("san_lora", "test_vit", {**ZERO_INIT, "dora": True}),
    Row("san_lora", "test_swin", ZERO_INIT),
    *refused("san_lora", "test_convnext", "effnet_lite0"),  # no qkv for the LoRA half
    # --- the LoRA family through peft ------------------------------------------------------
    Row("lora", "test_vit"),
    Row("lora", "test_convnext"),
    Row("lora", "test_swin"),
    Row("lora", "effnet_lite0"),
    Row("dora", "test_vit"),
    Row("dora", "test_convnext"),
    Row("dora", "test_swin"),
    Row("dora", "effnet_lite0"),
    Row("pissa", "test_vit"),
    Row("pissa", "test_convnext"),
    Row("pissa", "test_swin"),
    *refused("pissa", "effnet_lite0"),  # peft's PiSSA init has no Conv2d path
    Row("adalora", "test_vit"),
    Row("adalora", "test_convnext"),
    Row("adalora", "test_swin"),
    Row("adalora", "effnet_lite0"),
    Row("boft", "test_vit"),
    Row("boft", "test_convnext"),
    Row("boft", "test_swin"),
    Row("boft", "effnet_lite0"),
    Row("ia3", "test_vit"),
    Row("ia3", "test_convnext"),
    Row("ia3", "test_swin"),
    Row("ia3", "effnet_lite0"),
    Row("vera", "test_vit"),
    Row("vera", "test_convnext"),
    Row("vera", "test_swin"),
    *refused("vera", "effnet_lite0"),  # VeRA adapts Linear layers only
    # --- NEAT -------------------------------------------------------------------------------
    # --- q,v-only LoRA on the fused qkv (V-PETL's ViT LoRA) -----------------------------------
    Row("lora_qv", "test_vit"),
    Row("lora_qv", "test_swin"),
    *refused("lora_qv", "test_convnext", "effnet_lite0"),  # no fused qkv attention
    Row("neat", "test_vit"),
    Row("neat", "test_swin"),
    *refused("neat", "test_convnext", "effnet_lite0"),  # no attention q and v
    # --- adapters and prompts (not mergeable) --------------------------------------------------
    Row("adapter", "test_vit"),
    Row("adapter", "test_convnext"),
    Row("adapter", "test_swin"),
    *refused("adapter", "effnet_lite0"),  # no transformer MLP
    Row("adapter", "test_vit", {"placement": "mlp_input", "scale": 0.1}),
    Row("adapter", "test_convnext", {"placement": "mlp_input", "scale": 0.1}),
    Row("adapter", "test_vit", ADAPTFORMER, label="adaptformer"),
    # NOAH's Adapter: Xavier-initialised up, so not the backbone's function at init
    Row("adapter", "test_vit", ADAPTER_NOAH, label="adapter_noah", identity=False),
    Row("adapter", "test_swin", ADAPTFORMER, label="adaptformer"),
    Row("adapter", "test_vit", {**ADAPTFORMER, "dim": 64}, label="adaptformer_64"),
    # AdaptFormer's branch reads a pre-norm block's residual stream; ConvNeXt's block has none
    Row("adapter", "test_convnext", ADAPTFORMER, label="adaptformer", unsupported=True),
    Row("adapter", "effnet_lite0", ADAPTFORMER, label="adaptformer", unsupported=True),
    # prompts are extra tokens: the output differs from the backbone's at init
    Row("vpt_shallow", "test_vit", identity=False),
    Row("vpt_deep", "test_vit", identity=False),
    # no token sequence (ConvNeXt, EfficientNet); Swin's windows need VPT's per-window variant
    *refused("vpt_shallow", "test_convnext", "test_swin", "effnet_lite0"),
    *refused("vpt_deep", "test_convnext", "test_swin", "effnet_lite0"),
    # --- stated counts on the full-size backbones (default settings) ------------------------
    # ViT-B/16 (vit_b16_in21k): 12 blocks of width 768, MLP 3072. "Published" marks a count
    # the papers' tables print (rounded there: 0.10 M, 0.29 M, 0.16 M; the method modules'
    # docstrings cite them); the others are the README's table (san-params), with their arithmetic.
    Row("linear", "vit_b16_in21k", trainable=0),
    Row("full", "vit_b16_in21k", trainable=85_798_656),  # every backbone tensor
    # published (BitFit in the VPT/SSF tables): every bias, LayerNorm shifts included
    Row("bitfit", "vit_b16_in21k", trainable=102_912),
    # SSF (Lian et al. 2022): gamma and beta after patch_embed, the six block positions and
    # the final norm: 2 x (768 + 12 x 8,448 + 768)
    Row("ssf", "vit_b16_in21k", trainable=205_824),
    Row("san", "vit_b16_in21k", trainable=205_824),  # reading A: SSF's vectors; propagation adds none
    # reading B: scales after patch_embed, qkv, proj, fc1, fc2 (768 + 12 x 6,912) and the
    # LayerNorm affines (12 x 3,072 + 1,536)
    Row("san_early", "vit_b16_in21k", trainable=122_112),
    Row("san_lora", "vit_b16_in21k", trainable=205_824 + 294_912),  # SAN's plus LoRA's on qkv
    # published (the SSF and V-PETL tables' LoRA): r = 8 on the fused qkv, 12 x 8 x (768 + 2,304)
    Row("lora", "vit_b16_in21k", trainable=294_912),
    Row("dora", "vit_b16_in21k", trainable=294_912 + 12 * 2_304),  # LoRA's plus a magnitude per qkv row
    Row("pissa", "vit_b16_in21k", trainable=294_912),  # LoRA's shapes, SVD initialisation
    Row("adalora", "vit_b16_in21k", trainable=442_512),  # initial rank 12: 12 x (12 x 3,072 + 12)
    Row("ia3", "vit_b16_in21k", trainable=64_512),  # a vector on qkv's outputs and fc2's inputs: 12 x (2,304 + 3,072)
    Row("vera", "vit_b16_in21k", trainable=30_720),  # lambda_d (r = 256) and lambda_b (2,304): 12 x 2,560
    Row("neat", "vit_b16_in21k", trainable=258_048),  # mode 1, r = 7 on q and v: 12 x 2 x (768 x 7 + 7 x 768)
    # published (AdaptFormer's 0.16 M): a dim-8 bottleneck with biases per block, 12 x 13,064
    Row("adapter", "vit_b16_in21k", trainable=156_768),
    # AdaptFormer's published 0.16 M row: 12 x (768 x 8 + 8 + 8 x 768 + 768)
    Row("adapter", "vit_b16_in21k", ADAPTFORMER, label="adaptformer", trainable=156_768),
    # the official default bottleneck (main_image.py --ffn_num 64): 12 x (768 x 64 + 64 + 64 x 768 + 768)
    Row("adapter", "vit_b16_in21k", {**ADAPTFORMER, "dim": 64}, label="adaptformer_64", trainable=1_189_632),
    Row("adapter", "vit_b16_in21k", ADAPTER_NOAH, label="adapter_noah", trainable=156_768),  # NOAH's 0.16 M
    Row("lora_qv", "vit_b16_in21k", trainable=294_912),  # r = 8 on q and v: 12 x 2 x (768 x 8 + 8 x 768)
    Row("vpt_shallow", "vit_b16_in21k", trainable=7_680),  # 10 prompts of width 768
    Row("vpt_deep", "vit_b16_in21k", trainable=92_160),  # 10 prompts per block
    # Swin-B and ConvNeXt-B (README's table): SSF's insertion points there; SAN adds no parameters
    Row("ssf", "swin_b_in22k", trainable=274_432),
    Row("san", "swin_b_in22k", trainable=274_432),
    Row("ssf", "convnext_b_in22k", trainable=260_608),
    Row("san", "convnext_b_in22k", trainable=260_608),
]
# BOFT has no full-size row: peft's BOFT initialisation reads tensor values (.item()), which
# the meta device does not have.

NOT_MERGEABLE = {"adapter", "vpt_shallow", "vpt_deep"}  # nonlinear bottlenecks; extra tokens
MOVES_BATCHNORM_STATISTICS = {"full"}  # every other method keeps the frozen backbone's statistics

SUPPORTED = [row for row in TABLE if not row.unsupported]
TINY = [row for row in SUPPORTED if row.backbone in TINY_BACKBONES]
REFUSED = [row for row in TABLE if row.unsupported]


# --- oracles: the method's trainable tensors, found without the method's own code ----------
# Each takes the adapted model and the ids of the plain model's parameters. A method with
# no entry gets `added_tensors`: everything it added to the model, which is right for a
# method that trains only its own new tensors (a new method needs no entry then).
PEFT_TENSORS = (
    "lora_A",
    "lora_B",
    "lora_E",
    "lora_magnitude_vector",
    "boft_R",
    "boft_s",
    "ia3_l",
    "vera_lambda_b",
    "vera_lambda_d",
)


def _names(model: nn.Module, keep) -> set[str]:
    return {name for name, parameter in model.named_parameters() if keep(name, parameter)}


def added_tensors(model: nn.Module, original: set[int]) -> set[str]:
    return _names(model, lambda name, p: id(p) not in original)


def scaling_vectors(model: nn.Module, original: set[int]) -> set[str]:
    """SSF/SAN's scale and shift vectors (and SAN's recalibration), by layer type."""
    ids = set()
    for module in model.modules():
        if isinstance(module, (ScaledOutput, NormAffineScale)):
            ids |= {id(module.gamma)} | ({id(module.beta)} if module.beta is not None else set())
        if isinstance(module, ScaledInput) and module.recalibration is not None:
            ids.add(id(module.recalibration))
    return _names(model, lambda name, p: id(p) in ids)


def layernorm_affines(model: nn.Module) -> set[str]:
    ids = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    return _names(model, lambda name, p: id(p) in ids)


def peft_tensors(model: nn.Module, original: set[int]) -> set[str]:
    """peft's trainable adapter tensors by name (AdaLoRA also adds a frozen `ranknum`)."""
    return _names(model, lambda name, p: any(part in name for part in PEFT_TENSORS))


ORACLES = {
    "linear": lambda model, original: set(),
    "full": lambda model, original: _names(model, lambda name, p: True),
    "bitfit": lambda model, original: _names(model, lambda name, p: name.endswith(".bias")),
    "ssf": scaling_vectors,
    "san": scaling_vectors,
    "san_early": lambda model, original: scaling_vectors(model, original) | layernorm_affines(model),
    "san_lora": lambda model, original: scaling_vectors(model, original) | peft_tensors(model, original),
    **{name: peft_tensors for name in ("lora", "dora", "pissa", "adalora", "boft", "ia3", "vera")},
    "neat": lambda model, original: _names(model, lambda name, p: ".networks." in name),
    "adapter": lambda model, original: _names(model, lambda name, p: ".adapter." in name),
    "vpt_shallow": lambda model, original: {"prompts.tokens"},
    "vpt_deep": lambda model, original: {"prompts.tokens"},
}


def build(row: Row, model: nn.Module | None = None):
    return build_method(row.method, model if model is not None else tiny_model(row.backbone), row.settings)


# --- the table itself -------------------------------------------------------------------------
def test_every_method_option_has_a_row():
    """A registered method or a named variant without a supported row on a tiny backbone
    would get none of the contract tests below."""
    covered = {row.label or row.method for row in TINY}
    assert set(group_options("method")) <= covered, "add a Row for each method to TABLE"
    assert {row.method for row in TABLE} <= set(available_methods())


@pytest.mark.parametrize("row", [row for row in TABLE if row.label and row.backbone == "test_vit"], ids=str)
def test_variant_rows_are_the_variant_files(compose, row):
    """A row labelled as a variant holds the settings its configs/method/<label>.yaml composes to."""
    composed = compose([f"method={row.label}"]).method
    assert (composed.name, composed.label) == (row.method, row.label)
    assert method_config(row.method, method_settings(composed)) == method_config(row.method, row.settings)


# --- the contract ----------------------------------------------------------------------------
@pytest.mark.parametrize("row", SUPPORTED, ids=str)
def test_trainable_set_is_the_methods_tensors_and_the_head(row):
    if row.backbone in TINY_BACKBONES:
        model = tiny_model(row.backbone)
        original = {id(p) for p in model.parameters()}
        adapted = build(row, model)
    else:
        with torch.device("meta"):  # the method's layers too: shapes only
            model = meta_model(row.backbone)
            original = {id(p) for p in model.parameters()}
            adapted = build(row, model)
    own = ORACLES.get(row.method, added_tensors)(adapted.model, original)
    head = head_names(adapted)
    assert head and (own or row.method == "linear"), "the oracle found nothing: the check would be empty"
    assert trainable_names(adapted) == own | head
    counts = adapted.parameter_counts()
    parameters = dict(adapted.model.named_parameters())
    assert counts["trainable_without_head"] == sum(parameters[name].numel() for name in own - head)
    if row.trainable is not None:
        assert counts["trainable_without_head"] == row.trainable


@pytest.mark.parametrize("row", TINY, ids=str)
def test_initial_function(row):
    x = images()
    with torch.no_grad():
        expected = tiny_model(row.backbone)(x)
    adapted = build(row)
    adapted.set_train_mode(False)
    with torch.no_grad():
        logits = adapted.model(x)
    assert logits.shape == expected.shape
    if row.identity:
        assert torch.allclose(logits, expected, atol=1e-4), "the initial function must be the backbone's"
    else:
        assert not torch.allclose(logits, expected, atol=1e-4), "the row says the method changes the function at init"


@pytest.mark.parametrize("row", TINY, ids=str)
def test_one_step_moves_only_the_trainable_set(row):
    adapted = build(row)
    changed, changed_buffers = one_step(adapted, images(4))
    head = head_names(adapted)
    assert changed <= trainable_names(adapted)
    assert changed & head, "the classifier must train"
    assert changed - head or row.method == "linear", f"{row.method}: its own tensors did not move"
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in adapted.model.modules())
    moves_statistics = has_batchnorm and row.method in MOVES_BATCHNORM_STATISTICS
    assert bool(changed_buffers) == moves_statistics, changed_buffers


@pytest.mark.parametrize("row", TINY, ids=str)
def test_merge_gives_the_unmerged_function_in_the_original_model(row):
    reference = tiny_model(row.backbone)
    shapes = {key: value.shape for key, value in reference.state_dict().items()}
    x = images()
    with torch.no_grad():
        expected = reference(x)
    adapted = build(row)
    if row.method in NOT_MERGEABLE:
        with pytest.raises(NotMergeableError, match=row.method):
            adapted.merge()
        return
    perturb_trainable(adapted)
    adapted.set_train_mode(False)
    with torch.no_grad():
        unmerged = adapted.model(x)
    assert not torch.allclose(unmerged, expected, atol=1e-3), "perturbing the method must change the function"
    merged = adapted.merge()
    assert type(merged) is type(reference)
    assert {key: value.shape for key, value in merged.state_dict().items()} == shapes
    leftover = {type(m).__name__ for m in merged.modules()} - {type(m).__name__ for m in reference.modules()}
    assert not leftover, f"merge left the method's layers in the model: {leftover}"
    with torch.no_grad():
        assert (merged(x) - unmerged).abs().max() <= 1e-4


@pytest.mark.parametrize("row", REFUSED, ids=str)
def test_unsupported_pair_is_a_named_error(row):
    with pytest.raises(UnsupportedBackboneError, match=row.method):
        build(row)


@pytest.mark.parametrize("row", REFUSED, ids=str)
def test_a_refusal_names_the_architecture(row):
    model = tiny_model(row.backbone)
    with pytest.raises(UnsupportedBackboneError) as error:
        build(row, model)
    assert type(model).__name__ in str(error.value)


# --- through san-train ---------------------------------------------------------------------
def _record_case(option: str) -> Row | None:
    rows = [row for row in TINY if (row.label or row.method) == option]
    return next((row for row in rows if row.backbone == "test_vit"), rows[0] if rows else None)


@pytest.mark.slow
@pytest.mark.parametrize("option", group_options("method"))
def test_each_method_option_trains_through_san_train(tmp_path, tiny_task, compose, option):
    """`method=<option>` (default settings) for one epoch on a tiny backbone it supports:
    a complete record, named as results name it, with the table's parameter counts."""
    from san.records import read_record
    from san.run import run

    row = _record_case(option)
    assert row is not None, f"method option {option!r} has no row in TABLE"
    cfg = compose(
        tiny_overrides(tmp_path, tiny_task, f"method={option}", f"backbone={row.backbone}", "trainer.epochs=1")
    )
    record = read_record(run(cfg))
    assert record["status"] == "complete", record.get("error")
    assert record["method"]["name"] == option and record["method"]["registered_name"] == row.method
    adapted = build_method(row.method, tiny_model(row.backbone, num_classes=TINY_CLASSES), row.settings)
    assert record["params"] == adapted.parameter_counts()
    (epoch,) = record["metrics"]["per_epoch"]
    assert epoch["train_loss"] > 0 and "val_top1" in record["metrics"]["final"]


def test_unsupported_pair_fails_through_san_train(tmp_path, tiny_task, compose):
    from san.run import run

    row = next(row for row in REFUSED if row.backbone == "test_convnext")
    cfg = compose(tiny_overrides(tmp_path, tiny_task, f"method={row.method}", f"backbone={row.backbone}"))
    with pytest.raises(UnsupportedBackboneError, match=row.method):
        run(cfg)


def test_san_params_counts_as_the_table(compose):
    """`san-params` composes the variant and counts what the table's row builds."""
    from san.cli.params import parameter_counts

    row = next(row for row in TINY if row.label == "adaptformer" and row.backbone == "test_vit")
    counts = parameter_counts([f"backbone={row.backbone}", f"method={row.label}"])
    num_classes = compose([]).dataset.num_classes
    assert counts == build(row, tiny_model(row.backbone, num_classes=num_classes)).parameter_counts()
