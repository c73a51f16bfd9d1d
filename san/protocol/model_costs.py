"""FLOPs per image and trainable parameters of a backbone x method, measured once, stored.

The cost account needs, for every job, forward FLOPs per image, training (forward +
backward) FLOPs per image and the trainable parameter count. Building ViT-B per job would
take longer than planning itself, so each distinct (architecture, method settings) pair is
counted once with this suite's FLOP counter (`san.efficiency`: FlopCounterMode, fused
attention off, a grouped convolution's gradients counted per group) and stored in
`model_costs.json` beside this file. A pair missing from the table (a new backbone or
method setting) is counted when first asked for and kept for the process;
`python -m san.protocol.model_costs <san-sweep overrides>` adds a plan's pairs to the file.

Counting runs on PyTorch's meta device (shapes only: about a second for ViT-B, with the
same counts as real tensors; tests check both agree), and on the CPU with random weights
for a method whose construction needs real values (BOFT). Training FLOPs are counted on the
adapted model's real backward pass, so a frozen backbone's missing weight gradients (PEFT
about 2x forward, linear probing about 1x, full fine-tuning 3x) are measured, not assumed.
The head is counted at `REFERENCE_CLASSES` classes; its parameters scale per class, its
FLOPs (under 0.01% of a forward pass) are taken as counted.

Keys cover settings, not code: after changing how a method computes (SAN's training path
scaling inputs instead of weights took ViT-B/16 from 105 to 71 training GFLOPs per image),
delete its entries and run the command above again.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Mapping

from san.efficiency import count_adapted
from san.methods.base import UnsupportedBackboneError

TABLE_PATH = Path(__file__).with_name("model_costs.json")
REFERENCE_CLASSES = 100
# Backbone fields that change the architecture's shapes (weights, drop path and memory
# format do not change what is counted).
_ARCHITECTURE_FIELDS = ("timm_name", "input_size", "kwargs")


def cost_key(backbone: Mapping[str, Any], method: Mapping[str, Any]) -> str:
    """Identifies what was counted: the architecture and every method setting but its label."""
    subject = {
        "backbone": {k: backbone.get(k) for k in _ARCHITECTURE_FIELDS},
        "method": {k: v for k, v in method.items() if k != "label"},
    }
    return hashlib.sha256(json.dumps(subject, sort_keys=True).encode()).hexdigest()[:16]


def _count(backbone: Mapping[str, Any], method: Mapping[str, Any], device: str) -> dict[str, Any]:
    flops, adapted = count_adapted(backbone, method, REFERENCE_CLASSES, device)
    forward, train = flops["forward_flops_per_image"], flops["train_flops_per_image"]
    counts = adapted.parameter_counts()
    head = sum(p.numel() for p in adapted.head.parameters())
    return {
        "forward_flops": int(forward),
        "train_flops": int(train),
        "trainable_without_head": counts["trainable_without_head"],
        "head_trainable": counts["trainable"] > counts["trainable_without_head"],
        "head_params_per_class": head / REFERENCE_CLASSES,
        "counted_on": device,
    }


def measure(backbone: Mapping[str, Any], method: Mapping[str, Any]) -> dict[str, Any]:
    """One table entry: counts, or `unsupported` with the method's own error message."""
    entry: dict[str, Any] = {
        "backbone": backbone["name"],
        "timm_name": backbone["timm_name"],
        "input_size": backbone["input_size"],
        "method": method["name"],
        "settings": {k: v for k, v in method.items() if k != "label"},
    }
    try:
        entry.update(_count(backbone, method, "meta"))
    except UnsupportedBackboneError as error:
        entry["unsupported"] = str(error)
    except (NotImplementedError, RuntimeError):  # construction that reads values (BOFT's init)
        entry.update(_count(backbone, method, "cpu"))
    return entry


class ModelCosts:
    """The stored table plus whatever this process had to count."""

    def __init__(self, path: Path = TABLE_PATH):
        self.path = path
        stored = json.loads(path.read_text()) if path.is_file() else {"entries": {}}
        self.entries: dict[str, dict[str, Any]] = stored["entries"]
        self.counted_now: list[str] = []

    def get(self, backbone: Mapping[str, Any], method: Mapping[str, Any]) -> dict[str, Any]:
        key = cost_key(backbone, method)
        if key not in self.entries:
            self.entries[key] = measure(backbone, method)
            self.counted_now.append(key)
        return self.entries[key]

    def save(self) -> None:
        document = {
            "about": "FLOPs per image and trainable parameters per backbone x method setting, counted by "
            "san.protocol.model_costs (FlopCounterMode, fused attention off); keys: cost_key()",
            "reference_classes": REFERENCE_CLASSES,
            "entries": dict(sorted(self.entries.items(), key=lambda kv: (kv[1]["backbone"], kv[1]["method"], kv[0]))),
        }
        self.path.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Count every (backbone, method setting) a plan's jobs use and add them to the table."""
    from san.protocol.costs import plan_jobs_for_account
    from san.protocol.plan import Plan

    overrides = sys.argv[1:] if argv is None else argv
    plan = Plan(overrides)
    costs = ModelCosts()
    for job, _ in plan_jobs_for_account(plan):
        costs.get(job.config["backbone"], job.config["method"])
    costs.save()
    print(f"{len(costs.counted_now)} new entries, {len(costs.entries)} in {costs.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
