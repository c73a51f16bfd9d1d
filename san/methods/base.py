"""The method interface: a config dataclass and a model-level class.

A model-level class takes an unmodified timm model, adapts it in place (module
replacement or hooks, never a forked model file), freezes everything that is not the
method's, and knows how to merge back into a plain model of the original architecture.
Its trainable set is found structurally: the method's own layers plus the classifier
that timm's `get_classifier()` names, never by matching parameter-name substrings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping

import torch
from torch import nn

from san.errors import UserError


class NotMergeableError(UserError, RuntimeError):
    """The method adds computation that cannot be folded into the backbone's weights."""


class UnsupportedBackboneError(UserError, ValueError):
    """The method has no defined placement on this backbone's architecture."""


@dataclass
class MethodConfig:
    """Settings every method has."""

    train_head: bool = field(
        default=True,
        metadata={"help": "Train the classifier head (False only for probing the method alone)."},
    )
    update_batchnorm_stats: bool = field(
        default=False,
        metadata={
            "help": "Let BatchNorm running statistics move during training. Off for PEFT "
            "methods so that the frozen backbone really stays frozen."
        },
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class AdaptedModel:
    """Model-level class of a method. Subclasses set `config_class` and implement `_adapt`."""

    method_name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    mergeable: ClassVar[bool] = True

    def __init__(self, model: nn.Module, config: MethodConfig):
        self.model = model
        self.config = config
        self.head = model.get_classifier()
        device = next(model.parameters()).device
        self._adapt(model)
        # Method layers are created on the CPU; a model adapted after it was moved to a GPU
        # keeps every tensor on that GPU (a no-op for the tensors already there).
        model.to(device)
        trainable = {id(p) for p in self._method_parameters()}
        if config.train_head:
            trainable |= {id(p) for p in self.head.parameters()}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in trainable)

    # --- what subclasses provide -------------------------------------------------------
    def _adapt(self, model: nn.Module) -> None:
        """Insert the method's layers into `model`; the default inserts nothing."""

    def _method_parameters(self) -> Iterator[nn.Parameter]:
        """The method's own trainable parameters, found by walking its layers."""
        return iter(())

    def _no_weight_decay_parameters(self) -> Iterator[nn.Parameter]:
        """Method parameters that must not be decayed (scales, shifts, prompts)."""
        return iter(())

    def _merge_into(self, model: nn.Module) -> nn.Module:
        """Fold the method into `model` and return the plain model."""
        return model

    # --- training hooks (the trainer calls them; most methods need none) ----------------
    def on_fit_start(self, total_steps: int) -> None:
        """Called once before the first step with the run's total number of steps."""

    def regularization_loss(self) -> torch.Tensor | None:
        """A term added to the training loss (AdaLoRA's orthogonality penalty)."""
        return None

    def after_optimizer_step(self, step: int) -> None:
        """Called after every optimizer step, gradients still present (AdaLoRA's budget)."""

    def training_state(self) -> dict[str, Any]:
        """Method state that is not a tensor of the model but decides later steps (SNELLA's
        importance averages and allocation), saved in the run's checkpoint so a resumed run goes
        on as the uninterrupted one would: tensors and plain values only (the checkpoint loads
        with weights_only). Empty for methods whose state is all in their parameters."""
        return {}

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        """Restore `training_state()` after `on_fit_start` on resume."""

    def record_facts(self) -> dict[str, object]:
        """Facts about the trained method that only it knows (SNELL's density reached), stored
        as the record's `method.facts` after training; JSON values only."""
        return {}

    def build_optimizer(
        self, groups: list[dict[str, Any]], lr: float, optim: Mapping[str, Any]
    ) -> torch.optim.Optimizer | None:
        """The method's own optimizer, or None (the default) for the trainer's (`optim.name`).

        `groups` are the trainer's parameter groups (decayed and exempt tensors, each with its
        `weight_decay`), `lr` the effective learning rate (after `optim.lr_scaling`), `optim`
        the whole `optim` config. A method whose optimisation is the method (GaLore's
        projected gradients) splits the groups further and returns its optimizer; the
        trainer's schedule, clipping and checkpoints then drive it like its own."""
        return None

    # --- the shared interface ----------------------------------------------------------
    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def head_parameter_ids(self) -> set[int]:
        return {id(p) for p in self.head.parameters()}

    def no_weight_decay_ids(self) -> set[int]:
        """Parameters AdamW must not decay: every 1-D tensor (biases, norms, scales), the
        method's declared ones, and the backbone's own `no_weight_decay()` set."""
        ids = {id(p) for p in self._no_weight_decay_parameters()}
        ids |= {id(p) for p in self.model.parameters() if p.ndim <= 1}
        backbone_exempt = getattr(self.model, "no_weight_decay", lambda: set())()
        ids |= {id(p) for n, p in self.model.named_parameters() if n in backbone_exempt}
        return ids

    def parameter_counts(self) -> dict[str, int]:
        head_ids = self.head_parameter_ids()
        trainable = [p for _, p in self.named_trainable_parameters()]
        return {
            "trainable": sum(p.numel() for p in trainable),
            "trainable_without_head": sum(p.numel() for p in trainable if id(p) not in head_ids),
            "total": sum(p.numel() for p in self.model.parameters()),
        }

    def set_train_mode(self, training: bool) -> None:
        self.model.train(training)
        if training and not self.config.update_batchnorm_stats:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Return a plain model of the original architecture computing the same function."""
        if not self.mergeable:
            raise NotMergeableError(
                f"method {self.method_name!r} adds computation that cannot be folded into the "
                "backbone; evaluate it unmerged"
            )
        return self._merge_into(self.model)
