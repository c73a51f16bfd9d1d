"""The method interface beyond the contract of tests/test_method_table.py: the registry's
errors, weight-decay exemptions, and a merge that has nothing to fold."""

from __future__ import annotations

import pytest
from helpers import tiny_model

from san.errors import ConfigError
from san.methods.registry import UnknownMethodError, available_methods, build_method


def test_no_weight_decay_covers_1d_and_backbone_exemptions():
    adapted = build_method("full", tiny_model("test_vit"))
    exempt = adapted.no_weight_decay_ids()
    assert id(adapted.model.cls_token) in exempt and id(adapted.model.pos_embed) in exempt
    assert id(adapted.model.blocks[0].norm1.weight) in exempt
    assert id(adapted.model.blocks[0].attn.qkv.weight) not in exempt


def test_method_vectors_are_exempt_from_weight_decay_and_lora_matrices_are_not():
    ssf = build_method("ssf", tiny_model("test_vit"))
    assert {id(s.gamma) for s in ssf.scales} <= ssf.no_weight_decay_ids()
    lora = build_method("lora", tiny_model("test_vit"))
    matrices = {id(p) for n, p in lora.named_trainable_parameters() if "lora_" in n}
    assert matrices and not matrices & lora.no_weight_decay_ids()


def test_linear_probe_merges_to_the_model_itself():
    adapted = build_method("linear", tiny_model("test_convnext"))
    assert adapted.merge() is adapted.model


def test_unknown_method_and_setting_list_accepted():
    with pytest.raises(UnknownMethodError, match="accepted: .*bitfit"):
        build_method("nope", tiny_model("test_vit"))
    with pytest.raises(ConfigError, match="accepted: .*train_head"):
        build_method("linear", tiny_model("test_vit"), {"rank": 4})
    with pytest.raises(ConfigError, match="method 'san': unknown position preset 'nowhere'; accepted"):
        build_method("san", tiny_model("test_vit"), {"positions": "nowhere"})
    assert {"linear", "full", "bitfit"} <= set(available_methods())
