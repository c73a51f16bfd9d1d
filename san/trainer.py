"""The one training loop every method shares.

AdamW or SGD (optim.name) with per-group weight decay, linear warmup then cosine decay (per step
by default; timm's and VPT's per-epoch schedules as options, optim.schedule), bf16
autocast on GPU (fp16 with a gradient scaler where bf16 is not native), optional gradient
clipping, batch augmentation on the device and soft targets (configs/augment/, off by
default), model EMA (trainer.model_ema, off by default), evaluation at the end (and every
`eval_every` epochs when a curve is asked for), and checkpoints of the trainable tensors at
epoch ends every few minutes of work and on SIGTERM. Randomness is reseeded from (seed, epoch)
at every epoch start, so a resumed run computes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import pickle
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from san.atomic import atomic_write_bytes, atomic_write_stream
from san.data.batch_augment import AugmentSettings, BatchAugment, soft_target_cross_entropy
from san.data.hendrycks import subset_correct
from san.data.preprocessing import Preprocessing
from san.distributed import ProcessGroup
from san.ema import ModelEma
from san.errors import ConfigError, UserError
from san.methods.base import AdaptedModel


class NonFiniteLossError(FloatingPointError):
    pass


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from safely."""


class TrainingInterrupted(UserError, RuntimeError):
    """SIGTERM (a SLURM preemption or time limit, a `kill`) arrived; the epoch in progress
    was finished and checkpointed, and running the same command again resumes it."""


def cache_device_budget_bytes(setting: Any, device: torch.device) -> int | None:
    """How many bytes of cached splits may live on the device (None: no limit, the CPU)."""
    if device.type != "cuda":
        return None
    if setting in (None, "auto"):
        # A quarter of the card: VTAB's largest test split at 224 px (dsprites, 11 GB) fits an
        # 80 GB H100 and stays memory-mapped on the host on a 24 GB card.
        return torch.cuda.get_device_properties(device).total_memory // 4
    return int(float(setting) * 2**30)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class PrecisionError(UserError, ValueError):
    """A precision the device cannot run."""


def bf16_supported(device: torch.device) -> bool:
    # Ampere (compute capability 8.0) and newer run bf16 natively; on a V100 or T4
    # torch.cuda.is_bf16_supported() can say True through emulation that is many times slower.
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32.

    auto: bf16 on GPUs that run it natively, fp16 (with a gradient scaler, see `Trainer`)
    on older GPUs, float32 on the CPU."""
    choices = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if bf16_supported(device) else torch.float16
    if name not in choices:
        raise ValueError(f"unknown trainer.precision {name!r}; accepted: ['auto', {', '.join(map(repr, choices))}]")
    if name == "fp16" and device.type != "cuda":
        raise PrecisionError(
            "trainer.precision=fp16 needs a CUDA device (fp16 autocast with a gradient scaler); "
            "use trainer.precision=bf16 or fp32 on the CPU"
        )
    return choices[name]


def configure_determinism(deterministic: bool) -> None:
    """What `trainer.deterministic` switches on.

    On the CPU the same seed then gives the same result. On CUDA it selects deterministic
    kernels (cuDNN's, and cuBLAS's through CUBLAS_WORKSPACE_CONFIG, which must be set before
    the first cuBLAS call of the process) and turns off cuDNN autotuning; kernels with no
    deterministic version (some scatter/index backward passes) still run and warn, so CUDA
    results are reproducible for the suite's methods but not guaranteed for every op.
    Off: cuDNN picks the fastest kernels (`benchmark`), results may differ in the last bits."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of rank `rank`'s own randomness in an epoch (drop path, batch augmentation): rank 0
    draws what a single process draws, other ranks a stream of their own (timm seeds seed + rank),
    so data-parallel ranks do not repeat each other's masks. The data order is not drawn here: it
    comes from the loader's generator, which every rank seeds alike (san.data.loaders.ShardSampler)."""
    return epoch_seed(seed, epoch) + rank * 2**32


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup from 0 to 1, then cosine from 1 down to min_ratio at the last step."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# optim.schedule: how the learning rate moves (configs/optim/adamw.yaml says which is default and why).
#   cosine_per_step:       linear warmup from 0 over `warmup_epochs` then cosine down to `min_lr`,
#                          updated every step; `cooldown_epochs` at min_lr at the end (this suite's default).
#   timm_cosine_per_epoch: timm's CosineLRScheduler as SSF's train.py runs it (t_in_epochs=True: one
#                          value per epoch; warmup from `warmup_lr` over `warmup_epochs`, then the cosine
#                          over t_initial = epochs - cooldown_epochs counted from epoch 0 (warmup_prefix
#                          False), so it resumes at cos(pi * warmup/t_initial); `min_lr` in the cooldown).
#   vpt_cosine_per_epoch:  VPT's WarmupCosineSchedule (KMnP/vpt src/solver/lr_scheduler.py), stepped once
#                          per epoch (src/engine/trainer.py): lr * e/warmup in warmup (epoch 0 at lr 0),
#                          then lr * 0.5 (1 + cos(pi (e - warmup) / (epochs - warmup))), floored at min_lr.
SCHEDULES = ("cosine_per_step", "timm_cosine_per_epoch", "vpt_cosine_per_epoch")


def warmup_start_lr(optim: Mapping[str, Any], base_lr: float) -> float:
    """Where timm_cosine_per_epoch's warmup starts: optim.warmup_lr_ratio * lr when the ratio is
    set (the SAN early code's grid: warmup_lr = ratio * lr), else optim.warmup_lr."""
    ratio = optim.get("warmup_lr_ratio")
    return optim.get("warmup_lr", 0.0) if ratio is None else ratio * base_lr


def scheduled_lr(step: int, steps_per_epoch: int, epochs: int, base_lr: float, optim: Mapping[str, Any]) -> float:
    """The learning rate of optimisation step `step` (0-based) under `optim.schedule`."""
    schedule = optim.get("schedule", "cosine_per_step")
    warmup_epochs = optim["warmup_epochs"]
    cooldown_epochs = optim.get("cooldown_epochs", 0)
    min_lr = optim["min_lr"]
    if schedule == "cosine_per_step":
        decay_steps = (epochs - cooldown_epochs) * steps_per_epoch
        return base_lr * lr_multiplier(step, decay_steps, warmup_epochs * steps_per_epoch, min_lr / base_lr)
    epoch = step // steps_per_epoch
    t_initial = epochs - cooldown_epochs
    if schedule == "timm_cosine_per_epoch":
        warmup_lr = warmup_start_lr(optim, base_lr)
        if epoch < warmup_epochs:
            return warmup_lr + epoch * (base_lr - warmup_lr) / warmup_epochs
        if epoch >= t_initial:
            return min_lr
        return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * epoch / t_initial))
    if schedule == "vpt_cosine_per_epoch":
        if epoch < warmup_epochs:
            return base_lr * epoch / warmup_epochs
        progress = min(1.0, (epoch - warmup_epochs) / max(1, t_initial - warmup_epochs))
        return max(min_lr, base_lr * 0.5 * (1 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown optim.schedule {schedule!r}; accepted: {list(SCHEDULES)}")


# optim.lr_scaling: `none` uses optim.lr as given; `batch_over_256` uses optim.lr * batch_size / 256
# (VPT's tune_vtab.py: `lr = lr / 256 * cfg.DATA.BATCH_SIZE`).
LR_SCALINGS = ("none", "batch_over_256")


def effective_lr(optim: Mapping[str, Any], batch_size: int | None) -> float:
    scaling = optim.get("lr_scaling", "none")
    if scaling == "none":
        return float(optim["lr"])
    if scaling == "batch_over_256":
        if batch_size is None:
            raise ValueError("optim.lr_scaling=batch_over_256 needs the training batch size")
        return float(optim["lr"]) * batch_size / 256
    raise ValueError(f"unknown optim.lr_scaling {scaling!r}; accepted: {list(LR_SCALINGS)}")


# optim.weight_decay_exempt: which trainable tensors get no weight decay.
#   method:    the method's `no_weight_decay_ids()` (1-D tensors, scales, shifts, prompts, the backbone's
#              own no_weight_decay set); this suite's AdamW default.
#   head_bias: only the classifier's bias, as VPT's src/solver/optimizer.py ("last_layer.bias" gets
#              weight_decay 0; prompts, biases and the head weight are decayed).
#   none:      every trainable tensor is decayed.
WEIGHT_DECAY_EXEMPTIONS = ("method", "head_bias", "none")


def weight_decay_exempt_ids(adapted: AdaptedModel, optim: Mapping[str, Any]) -> set[int]:
    rule = optim.get("weight_decay_exempt", "method")
    if rule == "method":
        return adapted.no_weight_decay_ids()
    if rule == "head_bias":
        return {id(p) for p in adapted.head.parameters() if p.ndim == 1}
    if rule == "none":
        return set()
    raise ValueError(f"unknown optim.weight_decay_exempt {rule!r}; accepted: {list(WEIGHT_DECAY_EXEMPTIONS)}")


OPTIMIZERS = ("adamw", "sgd")


def build_optimizer(
    adapted: AdaptedModel, optim: Mapping[str, Any], device: torch.device, batch_size: int | None = None
) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or SGD with momentum (L2 weight decay, torch.optim.SGD as VPT),
    one group of decayed tensors and one of exempt ones (`optim.weight_decay_exempt`); or the
    method's own optimizer over those groups, where it supplies one (GaLore)."""
    name = optim.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optim.name {name!r}; accepted: {list(OPTIMIZERS)}")
    exempt = weight_decay_exempt_ids(adapted, optim)
    trainable = [p for _, p in adapted.named_trainable_parameters()]
    if not trainable:
        raise ValueError(f"method {adapted.method_name!r} left no parameter trainable")
    groups = [
        {"params": [p for p in trainable if id(p) not in exempt], "weight_decay": optim["weight_decay"]},
        {"params": [p for p in trainable if id(p) in exempt], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    lr = effective_lr(optim, batch_size)
    own = adapted.build_optimizer(groups, lr, optim)
    if own is not None:
        return own
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim.get("momentum", 0.9), nesterov=False)
    return torch.optim.AdamW(
        groups,
        lr=lr,
        betas=tuple(optim["betas"]),
        eps=optim["eps"],
        fused=device.type == "cuda",
    )


def optim_summary(optimizer: torch.optim.Optimizer, optim: Mapping[str, Any], batch_size: int) -> dict[str, Any]:
    """What ran, for the record: the optimizer as `build_optimizer` made it (its lr after scaling,
    its momentum), and the decay groups."""
    decayed, exempt = 0, 0
    for group in optimizer.param_groups:
        count = sum(p.numel() for p in group["params"])
        if group["weight_decay"]:
            decayed += count
        else:
            exempt += count
    return {
        "name": optim.get("name", "adamw"),
        "class": type(optimizer).__name__,
        "module": type(optimizer).__module__,  # GaLore's class is also called AdamW
        "lr": optimizer.defaults["lr"],
        "base_lr": float(optim["lr"]),
        "lr_scaling": optim.get("lr_scaling", "none"),
        "batch_size": batch_size,
        "weight_decay": optim["weight_decay"],
        "weight_decay_exempt": optim.get("weight_decay_exempt", "method"),
        "decayed_parameters": decayed,
        "exempt_parameters": exempt,
        "momentum": optimizer.defaults.get("momentum"),  # SGD's; AdamW has none
    }


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors the optimizer keeps: AdamW's two moments per tensor, SGD's momentum,
    GaLore's low-rank moments and its projection matrices (held by a projector object in the
    state, so objects are walked too). GaLore's claim is this number, beside peak memory."""

    def size(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, Mapping):
            return sum(size(item) for item in value.values())
        if isinstance(value, (list, tuple)):
            return sum(size(item) for item in value)
        if hasattr(value, "__dict__"):
            return size(vars(value))
        return 0

    return sum(size(state) for state in optimizer.state.values())


def schedule_summary(optim: Mapping[str, Any], epochs: int, base_lr: float) -> dict[str, Any]:
    schedule = optim.get("schedule", "cosine_per_step")
    timm_warmup = schedule == "timm_cosine_per_epoch"
    return {
        "name": schedule,
        "updates": "per_step" if schedule == "cosine_per_step" else "per_epoch",
        "epochs": epochs,
        "warmup_epochs": optim["warmup_epochs"],
        "cooldown_epochs": optim.get("cooldown_epochs", 0),
        "warmup_lr": warmup_start_lr(optim, base_lr) if timm_warmup else 0.0,
        "warmup_lr_ratio": optim.get("warmup_lr_ratio") if timm_warmup else None,
        "min_lr": optim["min_lr"],
    }


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"


@dataclass
class TrainOutcome:
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    train_images: int = 0
    eval_seconds: float = 0.0
    eval_images: int = 0
    resumed_from_epoch: int = 0
    evaluations: int = 0


class Trainer:
    def __init__(
        self,
        adapted: AdaptedModel,
        preprocessing: Preprocessing,
        trainer: Mapping[str, Any],
        optim: Mapping[str, Any],
        seed: int,
        run_dir: Path,
        identity: str,
        channels_last: bool = False,
        *,
        augment: Mapping[str, Any] | None = None,
        num_classes: int | None = None,
        group: ProcessGroup | None = None,
    ):
        self.adapted = adapted
        self.cfg = trainer
        self.optim_cfg = optim
        self.seed = seed
        self.run_dir = run_dir
        self.identity = identity
        # Data-parallel ranks (san.distributed): each trains on its share of every batch, and
        # rank 0 alone writes metrics.csv and checkpoints. A single process has world size 1.
        self.group = group or ProcessGroup()
        self.device = self.group.device(resolve_device(trainer["device"]))
        self.autocast_dtype = resolve_precision(trainer["precision"], self.device)
        if self.device.type == "cuda":
            # Each run's peak, not the process's running maximum over earlier in-process runs.
            torch.cuda.reset_peak_memory_stats(self.device)
        # NHWC is what CPU and GPU conv kernels are fastest on; a ViT only sees it in patch_embed.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        adapted.model.to(self.device, memory_format=self.memory_format)
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(preprocessing.mean, device=self.device).view(shape) * 255
        self.std = torch.tensor(preprocessing.std, device=self.device).view(shape) * 255
        self.optimizer = build_optimizer(adapted, optim, self.device, trainer["batch_size"])
        # The lr after optim.lr_scaling (build_optimizer's), and the schedule: both go into the record (san.run).
        self.base_lr = self.optimizer.defaults["lr"]
        self.optim_effective = optim_summary(self.optimizer, optim, trainer["batch_size"])
        self.schedule = schedule_summary(optim, trainer["epochs"], self.base_lr)
        scheduled_lr(0, 1, trainer["epochs"], self.base_lr, optim)  # an unknown optim.schedule fails here
        if optim.get("warmup_lr_ratio") is not None and optim.get("schedule") != "timm_cosine_per_epoch":
            raise ConfigError(
                f"optim.warmup_lr_ratio sets where timm_cosine_per_epoch's warmup starts; optim.schedule is "
                f"{optim.get('schedule', 'cosine_per_step')!r}, which warms up from 0: set "
                "optim.schedule=timm_cosine_per_epoch or optim.warmup_lr_ratio=null"
            )
        # fp16 has too narrow a range for small gradients: scale the loss (bf16 and fp32 need none).
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        # torch.compile traces the adapted model once per run; worth it for long runs on a GPU.
        # Evaluation pads its last batch to the full size under compile, so the eval graph sees one
        # shape; training's last partial batch costs one extra (dynamic-batch) compile, not one per epoch.
        self.compiled = bool(trainer.get("compile", False))
        self.forward = torch.compile(adapted.model) if self.compiled else adapted.model
        # Evaluation runs the module itself: each rank reads its own share of a split (their batch
        # counts may differ by one), so it must not enter DDP's collectives.
        self.eval_forward = self.forward
        self.rank_batch_size = self.group.per_rank_batch(trainer["batch_size"])
        # configs/augment: with everything off (augment=none, or None as san-bench passes) the
        # training step is the plain one, bit for bit.
        self.augment_settings = AugmentSettings.from_config(augment)
        if self.group.active:
            self._check_data_parallel()
            # Gradients are averaged over ranks after each backward: with equal per-rank batches that
            # is the gradient of the total batch's mean loss. Buffers (BatchNorm's running statistics)
            # stay per rank while training and are rank 0's whenever they are read (broadcast_buffers
            # before evaluation and checkpoints): BatchNorm's batch statistics are each rank's own batch.
            ddp = self.group.data_parallel(adapted.model, self.device)
            self.forward = torch.compile(ddp) if self.compiled else ddp
        self.checkpoint_path = run_dir / "checkpoint.pt"
        self.checkpoints_written = 0
        self._trainable = [p for _, p in adapted.named_trainable_parameters()]
        self.cached_on_device: dict[str, bool] = {}
        self.batch_augment = None
        if self.augment_settings.active:
            self._check_mixing_batches(self.rank_batch_size)
            self.batch_augment = BatchAugment(
                self.augment_settings, self._prepare, preprocessing.mean, num_classes, trainer["label_smoothing"]
            )
        self.augment_summary = self.augment_settings.summary(trainer["label_smoothing"])
        # trainer.model_ema: evaluation uses the moving average of the trainable tensors (san.ema).
        self.ema = None
        if trainer.get("model_ema", False):
            trainable_ids = {id(p) for p in self._trainable}
            self.ema = ModelEma.of_trainable(adapted.model, trainable_ids, trainer["model_ema_decay"])
        self.ema_summary = (
            {"decay": self.ema.decay, "tensors": len(self.ema.names), "evaluated_with": "ema"} if self.ema else None
        )

    def _check_data_parallel(self) -> None:
        if not self.augment_settings.drop_last:
            raise ConfigError(
                f"data-parallel training ({self.group.world_size} processes) drops each epoch's last partial batch, "
                "so that every process takes the same steps and the run does not depend on the process count "
                "(timm's distributed loaders: drop_last=is_training): set augment.drop_last=true"
            )

    def _check_mixing_batches(self, batch_size: int) -> None:
        if not self.augment_settings.mixes:
            return
        if not self.augment_settings.drop_last or batch_size % 2:
            raise ConfigError(
                "mixup/cutmix mix each image with the batch reversed (timm's Mixup), which needs even, full "
                f"batches: set augment.drop_last=true (as timm's training loaders do) and an even trainer.batch_size "
                f"per process (now {batch_size}, augment.drop_last={self.augment_settings.drop_last})"
            )

    # --- pieces ---------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).float()
        return ((images - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    def _set_lr(self, step: int, steps_per_epoch: int) -> float:
        lr = scheduled_lr(step, steps_per_epoch, self.cfg["epochs"], self.base_lr, self.optim_cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Trainable tensors and buffers only: for a PEFT method this is a few MB."""
        keep = {id(p) for _, p in self.adapted.named_trainable_parameters()}
        keep |= {id(b) for b in self.adapted.model.buffers()}
        return {k: v.detach().cpu() for k, v in self.adapted.model.state_dict(keep_vars=True).items() if id(v) in keep}

    def _save_checkpoint(self, epoch: int, outcome: TrainOutcome) -> None:
        """Trainable tensors and their optimizer state, streamed to a temporary file and renamed.

        Only tensors and plain Python types, so `_load_checkpoint` can refuse anything else
        (weights_only): a checkpoint planted in a shared results folder cannot run code."""
        state = {
            "identity": self.identity,
            "epoch": epoch,
            "model": self._checkpoint_state(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "outcome": dict(outcome.__dict__),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        method_state = self.adapted.training_state()
        if method_state:
            state["method"] = method_state
        atomic_write_stream(self.checkpoint_path, lambda stream: torch.save(state, stream))
        self.checkpoints_written += 1

    def _load_checkpoint(self) -> tuple[int, TrainOutcome]:
        if not (self.cfg["resume"] and self.checkpoint_path.is_file()):
            return 0, TrainOutcome()
        try:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{self.checkpoint_path} holds more than tensors and plain values, so it was not written by this "
                f"suite and loading it could run code; it was not loaded. Delete it to start the run afresh "
                f"(rm {self.checkpoint_path}), or set trainer.resume=false. ({str(error).splitlines()[0]})"
            ) from None
        if state["identity"] != self.identity:
            # A checkpoint of another configuration in this directory: never mix them.
            raise CheckpointError(
                f"{self.checkpoint_path} belongs to a different configuration; delete it or set trainer.resume=false"
            )
        missing = set(self._checkpoint_state()) - set(state["model"])
        if missing:
            raise CheckpointError(
                f"{self.checkpoint_path} lacks tensors {sorted(missing)[:5]}; delete it or set trainer.resume=false"
            )
        if self.ema is not None:
            if "ema" not in state:
                raise CheckpointError(
                    f"{self.checkpoint_path} holds no model EMA (trainer.model_ema was off when it was written); "
                    "delete it or set trainer.resume=false"
                )
            self.ema.load_state_dict(state["ema"])
        self.adapted.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        # applied after on_fit_start, which (re)initialises it
        self.resumed_method_state = state.get("method", {})
        outcome = TrainOutcome(**state["outcome"])
        outcome.resumed_from_epoch = state["epoch"]
        return state["epoch"], outcome

    def _checkpoint_due(self, epoch: int, last_written: float) -> bool:
        """At an epoch end: every `checkpoint_every_epochs` epochs if set, else once
        `checkpoint_every_minutes` of work have passed since the last write (an epoch of
        VTAB-1K takes about a second on an H100: a checkpoint per epoch would be mostly I/O)."""
        every_epochs = self.cfg.get("checkpoint_every_epochs")
        if every_epochs:
            return epoch % every_epochs == 0
        minutes = self.cfg.get("checkpoint_every_minutes", 5.0)
        return minutes is not None and time.monotonic() - last_written >= 60.0 * minutes

    def _write_metrics_csv(self, history: list[dict]) -> None:
        columns = sorted({key for row in history for key in row}, key=lambda k: (k != "epoch", k))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
        atomic_write_bytes(self.run_dir / "metrics.csv", text.getvalue().encode())

    def evaluate(
        self, loader: DataLoader, limit_batches: int | None = None, class_indices: list[int] | None = None
    ) -> dict[str, float]:
        """Top-1 and loss on a split; with trainer.model_ema, of the EMA weights (SSF's train.py
        reports the EMA model's metrics when --model-ema is on). `class_indices`: only these
        logits compete (a 200-class robustness set scored with the 1,000-way head). Data-parallel
        ranks each read their share and the counts are summed, so every rank returns the
        metrics of the whole split."""
        with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
            return self._evaluate(loader, limit_batches, class_indices)

    @torch.no_grad()
    def _evaluate(
        self, loader: DataLoader, limit_batches: int | None = None, class_indices: list[int] | None = None
    ) -> dict[str, float]:
        self.adapted.set_train_mode(False)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        loss_sum = torch.zeros((), device=self.device)
        seen = 0
        for index, (images, labels) in enumerate(loader):
            if limit_batches is not None and index >= limit_batches:
                break
            labels = labels.to(self.device)
            inputs = self._prepare(images)
            if self.compiled and len(inputs) < self.cfg["eval_batch_size"]:
                padding = inputs.new_zeros((self.cfg["eval_batch_size"] - len(inputs), *inputs.shape[1:]))
                inputs = torch.cat([inputs, padding]).contiguous(memory_format=self.memory_format)
            with self._autocast():
                logits = self.eval_forward(inputs)[: len(labels)]
            if class_indices is not None:
                # Hendrycks' eval code: the set's classes' logits compete (san.data.hendrycks)
                correct += subset_correct(logits, labels, class_indices)
                logits = logits[:, class_indices]
            else:
                correct += (logits.argmax(dim=1) == labels).sum()
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
            seen += labels.numel()
        # float64 holds the counts exactly (up to 2**53)
        totals = self.group.sum(torch.stack([correct.double(), loss_sum.double(), loss_sum.new_tensor(seen).double()]))
        correct_total, loss_total, seen_total = totals.tolist()
        seen_total = int(seen_total)
        return {"top1": 100.0 * correct_total / seen_total, "loss": loss_total / seen_total, "images": seen_total}

    # --- the loop ---------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimisation step on a batch (uint8 images); returns the detached loss.

        `san-bench` times exactly this function, so its figures are the trainer's. With batch
        augmentation on (configs/augment), the batch is augmented on the device first, and
        mixup/cutmix give soft targets (timm's SoftTargetCrossEntropy)."""
        labels = labels.to(self.device, non_blocking=True)
        targets, inputs = labels, None
        if self.batch_augment is not None:
            inputs, targets = self.batch_augment(images.to(self.device, non_blocking=True), labels)
        with self._autocast():
            logits = self.forward(self._prepare(images) if inputs is None else inputs).float()
            if targets.ndim == 2:
                loss = soft_target_cross_entropy(logits, targets)
            else:
                loss = F.cross_entropy(logits, targets, label_smoothing=self.cfg["label_smoothing"])
            regularization = self.adapted.regularization_loss()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss if regularization is None else loss + regularization).backward()
        if self.cfg["grad_clip_norm"]:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self._trainable, self.cfg["grad_clip_norm"])
        self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed
        self.scaler.update()
        if self.ema is not None:
            self.ema.update()  # after every optimiser step, as SSF's train.py (model_ema.update(model))
        return loss.detach()

    def move_cached_splits(self, *loaders) -> dict[str, bool]:
        """Copy cached splits to the device once, within `trainer.cache_device_budget` (GiB or auto)."""
        budget = cache_device_budget_bytes(self.cfg.get("cache_device_budget", "auto"), self.device)
        moved = {}
        for name, loader in zip(("fit", "evaluate"), loaders):
            if hasattr(loader, "to_device"):  # a cached split
                moved[name] = loader.to_device(self.device, budget)
                if moved[name] and budget is not None:
                    budget -= loader.images.numel()
        return moved

    def fit(
        self,
        fit_loader: DataLoader,
        eval_loader: DataLoader,
        eval_role: str,
        on_epoch: Callable[[dict], None] | None = None,
    ) -> TrainOutcome:
        cfg = self.cfg
        self.cached_on_device = self.move_cached_splits(fit_loader, eval_loader)
        epochs = cfg["epochs"]
        steps_per_epoch = len(fit_loader)
        if self.augment_settings.drop_last:
            # the last partial batch is never trained on (timm's create_loader: drop_last=is_training)
            steps_per_epoch = len(fit_loader.dataset) // cfg["batch_size"]
            if steps_per_epoch == 0:
                raise ConfigError(
                    f"augment.drop_last=true leaves no full batch: the fit split has {len(fit_loader.dataset)} "
                    f"images and trainer.batch_size is {cfg['batch_size']}; lower the batch size"
                )
        if cfg["limit_train_batches"]:
            steps_per_epoch = min(steps_per_epoch, cfg["limit_train_batches"])
        total_steps = epochs * steps_per_epoch
        warmup_steps = self.optim_cfg["warmup_epochs"] * steps_per_epoch
        # The cosine ends `cooldown_epochs` early; those epochs run at min_lr (SSF's recipe).
        decay_steps = total_steps - self.optim_cfg.get("cooldown_epochs", 0) * steps_per_epoch
        if decay_steps < warmup_steps:
            raise ValueError(
                f"optim.warmup_epochs ({self.optim_cfg['warmup_epochs']}) + optim.cooldown_epochs "
                f"({self.optim_cfg.get('cooldown_epochs', 0)}) leave no epoch of the {epochs} for the cosine decay"
            )
        self.resumed_method_state: dict[str, Any] = {}
        start_epoch, outcome = self._load_checkpoint()
        # Each process reads the checkpoint itself; on a shared file system one may see an older
        # file than rank 0, and processes starting at different epochs would wait on each other forever.
        if self.group.any(self.group.from_main(start_epoch) != start_epoch, self.device):
            raise CheckpointError(
                f"the processes of this run read different checkpoints at {self.checkpoint_path} (a shared file "
                "system that had not caught up); rerun the same command to resume"
            )
        self.adapted.on_fit_start(total_steps)
        if start_epoch > 0:
            self.adapted.load_training_state(self.resumed_method_state)
        if self.ema is not None and start_epoch == 0:
            self.ema.reset()  # the average starts from the weights training starts from (a resume loaded its own)
        with _sigterm_flag() as terminated:
            last_checkpoint = time.monotonic()
            for epoch in range(start_epoch, epochs):
                row = self._fit_epoch(epoch, epochs, steps_per_epoch, fit_loader, outcome)
                self.group.broadcast_buffers(self.adapted.model)  # rank 0's running statistics, read below
                last = epoch + 1 == epochs
                # By default only the last epoch is evaluated: the test split is read once by a final
                # run. eval_every > 0 adds a curve (tune runs: val only; see configs/trainer).
                if last or (cfg["eval_every"] and (epoch + 1) % cfg["eval_every"] == 0):
                    started = time.perf_counter()
                    metrics = self.evaluate(eval_loader, cfg["limit_eval_batches"])
                    outcome.eval_seconds += time.perf_counter() - started
                    outcome.eval_images += metrics.pop("images")
                    outcome.evaluations += 1
                    row.update({f"{eval_role}_{name}": value for name, value in metrics.items()})
                outcome.history.append(row)
                # Ranks stop and checkpoint together: SIGTERM may reach them at different moments, and
                # their clocks differ.
                stopping = self.group.any(terminated.is_set(), self.device)
                checkpoint = self.group.any(self._checkpoint_due(epoch + 1, last_checkpoint), self.device)
                if self.group.is_main:
                    self._write_metrics_csv(outcome.history)
                    if not last and (stopping or checkpoint):
                        self._save_checkpoint(epoch + 1, outcome)
                if not last and (stopping or checkpoint):
                    last_checkpoint = time.monotonic()
                if on_epoch is not None:
                    on_epoch(row)
                if self.group.is_main:
                    summary = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "lr"))
                    print(f"epoch {epoch + 1}/{epochs}: {summary}", flush=True)
                if stopping and not last:
                    raise TrainingInterrupted(
                        f"SIGTERM received: stopped after epoch {epoch + 1}/{epochs} with a checkpoint in "
                        f"{self.checkpoint_path}; run the same command again to resume"
                    )
        return outcome

    def _fit_epoch(
        self,
        epoch: int,
        epochs: int,
        steps_per_epoch: int,
        fit_loader,
        outcome: TrainOutcome,
    ) -> dict:
        cfg = self.cfg
        torch.manual_seed(rank_seed(self.seed, epoch, self.group.rank))
        fit_loader.generator.manual_seed(epoch_seed(self.seed, epoch))
        self.adapted.set_train_mode(True)
        loss_sum = torch.zeros((), device=self.device)
        images_seen = 0
        started = time.perf_counter()
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{epochs}",
            leave=False,
            disable=None if cfg["progress"] and self.group.is_main else True,
            dynamic_ncols=True,
        )
        lr = 0.0
        for index, (images, labels) in enumerate(fit_loader):
            if index >= steps_per_epoch:
                break
            step = epoch * steps_per_epoch + index
            lr = self._set_lr(step, steps_per_epoch)
            loss = self.train_step(images, labels)
            self.adapted.after_optimizer_step(step)
            loss_sum += loss * labels.numel()
            images_seen += labels.numel()
            if (index + 1) % cfg["nan_check_every"] == 0 or index + 1 == steps_per_epoch:
                # A host sync, so only every few steps: enough to stop a diverged run early. Over all
                # ranks' losses, so that every rank stops at the same step.
                if not torch.isfinite(self.group.sum(loss_sum)):
                    raise NonFiniteLossError(
                        f"training loss became non-finite in epoch {epoch + 1}, step {index + 1} "
                        f"(lr {lr:.3g}); lower optim.lr or enable trainer.grad_clip_norm"
                    )
                bar.set_postfix(loss=f"{loss_sum.item() / images_seen:.4f}", lr=f"{lr:.2e}")
            bar.update(1)
        bar.close()
        totals = self.group.sum(torch.stack([loss_sum.double(), loss_sum.new_tensor(images_seen).double()]))
        loss_total, images_total = totals.tolist()
        outcome.train_seconds += time.perf_counter() - started
        outcome.train_images += int(images_total)
        return {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_total / images_total,
            "train_seconds": time.perf_counter() - started,
        }

    def discard_checkpoint(self) -> None:
        """After the record is complete the checkpoint is only disk weight."""
        if not self.cfg["keep_checkpoint"] and self.group.is_main:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.checkpoint_path)


@contextlib.contextmanager
def _sigterm_flag():
    """A flag set by SIGTERM while training (main thread only; elsewhere a flag that stays clear).

    SLURM sends SIGTERM at preemption and at the time limit (then SIGKILL after KillWait, 30 s
    by default): the epoch in progress finishes, is checkpointed, and the run stops cleanly.
    The previous handler is restored afterwards; SIGUSR1 is left to submitit, which uses it to
    requeue jobs."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)
