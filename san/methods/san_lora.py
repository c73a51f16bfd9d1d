"""SAN x LoRA: SAN's neurons and synapses and a LoRA (or DoRA) update on the same weights.

The ICML version of SAN says it composes with LoRA/DoRA. Here SAN adapts the model first
(scales wrap the layers, propagated scales wrap their inputs), then peft injects LoRA
into the innermost Linear layers at `lora_positions`. A propagated layer whose base is a
LoRA layer scales its input, so the block computes s_out * ((W0 + BA) diag(s_in) x) + b.
Merging folds LoRA first (peft's merge_and_unload: W0 + BA) and then SAN's scales, and
returns the plain timm model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from san.methods.base import UnsupportedBackboneError
from san.methods.peft_tuners import adapter_parameters, tuner_layers
from san.methods.registry import register_method
from san.methods.san import SANConfig, SANModel
from san.methods.scaling import fold_all


@dataclass
class SANLoraConfig(SANConfig):
    lora_positions: list[str] = field(
        default_factory=lambda: ["qkv"],
        metadata={"help": "Positions whose Linear gets a LoRA update (qkv: the fused q, k, v projection)."},
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: float = field(default=8, metadata={"help": "LoRA alpha (update scaled by alpha / rank)."})
    dora: bool = field(default=False, metadata={"help": "DoRA instead of LoRA (peft use_dora)."})


class SANLoraModel(SANModel):
    config_class = SANLoraConfig

    def _adapt(self, model: nn.Module) -> None:
        import peft

        super()._adapt(model)
        cfg = self.config
        # the innermost Linear under each position (inside SAN's wrappers: <position>[.base][.base])
        targets = [
            name
            for name, module in model.named_modules()
            if type(module) is nn.Linear and name.replace(".base", "").rsplit(".", 1)[-1] in cfg.lora_positions
        ]
        if not targets:
            raise UnsupportedBackboneError(
                f"{self.method_name}: {type(model).__name__} has no Linear at positions {cfg.lora_positions}"
            )
        lora = peft.LoraConfig(target_modules=targets, r=cfg.rank, lora_alpha=cfg.alpha, use_dora=cfg.dora)
        self._tuner = peft.get_peft_model(model, lora).base_model
        self._lora_layers = tuner_layers(model)

    def _method_parameters(self):
        yield from super()._method_parameters()
        yield from adapter_parameters(self._lora_layers)

    def _no_weight_decay_parameters(self):
        return super()._method_parameters()  # SAN's vectors; LoRA matrices are decayed like weights

    def _merge_into(self, model: nn.Module) -> nn.Module:
        if self.config.inference_mode != "both":
            raise ValueError("merge folds both neuron and synapse scaling; set inference_mode='both' first")
        return fold_all(self._tuner.merge_and_unload())


register_method("san_lora", SANLoraModel)
