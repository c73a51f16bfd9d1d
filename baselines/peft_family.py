"""The LoRA family through Hugging Face `peft`: lora, dora, pissa, adalora, boft, ia3, vera.

peft injects its layers into the timm model in place (module replacement), so the model
keeps its class, its `get_classifier()` and its forward; the head stays a plain timm
module, trained directly (peft's `modules_to_save` would wrap it and rename its keys).
The trainable set is found structurally: the adapter tensors that each peft tuner layer
declares in `adapter_layer_names`. Merging is peft's `merge_and_unload()`, which returns
the plain timm model.

Targets. `target_modules: auto` picks, by structure: every attention `qkv` Linear when the
backbone has attention (ViT, DINOv2, Swin); otherwise every Linear but the head
(ConvNeXt's MLP); otherwise every non-grouped 1x1 Conv2d (EfficientNet's pointwise
convs). Depthwise convs are never targets: LoRA's rank must divide their groups, and a
low-rank update of a depthwise kernel costs more parameters than the kernel.
An explicit list of module-name suffixes, or a regex string, overrides it.

Fused qkv. timm fuses W_q, W_k, W_v into one Linear, so `lora` on `qkv` adapts q, k and v
(r=8: 294,912 parameters on ViT-B/16, the count the SSF/V-PETL tables print). The original
LoRA adapted W_q and W_v only; that needs the fused Linear split, which would change the
backbone's state dict, so it is not offered here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from san.methods.anatomy import attention_qkv
from san.methods.base import AdaptedModel, MethodConfig, UnsupportedBackboneError
from san.methods.peft_tuners import ADAPTER, adapter_parameters, tuner_layers
from san.methods.registry import register_method


def auto_targets(model: nn.Module) -> list[str]:
    attention = list(attention_qkv(model))
    if attention:
        return attention
    head_modules = {id(m) for m in model.get_classifier().modules()}
    named = [(n, m) for n, m in model.named_modules() if id(m) not in head_modules]
    linears = [n for n, m in named if isinstance(m, nn.Linear)]
    if linears:
        return linears
    return [n for n, m in named if isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size == (1, 1)]


@dataclass
class HFPeftConfig(MethodConfig):
    target_modules: Any = field(
        default="auto",
        metadata={
            "help": "'auto' (attention qkv; else Linear layers but the head; else 1x1 convs), a list of "
            "module-name suffixes, or a regex string matched against full module names."
        },
    )

    def peft_config(self, targets: list[str] | str):
        raise NotImplementedError


@dataclass
class LoraConfig(HFPeftConfig):
    rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    alpha: float = field(default=8, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})

    def _lora_kwargs(self) -> dict:
        return dict(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout)

    def peft_config(self, targets):
        import peft

        return peft.LoraConfig(target_modules=targets, **self._lora_kwargs())


@dataclass
class DoraConfig(LoraConfig):
    def peft_config(self, targets):
        import peft

        return peft.LoraConfig(target_modules=targets, use_dora=True, **self._lora_kwargs())


@dataclass
class PissaConfig(LoraConfig):
    init: str = field(
        default="pissa",
        metadata={
            "help": "'pissa' (exact SVD) or 'pissa_niter_<k>' (fast randomised SVD); the principal part "
            "moves from W into the adapter, so the initial function is unchanged."
        },
    )

    def peft_config(self, targets):
        import peft

        return peft.LoraConfig(target_modules=targets, init_lora_weights=self.init, **self._lora_kwargs())


@dataclass
class AdaLoraConfig(HFPeftConfig):
    init_rank: int = field(default=12, metadata={"help": "Initial rank of every SVD adapter."})
    target_rank: int = field(default=8, metadata={"help": "Average rank after budget allocation."})
    alpha: float = field(default=8, metadata={"help": "Scaling alpha."})
    warmup_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of training steps before ranks start being pruned (AdaLoRA's tinit)."}
    )
    final_fraction: float = field(
        default=0.2,
        metadata={"help": "Fraction of training steps at the end with the ranks frozen (AdaLoRA's tfinal)."},
    )
    delta_t: int = field(default=10, metadata={"help": "Steps between two budget allocations."})
    orth_reg_weight: float = field(default=0.5, metadata={"help": "Weight of the orthogonality regulariser."})

    def peft_config(self, targets):
        import peft

        # total_step is only known once the trainer has its data; on_fit_start sets it.
        return peft.AdaLoraConfig(
            target_modules=targets,
            init_r=self.init_rank,
            target_r=self.target_rank,
            lora_alpha=self.alpha,
            tinit=0,
            tfinal=0,
            deltaT=self.delta_t,
            total_step=1,
            orth_reg_weight=self.orth_reg_weight,
        )


@dataclass
class BoftConfig(HFPeftConfig):
    block_size: int = field(default=4, metadata={"help": "BOFT block size; must divide every target's input width."})
    butterfly_factor: int = field(default=1, metadata={"help": "Butterfly factor (1 = OFT)."})

    def peft_config(self, targets):
        import peft

        return peft.BOFTConfig(
            target_modules=targets, boft_block_size=self.block_size, boft_n_butterfly_factor=self.butterfly_factor
        )


@dataclass
class IA3Config(HFPeftConfig):
    feedforward_modules: Any = field(
        default="auto",
        metadata={
            "help": "Targets whose input (not output) is scaled, as (IA)^3 does for the MLP's second layer. "
            "'auto': the targets named fc2 (add them to the targets if missing)."
        },
    )

    def peft_config(self, targets):
        import peft

        feedforward = self.feedforward_modules
        if feedforward == "auto":
            if isinstance(targets, str):
                raise ValueError("ia3 with a regex target needs feedforward_modules set explicitly")
            feedforward = [t for t in targets if t.rsplit(".", 1)[-1] == "fc2"]
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward)


@dataclass
class VeraConfig(HFPeftConfig):
    rank: int = field(default=256, metadata={"help": "Rank of the shared frozen random projections."})
    seed: int = field(default=0, metadata={"help": "PRNG key of the shared random projections."})

    def peft_config(self, targets):
        import peft

        return peft.VeraConfig(target_modules=targets, r=self.rank, projection_prng_key=self.seed)


class HFPeftMethod(AdaptedModel):
    """A method implemented by a peft tuner, injected into the timm model in place."""

    config_class = HFPeftConfig

    def _targets(self, model: nn.Module) -> list[str] | str:
        chosen = self.config.target_modules
        if chosen == "auto":
            targets = auto_targets(model)
            if isinstance(self.config, IA3Config):
                targets = sorted(
                    set(targets)
                    | {
                        n
                        for n, m in model.named_modules()
                        if n.rsplit(".", 1)[-1] == "fc2" and isinstance(m, nn.Linear)
                    }
                )
            if not targets:
                raise UnsupportedBackboneError(
                    f"{self.method_name}: {type(model).__name__} has no qkv, Linear or 1x1 conv to adapt"
                )
            return targets
        return chosen if isinstance(chosen, str) else list(chosen)

    def _adapt(self, model: nn.Module) -> None:
        import peft

        targets = self._targets(model)
        try:
            self._tuner = peft.get_peft_model(model, self.config.peft_config(targets)).base_model
        except (ValueError, TypeError) as error:
            raise UnsupportedBackboneError(
                f"{self.method_name} cannot adapt {type(model).__name__} with targets "
                f"{targets if isinstance(targets, str) else targets[:4]}: {error}"
            ) from error
        self._tuner_layers = tuner_layers(model)

    def _method_parameters(self) -> Iterator[nn.Parameter]:
        return adapter_parameters(self._tuner_layers)

    def _merge_into(self, model: nn.Module) -> nn.Module:
        return self._tuner.merge_and_unload()


class AdaLoraMethod(HFPeftMethod):
    """AdaLoRA: the trainer drives its rank budget (on_fit_start, after_optimizer_step) and
    adds its orthogonality regulariser to the loss, which peft only does for models that
    return a `.loss`. The importance estimates are not checkpointed: a resumed run
    restarts them (the masked ranks themselves are in the checkpoint)."""

    config_class = AdaLoraConfig

    def on_fit_start(self, total_steps: int) -> None:
        peft_config = self._tuner.peft_config[ADAPTER]
        peft_config.total_step = total_steps
        peft_config.tinit = int(self.config.warmup_fraction * total_steps)
        peft_config.tfinal = int(self.config.final_fraction * total_steps)
        if peft_config.tinit >= total_steps - peft_config.tfinal:
            raise ValueError(
                f"adalora: {total_steps} steps leave no budgeting phase between warmup_fraction "
                f"{self.config.warmup_fraction} and final_fraction {self.config.final_fraction}"
            )

    def regularization_loss(self) -> torch.Tensor | None:
        """AdaLoRA's orthogonality penalty: mean over adapters of ||P P^T - I||_F for A and B."""
        terms = []
        for layer in self._tuner_layers:
            for name, product in (("lora_A", lambda p: p @ p.T), ("lora_B", lambda p: p.T @ p)):
                parameter = getattr(layer, name)[ADAPTER]
                covariance = product(parameter)
                terms.append(
                    torch.linalg.matrix_norm(
                        covariance - torch.eye(covariance.shape[0], device=covariance.device, dtype=covariance.dtype)
                    )
                )
        return self.config.orth_reg_weight * torch.stack(terms).mean() if terms else None

    def after_optimizer_step(self, step: int) -> None:
        self._tuner.update_and_allocate(step)


def _register(name: str, config_class: type[HFPeftConfig], base: type[HFPeftMethod] = HFPeftMethod) -> None:
    model_class = type(f"{name.capitalize()}Method", (base,), {"config_class": config_class, "__doc__": base.__doc__})
    register_method(name, model_class)


_register("lora", LoraConfig)
_register("dora", DoraConfig)
_register("pissa", PissaConfig)
_register("adalora", AdaLoraConfig, AdaLoraMethod)
_register("boft", BoftConfig)
_register("ia3", IA3Config)
_register("vera", VeraConfig)
