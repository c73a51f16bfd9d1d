"""The one training loop every method shares.

AdamW with per-group weight decay, linear warmup then cosine decay per step, bf16
autocast on GPU, gradient clipping, evaluation every epoch, a checkpoint at every epoch
end and resume from it. Randomness is reseeded from (seed, epoch) at every epoch start,
so a resumed run computes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from san.backbones import DataConfig
from san.methods.base import PeftModel
from san.records import atomic_write_bytes


class NonFiniteLossError(FloatingPointError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32."""
    choices = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name not in choices:
        raise ValueError(f"unknown trainer.precision {name!r}; accepted: ['auto', {', '.join(map(repr, choices))}]")
    return choices[name]


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup from 0 to 1, then cosine from 1 down to min_ratio at the last step."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(peft: PeftModel, optim: Mapping[str, Any], device: torch.device) -> torch.optim.AdamW:
    exempt = peft.no_weight_decay_ids()
    trainable = [p for _, p in peft.named_trainable_parameters()]
    if not trainable:
        raise ValueError(f"method {peft.method_name!r} left no parameter trainable")
    groups = [
        {"params": [p for p in trainable if id(p) not in exempt], "weight_decay": optim["weight_decay"]},
        {"params": [p for p in trainable if id(p) in exempt], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"],
        fused=device.type == "cuda",
    )


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


class Trainer:
    def __init__(self, peft: PeftModel, data_config: DataConfig, trainer: Mapping[str, Any],
                 optim: Mapping[str, Any], seed: int, run_dir: Path, identity: str, channels_last: bool = False):
        self.peft = peft
        self.cfg = trainer
        self.optim_cfg = optim
        self.seed = seed
        self.run_dir = run_dir
        self.identity = identity
        self.device = resolve_device(trainer["device"])
        self.autocast_dtype = resolve_precision(trainer["precision"], self.device)
        # NHWC is what CPU and GPU conv kernels are fastest on; a ViT only sees it in patch_embed.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        peft.model.to(self.device, memory_format=self.memory_format)
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(data_config.mean, device=self.device).view(shape) * 255
        self.std = torch.tensor(data_config.std, device=self.device).view(shape) * 255
        self.optimizer = build_optimizer(peft, optim, self.device)
        # torch.compile traces the adapted model once per run; worth it for long runs on a GPU.
        self.forward = torch.compile(peft.model) if trainer.get("compile", False) else peft.model
        self.checkpoint_path = run_dir / "checkpoint.pt"

    # --- pieces ---------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).float()
        return ((images - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    def _set_lr(self, step: int, decay_steps: int, warmup: int) -> float:
        min_ratio = self.optim_cfg["min_lr"] / self.optim_cfg["lr"]
        lr = self.optim_cfg["lr"] * lr_multiplier(step, decay_steps, warmup, min_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Trainable tensors and buffers only: for a PEFT method this is a few MB."""
        keep = {id(p) for _, p in self.peft.named_trainable_parameters()}
        keep |= {id(b) for b in self.peft.model.buffers()}
        return {k: v.detach().cpu() for k, v in self.peft.model.state_dict(keep_vars=True).items() if id(v) in keep}

    def _save_checkpoint(self, epoch: int, outcome: TrainOutcome) -> None:
        buffer = io.BytesIO()
        torch.save({"identity": self.identity, "epoch": epoch, "model": self._checkpoint_state(),
                    "optimizer": self.optimizer.state_dict(), "outcome": outcome.__dict__}, buffer)
        atomic_write_bytes(self.checkpoint_path, buffer.getvalue())

    def _load_checkpoint(self) -> tuple[int, TrainOutcome]:
        if not (self.cfg["resume"] and self.checkpoint_path.is_file()):
            return 0, TrainOutcome()
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        if state["identity"] != self.identity:
            # A checkpoint of another configuration in this directory: never mix them.
            raise RuntimeError(
                f"{self.checkpoint_path} belongs to a different configuration; delete it or "
                "set trainer.resume=false"
            )
        missing = set(self._checkpoint_state()) - set(state["model"])
        if missing:
            raise RuntimeError(f"{self.checkpoint_path} lacks tensors {sorted(missing)[:5]}")
        self.peft.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        outcome = TrainOutcome(**state["outcome"])
        outcome.resumed_from_epoch = state["epoch"]
        return state["epoch"], outcome

    def _write_metrics_csv(self, history: list[dict]) -> None:
        columns = sorted({key for row in history for key in row}, key=lambda k: (k != "epoch", k))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
        atomic_write_bytes(self.run_dir / "metrics.csv", text.getvalue().encode())

    @torch.no_grad()
    def evaluate(self, loader: DataLoader, limit_batches: int | None = None) -> dict[str, float]:
        self.peft.set_train_mode(False)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        loss_sum = torch.zeros((), device=self.device)
        seen = 0
        for index, (images, labels) in enumerate(loader):
            if limit_batches is not None and index >= limit_batches:
                break
            labels = labels.to(self.device)
            with self._autocast():
                logits = self.forward(self._prepare(images))
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
            correct += (logits.argmax(dim=1) == labels).sum()
            seen += labels.numel()
        return {"top1": 100.0 * correct.item() / seen, "loss": loss_sum.item() / seen, "images": seen}

    # --- the loop ---------------------------------------------------------------------------
    def fit(self, fit_loader: DataLoader, eval_loader: DataLoader, eval_role: str,
            on_epoch: Callable[[dict], None] | None = None) -> TrainOutcome:
        cfg = self.cfg
        for loader in (fit_loader, eval_loader):
            if hasattr(loader, "to_device"):  # a cached split: copied to the device once
                loader.to_device(self.device)
        epochs = cfg["epochs"]
        steps_per_epoch = len(fit_loader)
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
        start_epoch, outcome = self._load_checkpoint()
        trainable = [p for _, p in self.peft.named_trainable_parameters()]
        self.peft.on_fit_start(total_steps)

        for epoch in range(start_epoch, epochs):
            torch.manual_seed(epoch_seed(self.seed, epoch))
            fit_loader.generator.manual_seed(epoch_seed(self.seed, epoch))
            self.peft.set_train_mode(True)
            loss_sum = torch.zeros((), device=self.device)
            images_seen = 0
            started = time.perf_counter()
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                       disable=None if cfg["progress"] else True, dynamic_ncols=True)
            for index, (images, labels) in enumerate(fit_loader):
                if index >= steps_per_epoch:
                    break
                step = epoch * steps_per_epoch + index
                lr = self._set_lr(step, decay_steps, warmup_steps)
                labels = labels.to(self.device, non_blocking=True)
                with self._autocast():
                    logits = self.forward(self._prepare(images))
                    loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg["label_smoothing"])
                    regularization = self.peft.regularization_loss()
                self.optimizer.zero_grad(set_to_none=True)
                (loss if regularization is None else loss + regularization).backward()
                if cfg["grad_clip_norm"]:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg["grad_clip_norm"])
                self.optimizer.step()
                self.peft.after_optimizer_step(step)
                loss_sum += loss.detach() * labels.numel()
                images_seen += labels.numel()
                if (index + 1) % cfg["nan_check_every"] == 0 or index + 1 == steps_per_epoch:
                    # A host sync, so only every few steps: enough to stop a diverged run early.
                    if not torch.isfinite(loss_sum):
                        raise NonFiniteLossError(
                            f"training loss became non-finite in epoch {epoch + 1}, step {index + 1} "
                            f"(lr {lr:.3g}); lower optim.lr or enable trainer.grad_clip_norm"
                        )
                    bar.set_postfix(loss=f"{loss_sum.item() / images_seen:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
            bar.close()
            outcome.train_seconds += time.perf_counter() - started
            outcome.train_images += images_seen
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum.item() / images_seen,
                   "train_seconds": time.perf_counter() - started}
            last = epoch + 1 == epochs
            if last or (epoch + 1) % cfg["eval_every"] == 0:
                started = time.perf_counter()
                metrics = self.evaluate(eval_loader, cfg["limit_eval_batches"])
                outcome.eval_seconds += time.perf_counter() - started
                outcome.eval_images += metrics.pop("images")
                row.update({f"{eval_role}_{name}": value for name, value in metrics.items()})
            outcome.history.append(row)
            self._write_metrics_csv(outcome.history)
            self._save_checkpoint(epoch + 1, outcome)
            if on_epoch is not None:
                on_epoch(row)
            summary = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "lr"))
            print(f"epoch {epoch + 1}/{epochs}: {summary}", flush=True)
        return outcome

    def discard_checkpoint(self) -> None:
        """After the record is complete the checkpoint is only disk weight."""
        if not self.cfg["keep_checkpoint"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.checkpoint_path)
