"""VPT's token handling and the adapters' placement, beyond the method table
(tests/test_method_table.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import ADAPTFORMER, perturb_trainable, tiny_model
from torch import nn

from san.methods.registry import build_method


def _token_counts(model: nn.Module, modules: list[nn.Module]) -> list[int]:
    """The sequence length each module receives in one forward."""
    lengths = []
    hooks = [m.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1])) for m in modules]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    return lengths


@pytest.mark.parametrize("method", ["vpt_shallow", "vpt_deep"])
def test_vpt_prompts_every_block_and_drops_them_before_the_norm(method):
    model = tiny_model("test_vit")
    adapted = build_method(method, model, {"length": 3})
    tokens = 1 + (32 // model.patch_embed.patch_size[0]) ** 2
    # the method's own hooks run first, so every block sees prefix + prompts + patches, and
    # the final norm (and pooling, and the head) the sequence the model was built for
    lengths = _token_counts(adapted.model, [*model.blocks, model.norm])
    assert lengths == [tokens + 3] * len(model.blocks) + [tokens]
    sets = len(model.blocks) if method == "vpt_deep" else 1
    assert model.prompts.tokens.shape == (sets, 3, model.embed_dim)


def test_vpt_deep_replaces_the_previous_blocks_prompts():
    """Each block's prompt outputs are discarded: only the last set reaches the last block."""
    adapted = build_method("vpt_deep", tiny_model("test_vit"), {"length": 4})
    x = torch.randn(2, 3, 32, 32)
    last = adapted.model.blocks[-1]
    seen = []
    hook = last.register_forward_pre_hook(lambda m, a: seen.append(a[0][:, 1:5].clone()))
    with torch.no_grad():
        adapted.model(x)
        adapted.model.prompts.tokens[:-1].mul_(2)  # every set but the last block's
        adapted.model(x)
    hook.remove()
    assert torch.equal(seen[0], seen[1])
    assert torch.allclose(seen[0][0], adapted.model.prompts.tokens[-1])


def test_vpt_shallow_prompts_reach_the_output_only_through_attention():
    adapted = build_method("vpt_shallow", tiny_model("test_vit"), {"length": 4})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = adapted.model(x)
        adapted.model.prompts.tokens.mul_(2)
        second = adapted.model(x)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("settings", [{}, ADAPTFORMER], ids=["adapter", "adaptformer"])
def test_adapter_reads_the_mlps_output_or_in_parallel_its_input(settings):
    """Sequential: h = MLP(u), out = h + s * up(act(down(h))); parallel (AdaptFormer):
    out = MLP(u) + s * up(act(down(u)))."""
    adapted = build_method("adapter", tiny_model("test_vit"), settings)
    perturb_trainable(adapted, scale=0.3)
    wrapped = adapted.model.blocks[0].mlp
    mlp, adapter = wrapped.mlp, wrapped.adapter
    u = torch.randn(2, 5, adapted.model.embed_dim)
    with torch.no_grad():
        h = mlp(u)
        source = u if settings.get("parallel") else h
        expected = h + settings.get("scale", 1.0) * adapter.up(torch.relu(adapter.down(source)))
        assert torch.allclose(wrapped(u), expected, atol=1e-6)
        assert not torch.allclose(wrapped(u), h, atol=1e-4)
