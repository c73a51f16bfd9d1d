"""Module surgery shared by every method: put a module where another sits, and fold
wrapper layers back into the modules they wrap. Adapting a timm model this way leaves
its class, forward and state-dict keys as timm wrote them (no forked model file)."""

from __future__ import annotations

from torch import nn


def replace_module(root: nn.Module, target: nn.Module, replacement: nn.Module) -> None:
    """Put `replacement` where `target` sits in `root`."""
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is target:
                setattr(parent, name, replacement)
                return
    raise KeyError(f"{type(target).__name__} is not a submodule")


def fold_wrappers(model: nn.Module, kind: type) -> None:
    """Replace every `kind` wrapper in `model` by its `folded()` module, outermost first."""
    while True:
        wrapper = next((m for m in model.modules() if isinstance(m, kind)), None)
        if wrapper is None:
            return
        replace_module(model, wrapper, wrapper.folded())
