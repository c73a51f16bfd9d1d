"""CUDA paths: one `run()` per precision, torch.compile, channels_last convnets, the cached
split on the device, and merges computed on the device.

Marked `gpu` and skipped without CUDA (`make test-gpu` runs them on a GPU machine). They
use the tiny timm architectures, so they take seconds; the ViT-B/16 speed figures come
from `make bench`, not from here.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_overrides
from helpers import perturb_trainable, tiny_model, without_timings

from san.config import compose_config
from san.methods.registry import build_method
from san.run import run
from san.trainer import bf16_supported, resolve_precision

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make test-gpu)"),
]


def _gpu_run(tmp_path, task, *extra):
    record_path = run(compose_config(tiny_overrides(tmp_path, task, "trainer.device=cuda", "trainer.epochs=3", *extra)))
    record = json.loads(record_path.read_text())
    assert record["status"] == "complete", record.get("error")
    return record


@pytest.mark.parametrize(
    "precision, dtype", [("bf16", "torch.bfloat16"), ("fp16", "torch.float16"), ("fp32", "float32")]
)
@pytest.mark.parametrize("method", ["full", "ssf", "san", "lora"])
def test_run_on_cuda_in_each_precision(tmp_path, tiny_task, precision, dtype, method):
    record = _gpu_run(tmp_path, tiny_task, f"method={method}", f"trainer.precision={precision}")
    assert record["env"]["precision"] == dtype
    assert record["env"]["device"] == torch.cuda.get_device_name(0)
    history = record["metrics"]["per_epoch"]
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in history)
    assert record["cost"]["peak_mem_kind"] == "cuda_max_allocated" and record["cost"]["peak_mem_bytes"] > 0


def test_fp16_training_learns_with_its_gradient_scaler(tmp_path, tiny_task):
    """Without a scaler, fp16 gradients of a small loss underflow to zero; with it the loss falls."""
    record = _gpu_run(tmp_path, tiny_task, "method=full", "trainer.precision=fp16", "trainer.epochs=6")
    history = record["metrics"]["per_epoch"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_auto_precision_matches_the_device():
    device = torch.device("cuda")
    expected = torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    assert resolve_precision("auto", device) == expected
    assert bf16_supported(device) == (expected == torch.bfloat16)


def test_same_seed_same_result_on_cuda(tmp_path, tiny_task):
    """trainer.deterministic=true (the default) on CUDA: deterministic kernels, identical epochs."""
    first = _gpu_run(tmp_path / "a", tiny_task, "method=ssf", "trainer.precision=bf16")
    second = _gpu_run(tmp_path / "b", tiny_task, "method=ssf", "trainer.precision=bf16")

    assert without_timings(first["metrics"]["per_epoch"]) == without_timings(second["metrics"]["per_epoch"])


def test_compile_gives_the_uncompiled_result_without_recompiling_every_epoch(tmp_path, tiny_task):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = _gpu_run(
        tmp_path / "compiled",
        tiny_task,
        "method=ssf",
        "trainer.compile=true",
        "trainer.precision=fp32",
        "trainer.epochs=4",
    )
    # train (full batches + the last partial one) and eval (padded to one shape): a handful of
    # graphs, however many epochs run.
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < frames <= 6, dict(torch._dynamo.utils.counters["stats"])
    plain = _gpu_run(tmp_path / "plain", tiny_task, "method=ssf", "trainer.precision=fp32", "trainer.epochs=4")
    for a, b in zip(compiled["metrics"]["per_epoch"], plain["metrics"]["per_epoch"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3, abs=1e-4)
    final_compiled, final_plain = compiled["metrics"]["final"], plain["metrics"]["final"]
    assert final_compiled["val_top1"] == pytest.approx(final_plain["val_top1"], abs=100 / 8 + 1e-6)  # <= 1 image of 8


def stem_memory_formats(monkeypatch) -> list[tuple[bool, bool]]:
    """For every forward of the trained model's first conv: (input NHWC, weight NHWC), as seen
    at the conv itself rather than as the run's config says."""
    from san.trainer import Trainer

    seen: list[tuple[bool, bool]] = []
    original = Trainer.__init__

    def record(module, inputs):
        nhwc = torch.channels_last
        seen.append((inputs[0].is_contiguous(memory_format=nhwc), module.weight.is_contiguous(memory_format=nhwc)))

    def spying(self, adapted, *args, **kwargs):
        original(self, adapted, *args, **kwargs)
        stem = next(m for m in adapted.model.modules() if isinstance(m, torch.nn.Conv2d))
        stem.register_forward_pre_hook(record)

    monkeypatch.setattr(Trainer, "__init__", spying)
    return seen


def test_channels_last_convnet_trains_on_cuda(tmp_path, tiny_task, monkeypatch):
    seen = stem_memory_formats(monkeypatch)
    record = _gpu_run(tmp_path, tiny_task, "backbone=test_convnext", "method=ssf", "trainer.precision=bf16")
    assert record["config"]["backbone"]["channels_last"] is True
    assert record["metrics"]["final"]["val_top1"] >= 0
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in record["metrics"]["per_epoch"])
    # the config's flag reached the kernels: NHWC images into NHWC weights, every step
    assert seen and all(nhwc_input and nhwc_weight for nhwc_input, nhwc_weight in seen), seen[:3]


def test_cached_split_lives_on_the_device(tmp_path, tiny_task):
    from san.backbones import create_backbone, data_config
    from san.data.loaders import build_loader

    config = compose_config(tiny_overrides(tmp_path, tiny_task))
    model, _ = create_backbone(dict(config.backbone), 4)
    loader = build_loader(
        config.dataset,
        "train",
        data_config(model, 32),
        train=True,
        batch_size=8,
        num_workers=0,
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    loader.to_device(torch.device("cuda"))
    images, labels = next(iter(loader))
    assert images.is_cuda and labels.is_cuda and images.dtype == torch.uint8
    record = _gpu_run(tmp_path, tiny_task, "method=bitfit", "trainer.data_cache=true")
    assert record["status"] == "complete"


@pytest.mark.parametrize("method", ["ssf", "san", "san_early", "lora", "bitfit"])
def test_merge_on_the_device_equals_the_adapted_model(method):
    adapted = build_method(method, tiny_model("test_vit").cuda())
    perturb_trainable(adapted)  # every method tensor off its identity initialisation
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        expected = adapted.model.eval()(x)
        merged = adapted.merge()
        assert next(merged.parameters()).is_cuda
        assert torch.allclose(merged.eval()(x), expected, atol=1e-4, rtol=1e-4)
