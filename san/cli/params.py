"""`san-params backbone=X method=Y [dataset=Z]`: parameter counts, no weights, no data.

Prints one JSON object as its last line.
"""

from __future__ import annotations

import json

from omegaconf import OmegaConf

import san  # noqa: F401  (registers every method)
from san.backbones import create_backbone
from san.config import compose_config
from san.cli.console import console_script
from san.methods.registry import build_method_from_config


def parameter_counts(overrides: list[str]) -> dict[str, int]:
    cfg = compose_config(overrides)
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    backbone["pretrained"] = False  # counting needs the architecture only
    model, _ = create_backbone(backbone, cfg.dataset.num_classes)
    peft = build_method_from_config(model, OmegaConf.to_container(cfg.method, resolve=True))
    return peft.parameter_counts()


@console_script("san-params")
def main(argv: list[str]) -> None:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return
    print(json.dumps(parameter_counts(argv)))


if __name__ == "__main__":
    main()
