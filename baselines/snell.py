"""SNELL and SNELLA: sparse tuning with kernelized LoRA (Shen et al., NeurIPS 2024,
arXiv 2411.01800) and its adaptive bi-level sparsity allocation (arXiv 2510.24037).

Read from the authors' code, ssfgunner/SNELL (`model/vision_transformer_timm.py`,
`model/swin_timm.py`, `model/convnext_timm.py`, `sparse_allocator.py`, `train_alloc.py`,
`engine.py`, `scripts/`):

- The update of a frozen weight is merged from two low-rank point sets by a kernel, not by
  an inner product: every input feature i and output feature o own a point per kernel head
  (A_h: d_in x r/2, B_h: d_out x r/2, two heads), and
  ΔW[o, i] = c (‖B_0[o] - A_0[i]‖_p - ‖B_1[o] - A_1[i]‖_p)   (their `pathIntegrals`: torch.cdist
  per head, summed with coefficients c·(-1)^h; c = 0.1, p = 2).
  Both sets are Kaiming-uniform at init, so ΔW is NOT zero at init (|ΔW| about 5e-4 on
  average on a ViT-B/16 qkv block, 4e-7 after the competition below): the adapted model
  starts near, not at, the backbone.
- Sparsification by competition, every forward: the entries of |ΔW| compete within their
  matrix; those strictly above the s-quantile survive (torch.quantile, linear
  interpolation, i.e. the k = n - 1 - ⌊s (n - 1)⌋ largest), and each survivor is multiplied
  by its own detached magnitude: the update is ΔW ⊙ |ΔW| ⊙ mask, and its gradient reaches ΔW
  scaled by |ΔW| (their `sparsify`: `weight * F.threshold(weight.detach().abs(), q, 0)`).
  At s = 0 their TuningModule builds the plain kernelized layer (KLoRA) instead: ΔW itself,
  dense, not multiplied by its magnitude. Both are reproduced.
- A layer computes h = x (W0 + ΔW_sparse)ᵀ + b. Their branch runs in parallel: dropout 0.1 on
  its input (shared by q, k and v; none before proj), DropPath 0.1 on its output, the
  whole branch under activation checkpointing (so ΔW is rebuilt in the backward instead of
  stored: the low-memory claim). Merging adds ΔW_sparse to W0, exactly.
- Targets: q, k, v, proj, fc1, fc2 of every block (ViT and Swin; their ViT splits timm's fused
  qkv into three Linears, each with its own kernel and its own competition, as the q, k, v
  row blocks of the fused qkv here), fc1 and fc2 of every ConvNeXt block. Their ViT also
  trains the class token (`ft_cls_token = True`; `train_alloc.py` lists `cls_token` among
  its fully tuned keys); option `train_cls_token`.

SNELLA (their `sparse_allocator.py`, run by `train_alloc.py`): the same layers, with the
nonzero budget shared by all matrices and reallocated during training. After every
optimizer step each matrix's importance is smoothed (sensitivity |θ·∇θ| of A and B, its
EMA with β1 and the EMA of its deviation, the uncertainty, with β2); at each allocation
point the global budget follows a cubic schedule from the initial to the target density,
is split across matrices in proportion to their scores (mean of sensitivity x uncertainty
over A plus over B), capped at each matrix's size, and inside each matrix the entries
compete by magnitude as in SNELL. Their allocation points are epoch starts (mask_interval 1
over 100 epochs); here `allocations` evenly spaced points of the run, driven by the trainer
hooks `on_fit_start`/`after_optimizer_step`. Not in the code read: the layer their scripts
name `tuning_model=snella` (and `mixk`, which some SNELLA scripts run without the
allocator); the allocator reads the same `In_Qs`/`Out_Qs` points as SNELL's layer, whose
kernel and competition are used here.

ViT-B/16, rank 32 (their SNELL-32): q, k, v and proj 4 x 32 x (768 + 768), fc1 and fc2 2 x 32 x
(768 + 3,072) per block, 12 x 442,368 = 5,308,416, plus the class token 768: 5,309,184
trainable without head, SNELL and SNELLA alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.convnext import ConvNeXt
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from san.errors import UserError
from san.methods.anatomy import backbone_anatomy
from san.methods.base import AdaptedModel, MethodConfig, UnsupportedBackboneError
from san.methods.registry import register_method
from san.methods.surgery import fold_wrappers, replace_module

# Their TuningModule builds SNELL(in, out, q_dim=low_rank_dim, ...) with the class default
# num_Hs=2: two kernel heads, with coefficients +scale and -scale.
KERNEL_HEADS = 2
# The architectures their model files adapt (vision_transformer_timm.py, swin_timm.py,
# convnext_timm.py), and the Linear layers of a block they put a SNELL branch on.
ARCHITECTURES = (VisionTransformer, SwinTransformer, ConvNeXt)
BLOCK_TARGETS = ("qkv", "proj", "fc1", "fc2")
QKV_NAMES = ("q", "k", "v")


@dataclass
class KernelTuningConfig(MethodConfig):
    """Settings SNELL and SNELLA share (their layer)."""

    # The released scripts (scripts/vtab/snell32/*.sh, snella32/*.sh): low_rank_dim=32.
    rank: int = field(default=32, metadata={"help": "r: points of r/2 coordinates in each of the two kernel heads."})
    # train.py / train_alloc.py: --norm_p default 2 (no script changes it).
    distance_p: float = field(default=2.0, metadata={"help": "p of the kernel's distance (torch.cdist)."})
    # Their SNELL/KLoRA constructor argument SCALE_FACTOR_fc, default 0.1 (TuningModule never sets it).
    kernel_scale: float = field(default=0.1, metadata={"help": "c in ΔW = c (d_0 - d_1), the heads' coefficient."})
    # Their additional_drop (nn.Dropout(p=0.1)) and TuningModule's DropPath(0.1): the scripts pass
    # neither --no_drop_out nor --no_drop_path.
    dropout: float = field(default=0.1, metadata={"help": "Dropout on the branch input (not before proj)."})
    drop_path: float = field(default=0.1, metadata={"help": "DropPath on the branch output."})
    # vision_transformer_timm.py VisionTransformerSNELL: ft_cls_token = True.
    train_cls_token: bool = field(
        default=True, metadata={"help": "Also train the class token (ViT), as their ViT does."}
    )
    # vision_transformer_timm.py (SNELL.forward): cp.checkpoint(self._forward, x).
    checkpoint: bool = field(
        default=True,
        metadata={"help": "Rebuild ΔW in the backward (activation checkpointing) instead of storing it."},
    )

    def __post_init__(self):
        if self.rank < 2 or self.rank % 2:
            raise ValueError(f"rank is split over {KERNEL_HEADS} kernel heads: an even number >= 2, not {self.rank}")
        if self.distance_p <= 0:
            raise ValueError(f"distance_p must be positive, not {self.distance_p}")
        for name in ("dropout", "drop_path"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} is a probability in [0, 1), not {getattr(self, name)}")


@dataclass
class SnellConfig(KernelTuningConfig):
    # The median of the 19 per-task init_thres of scripts/vtab/snell32/*.sh (caltech101's 0.4;
    # they range from 0, five tasks, to dtd's 0.995). train.py's own default, 0, is the dense
    # kernelized LoRA (KLoRA), not SNELL.
    sparsity: float = field(
        default=0.4,
        metadata={"help": "Fraction of each ΔW zeroed by the competition (their init_thres); 0 = dense KLoRA."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"sparsity is a fraction in [0, 1), not {self.sparsity}")


@dataclass
class SnellaConfig(KernelTuningConfig):
    # scripts/vtab/snella32/*.sh: init_thres=0.01 in every task.
    initial_sparsity: float = field(default=0.01, metadata={"help": "Sparsity of every ΔW until the first allocation."})
    # The median of the 7 target_ratio of scripts/vtab/snella32/*.sh run with the allocator
    # (0.2 retinopathy ... 0.93 dtd; smallnorb_ele's 0.63); train_alloc.py's default is 0.9.
    target_sparsity: float = field(default=0.63, metadata={"help": "Average sparsity the schedule ends at."})
    # The scripts: init_warmup=0, final_warmup=0 (epochs), mask_interval=1 over 100 epochs.
    warmup_fraction: float = field(
        default=0.0, metadata={"help": "Fraction of the allocation points kept at the initial sparsity (init_warmup)."}
    )
    final_fraction: float = field(
        default=0.0,
        metadata={"help": "Fraction of the allocation points at the end held at the target (final_warmup)."},
    )
    allocations: int = field(
        default=100, metadata={"help": "Allocation points evenly spaced over the run (theirs: one per epoch)."}
    )
    # The scripts: beta1=0.85, beta2=0.85, metric=ipt.
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity |θ·∇θ|."})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the uncertainty."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("initial_sparsity", "target_sparsity"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a fraction in [0, 1], not {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} is an EMA factor in (0, 1), not {getattr(self, name)}")
        if self.allocations < 1:
            raise ValueError(f"allocations must be >= 1, not {self.allocations}")
        if not (
            self.warmup_fraction >= 0 and self.final_fraction >= 0 and self.warmup_fraction + self.final_fraction < 1
        ):
            raise ValueError(
                f"warmup_fraction ({self.warmup_fraction}) and final_fraction ({self.final_fraction}) are >= 0 "
                "and must leave part of the run for the budget to decrease"
            )


# --- the layer ------------------------------------------------------------------------------
def quantile_keep(entries: int, sparsity: float) -> int:
    """How many entries survive a strict threshold at the `sparsity` quantile (torch.quantile's
    linear interpolation) when they are distinct: n - 1 - ⌊s (n - 1)⌋."""
    return entries - 1 - math.floor(sparsity * (entries - 1))


def compete(delta: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` entries of largest |ΔW| survive (ties at the threshold drop, as a strict
    threshold does), each multiplied by its detached magnitude."""
    magnitude = delta.detach().abs()
    if keep < delta.numel():
        threshold = magnitude.flatten().kthvalue(delta.numel() - keep).values
        magnitude = torch.where(magnitude > threshold, magnitude, torch.zeros_like(magnitude))
    return delta * magnitude


class KernelizedUpdate(nn.Module):
    """ΔW of one weight matrix (d_out x d_in) from its kernel points, sparsified by competition."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, distance_p: float, scale: float, keep: int | None
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.distance_p, self.scale = distance_p, scale
        self.keep = keep  # None: their KLoRA (dense ΔW, no competition)
        self.input_points = nn.Parameter(torch.empty(KERNEL_HEADS, in_features, rank // 2))
        self.output_points = nn.Parameter(torch.empty(KERNEL_HEADS, out_features, rank // 2))
        for points in (self.input_points, self.output_points):  # as theirs, on the 3-D tensors
            nn.init.kaiming_uniform_(points, a=math.sqrt(5))

    @property
    def entries(self) -> int:
        return self.in_features * self.out_features

    def dense_delta(self) -> torch.Tensor:
        distances = torch.cdist(self.output_points, self.input_points, p=self.distance_p)  # heads x d_out x d_in
        return self.scale * (distances[0::2].sum(0) - distances[1::2].sum(0))

    def delta(self) -> torch.Tensor:
        dense = self.dense_delta()
        return dense if self.keep is None else compete(dense, self.keep)


class SnellLinear(nn.Module):
    """A frozen Linear plus a SNELL branch: one kernelized update per row block (q, k and v of a
    fused qkv each compete on their own)."""

    def __init__(self, base: nn.Linear, row_blocks: list[int], config: KernelTuningConfig, keep_at, dropout: float):
        super().__init__()
        self.base = base
        self.updates = nn.ModuleList(
            KernelizedUpdate(
                base.in_features,
                rows,
                config.rank,
                config.distance_p,
                config.kernel_scale,
                keep_at(base.in_features * rows),
            )
            for rows in row_blocks
        )
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(config.drop_path)
        self.checkpoint = config.checkpoint

    def delta_weight(self) -> torch.Tensor:
        return torch.cat([update.delta() for update in self.updates])

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.delta_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # the merged weight's function, in one matmul
            return F.linear(x, self.base.weight + self.delta_weight().to(self.base.weight.dtype), self.base.bias)
        branch_input = self.dropout(x)
        if self.checkpoint and torch.is_grad_enabled():
            branch = checkpoint(self._branch, branch_input, use_reentrant=False)
        else:
            branch = self._branch(branch_input)
        return self.base(x) + self.drop_path(branch)

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        return self.base


# --- the model-level classes -----------------------------------------------------------------
class KernelTuning(AdaptedModel):
    """SNELL's layers on a backbone's block Linears; subclasses choose each matrix's budget."""

    config_class = KernelTuningConfig

    def _keep_at_start(self, entries: int) -> int | None:
        raise NotImplementedError

    def _adapt(self, model: nn.Module) -> None:
        cfg = self.config
        if not isinstance(model, ARCHITECTURES):
            raise UnsupportedBackboneError(
                f"{self.method_name} is defined by its authors for {[a.__name__ for a in ARCHITECTURES]} (the Linear "
                f"layers of their blocks); {type(model).__name__} is not one of them"
            )
        names = {module: name for name, module in model.named_modules()}
        self.layers: list[SnellLinear] = []
        self.matrix_names: list[str] = []
        for block in backbone_anatomy(model, self.method_name).blocks:
            for position in BLOCK_TARGETS:
                linear = block.get(position)
                if not isinstance(linear, nn.Linear):
                    continue
                fused = position == "qkv"
                rows = [linear.out_features // 3] * 3 if fused else [linear.out_features]
                # their q, k, v branches read one dropped input; proj's branch reads its input undropped
                layer = SnellLinear(linear, rows, cfg, self._keep_at_start, 0.0 if position == "proj" else cfg.dropout)
                self.matrix_names += [f"{names[linear]}.{n}" for n in QKV_NAMES] if fused else [names[linear]]
                replace_module(model, linear, layer)
                self.layers.append(layer)
        token = getattr(model, "cls_token", None)
        self.class_token = token if cfg.train_cls_token and isinstance(token, nn.Parameter) else None

    @property
    def updates(self) -> list[KernelizedUpdate]:
        return [update for layer in self.layers for update in layer.updates]

    def _method_parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers:
            yield from layer.updates.parameters()
        if self.class_token is not None:
            yield self.class_token

    def _merge_into(self, model: nn.Module) -> nn.Module:
        fold_wrappers(model, SnellLinear)
        return model

    @torch.no_grad()
    def record_facts(self) -> dict[str, Any]:
        """The density the sparse updates actually reached (nonzeros of every ΔW_sparse)."""
        nonzero = {name: int(update.delta().count_nonzero()) for name, update in zip(self.matrix_names, self.updates)}
        entries = {name: update.entries for name, update in zip(self.matrix_names, self.updates)}
        return {
            "density": sum(nonzero.values()) / sum(entries.values()),
            "nonzero": sum(nonzero.values()),
            "entries": sum(entries.values()),
            "density_per_matrix": {name: nonzero[name] / entries[name] for name in entries},
        }


class Snell(KernelTuning):
    """SNELL: kernelized low-rank updates, sparsified by magnitude competition at a fixed ratio."""

    config_class = SnellConfig

    def _keep_at_start(self, entries: int) -> int | None:
        return None if self.config.sparsity == 0 else quantile_keep(entries, self.config.sparsity)


# --- SNELLA's allocation ----------------------------------------------------------------------
def allocate_budget(scores: list[float], budget: int, capacities: list[int]) -> list[int]:
    """Split `budget` nonzeros over matrices in proportion to `scores`, none above its capacity:
    shares beyond a capacity are capped and the rest redistributed over the others by score
    (their `param_alloc`); integer parts by largest remainder, so the parts sum to the budget
    exactly (their int() truncation can fall short by up to one per matrix). All-zero scores
    split evenly (theirs: 1 / number of matrices)."""
    budget = max(0, min(int(budget), sum(capacities)))
    weights = list(scores) if sum(scores) > 0 else [1.0] * len(scores)
    parts = [0] * len(weights)
    free = set(range(len(weights)))
    remaining = budget
    while free:
        total = sum(weights[i] for i in free)
        # matrices whose every score is 0 take what the others cannot: by capacity
        shares = {
            i: remaining * (weights[i] / total if total > 0 else capacities[i] / sum(capacities[j] for j in free))
            for i in free
        }
        capped = [i for i in free if shares[i] >= capacities[i]]
        if not capped:
            floors = {i: math.floor(shares[i]) for i in free}
            for i in free:
                parts[i] = floors[i]
            leftover = remaining - sum(floors.values())
            for i in sorted(free, key=lambda i: shares[i] - floors[i], reverse=True)[:leftover]:
                parts[i] += 1
            break
        for i in capped:
            parts[i] = capacities[i]
            remaining -= capacities[i]
            free.remove(i)
    return parts


class Snella(KernelTuning):
    """SNELLA: SNELL's layers with the nonzero budget reallocated across matrices by importance
    on a cubic schedule (trainer hooks on_fit_start / after_optimizer_step). The importance
    averages, the allocation point reached and each matrix's budget go into the run's
    checkpoint (training_state), so a resumed run allocates as the uninterrupted one."""

    config_class = SnellaConfig

    def _keep_at_start(self, entries: int) -> int | None:
        return quantile_keep(entries, self.config.initial_sparsity)

    def _adapt(self, model: nn.Module) -> None:
        super()._adapt(model)
        cfg = self.config
        self.capacities = [update.entries for update in self.updates]
        self.initial_budget = sum(update.keep for update in self.updates)
        self.target_budget = round(sum((1 - cfg.target_sparsity) * entries for entries in self.capacities))
        self.budget = self.initial_budget
        self.total_steps: int | None = None
        self.period = 0
        self.allocations_applied = 0
        self.scores: list[float] = []

    def on_fit_start(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.period = 0
        # per matrix: EMA of the sensitivity and of the uncertainty, for A and for B
        self.sensitivity = [[torch.zeros_like(p) for p in u.parameters()] for u in self.updates]
        self.uncertainty = [[torch.zeros_like(p) for p in u.parameters()] for u in self.updates]

    def scheduled_budget(self, period: int) -> int | None:
        """The global budget at an allocation point (their `schedule_threshold`, in allocation
        points instead of epochs); None during the initial warmup, when nothing is reallocated."""
        cfg = self.config
        warmup, final = cfg.warmup_fraction * cfg.allocations, cfg.final_fraction * cfg.allocations
        if period <= warmup:
            return None
        if period > cfg.allocations - final:
            return self.target_budget
        remaining = 1 - (period - warmup) / (cfg.allocations - final - warmup)
        return int(self.target_budget + (self.initial_budget - self.target_budget) * remaining**3)

    @torch.no_grad()
    def _update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for update, sensitivities, uncertainties in zip(self.updates, self.sensitivity, self.uncertainty):
            for parameter, sensitivity, uncertainty in zip(update.parameters(), sensitivities, uncertainties):
                if parameter.grad is None:
                    continue
                current = torch.nan_to_num((parameter * parameter.grad).abs(), nan=0.0, posinf=math.inf)
                sensitivity.mul_(b1).add_(current, alpha=1 - b1)
                uncertainty.mul_(b2).add_((current - sensitivity).abs(), alpha=1 - b2)

    def importance_scores(self) -> list[float]:
        """Per matrix: mean of sensitivity x uncertainty over A, plus the same over B."""
        scores = [
            sum((s * u).mean() for s, u in zip(sensitivities, uncertainties))
            for sensitivities, uncertainties in zip(self.sensitivity, self.uncertainty)
        ]
        return torch.stack(scores).tolist()

    def allocate(self, budget: int) -> None:
        self.scores = self.importance_scores()
        for update, keep in zip(self.updates, allocate_budget(self.scores, budget, self.capacities)):
            update.keep = keep
        self.budget = budget
        self.allocations_applied += 1

    def after_optimizer_step(self, step: int) -> None:
        if self.total_steps is None:
            raise RuntimeError(f"{self.method_name}: on_fit_start(total_steps) must be called before training steps")
        self._update_importance()
        period = (step + 1) * self.config.allocations // self.total_steps
        # points at the run's very end would change the pattern after the last step: skipped
        if period != self.period and period < self.config.allocations:
            self.period = period
            budget = self.scheduled_budget(period)
            if budget is not None:
                self.allocate(budget)

    def training_state(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "budget": self.budget,
            "allocations_applied": self.allocations_applied,
            "scores": list(self.scores),
            "keep": [update.keep for update in self.updates],
            "sensitivity": [[t.detach().cpu() for t in tensors] for tensors in self.sensitivity],
            "uncertainty": [[t.detach().cpu() for t in tensors] for tensors in self.uncertainty],
        }

    @torch.no_grad()
    def load_training_state(self, state: Mapping[str, Any]) -> None:
        if not state:
            raise UserError(
                f"{self.method_name}: the checkpoint holds no allocation state (written before SNELLA's state was "
                "checkpointed); delete the run's checkpoint.pt or set trainer.resume=false to start it afresh"
            )
        self.period, self.budget = state["period"], state["budget"]
        self.allocations_applied, self.scores = state["allocations_applied"], list(state["scores"])
        for update, keep in zip(self.updates, state["keep"], strict=True):
            update.keep = keep
        for mine, saved in ((self.sensitivity, state["sensitivity"]), (self.uncertainty, state["uncertainty"])):
            for tensors, saved_tensors in zip(mine, saved, strict=True):
                for tensor, saved_tensor in zip(tensors, saved_tensors, strict=True):
                    tensor.copy_(saved_tensor)

    def record_facts(self) -> dict[str, Any]:
        return {
            **super().record_facts(),
            "budget": self.budget,
            "target_density": self.target_budget / sum(self.capacities),
            "allocations_applied": self.allocations_applied,
        }


register_method("snell", Snell)
register_method("snella", Snella)
