"""`san-params backbone=X method=Y [dataset=Z]`: parameter counts, no weights, no data.

Prints one JSON object as its last line. `san-params method=Y --describe` lists the
method's settings (the fields of its config dataclass) with their defaults and help.
"""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from san.cli.console import console_script
from san.config import compose_config

DESCRIBE_FLAG = "--describe"


def parameter_counts(overrides: list[str]) -> dict[str, int]:
    from san.backbones import create_backbone
    from san.methods.registry import build_method_from_config

    cfg = compose_config(overrides)
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    backbone["pretrained"] = False  # counting needs the architecture only
    model, _ = create_backbone(backbone, cfg.dataset.num_classes)
    adapted = build_method_from_config(model, OmegaConf.to_container(cfg.method, resolve=True))
    return adapted.parameter_counts()


def describe_method(overrides: list[str]) -> str:
    """The composed method's settings: the dataclass's help, with this composition's values."""
    from san.methods.registry import describe

    method = OmegaConf.to_container(compose_config(overrides).method, resolve=True)
    text = describe(method["name"])
    if method.get("label"):
        text = f"variant {method['label']} of " + text
    return text + "\ncomposed values: " + json.dumps(method)


@console_script("san-params")
def main(argv: list[str]) -> None:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return
    if DESCRIBE_FLAG in argv:
        print(describe_method([arg for arg in argv if arg != DESCRIBE_FLAG]))
        return
    print(json.dumps(parameter_counts(argv)))


if __name__ == "__main__":
    main()
