"""Every registered method trains through san-train on each tiny backbone it supports, and
fails with a named error on each it does not: the README's support matrix, executed."""

from __future__ import annotations

import pytest

from san.methods.base import UnsupportedBackboneError
from san.methods.registry import available_methods
from san.records import read_record
from san.run import run

from conftest import tiny_overrides

# (method, backbone config) pairs that must refuse; every other pair must train.
UNSUPPORTED = {
    ("vpt_shallow", "test_convnext"), ("vpt_deep", "test_convnext"),  # no token sequence
    ("san_lora", "test_convnext"),  # no qkv for the LoRA half
}


def test_every_registered_method_has_a_config(compose):
    for method in available_methods():
        assert compose([f"method={method}"]).method.name == method


@pytest.mark.parametrize("backbone", ["test_vit", "test_convnext"])
@pytest.mark.parametrize("method", available_methods())
def test_method_trains_or_refuses_by_name(tmp_path, tiny_task, compose, method, backbone):
    cfg = compose(tiny_overrides(tmp_path, tiny_task, f"method={method}", f"backbone={backbone}", "debug=fdr"))
    if (method, backbone) in UNSUPPORTED:
        with pytest.raises(UnsupportedBackboneError, match=method):
            run(cfg)
        return
    record = read_record(run(cfg))
    assert record["status"] == "complete" and record["method"]["name"] == method
    assert record["params"]["trainable"] > 0
