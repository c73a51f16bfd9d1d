"""`san-prepare weights`: fetch the pretrained checkpoints the experiments use into the hub cache.

For every real pretrained backbone in configs/backbone/ (`weights: timm_hub`,
`pretrained: true`; the tiny test models train from random weights and EfficientNet-Lite0's
weights come with a Python package), the file that timm loads for the pinned `arch.tag`
goes into the Hugging Face hub cache ($HF_HUB_CACHE, by default $HF_HOME/hub, or --out),
and its size and sha256 are printed. Run it on a machine that reaches the hub (a login
node), copy the cache to the machines that do not, and set HF_HUB_CACHE to the copy there
(or HF_HOME to its parent): timm then loads from it, also with HF_HUB_OFFLINE=1. With
HF_HUB_OFFLINE=1 it only checks what the cache already holds.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from san.errors import ConfigError

# What timm's hub loader (timm.models._hub.load_state_dict_from_hf) tries for a hub id without
# its own file name, in its order: the safetensors file, then the pickled state dict.
TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class PinnedWeights:
    backbone: str  # the config name (configs/backbone/<backbone>.yaml)
    timm_name: str  # the pinned arch.tag
    repo_id: str
    revision: str | None
    filenames: tuple[str, ...]  # candidates, in timm's order


def pinned_weights(config_dir: str | Path) -> list[PinnedWeights]:
    """Every backbone config whose weights come from the hub through timm's pinned arch.tag."""
    import timm

    pinned = []
    for path in sorted(Path(config_dir, "backbone").glob("*.yaml")):
        node = OmegaConf.load(path)
        if node.get("weights", "timm_hub") != "timm_hub" or not node.get("pretrained", True):
            continue
        pretrained_cfg = timm.models.get_pretrained_cfg(node.timm_name)
        hub_id = getattr(pretrained_cfg, "hf_hub_id", None)
        if not hub_id:
            raise ConfigError(
                f"{path}: timm has no hub weights for {node.timm_name!r}; pin an arch.tag that "
                "timm.list_pretrained() lists, or use backbone.checkpoint_path"
            )
        repo_id, _, revision = hub_id.partition("@")
        own_file = getattr(pretrained_cfg, "hf_hub_filename", None)
        pinned.append(
            PinnedWeights(
                node.name, node.timm_name, repo_id, revision or None, (own_file,) if own_file else TIMM_HUB_FILES
            )
        )
    return pinned


def hub_unreachable() -> str | None:
    """Why the hub cannot be asked (HF_HUB_OFFLINE=1, or the connection error); None when it answers.

    Asked once, briefly: the hub client retries a refused connection with backoff for each file."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1"
    try:
        get_session().head(constants.ENDPOINT, timeout=10)
    except Exception as error:  # whatever the transport raises: DNS, refused, timeout, TLS, proxy
        return f"the hub ({constants.ENDPOINT}) is unreachable from here: {type(error).__name__}: {error}"
    return None


def cached(weights: PinnedWeights, cache_dir: str) -> Path | None:
    """The file timm would load for `weights` if the cache holds it; no network."""
    from huggingface_hub import try_to_load_from_cache

    for filename in weights.filenames:
        found = try_to_load_from_cache(weights.repo_id, filename, cache_dir=cache_dir, revision=weights.revision)
        if isinstance(found, str):  # else None or a marker that the hub has no such file
            return Path(found)
    return None


def download(weights: PinnedWeights, cache_dir: str) -> Path:
    """The file timm would load for `weights`, downloaded into the cache unless it is there."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for filename in weights.filenames[:-1]:
        try:
            return Path(hf_hub_download(weights.repo_id, filename, revision=weights.revision, cache_dir=cache_dir))
        except EntryNotFoundError:  # the repo has no such file: try the next, as timm does
            continue
    return Path(hf_hub_download(weights.repo_id, weights.filenames[-1], revision=weights.revision, cache_dir=cache_dir))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backbones",
        nargs="*",
        default=None,
        metavar="NAME",
        help="backbone config names (default: every pretrained one in configs/backbone/)",
    )
    parser.add_argument(
        "--out", default=None, help="hub cache folder to fill (default: $HF_HUB_CACHE, i.e. $HF_HOME/hub)"
    )


def run(args: argparse.Namespace) -> None:
    from huggingface_hub import constants

    from san.backbones import WeightsUnavailableError, file_sha256
    from san.config import config_dir

    pinned = pinned_weights(config_dir())
    if args.backbones:
        known = {w.backbone: w for w in pinned}
        unknown = sorted(set(args.backbones) - set(known))
        if unknown:
            raise ConfigError(
                f"no pretrained hub weights to fetch for {unknown}; accepted: {sorted(known)} "
                "(e.g. san-prepare weights --backbones vit_b16_in21k)"
            )
        pinned = [known[name] for name in args.backbones]
    cache = str(Path(args.out).expanduser().resolve()) if args.out else constants.HF_HUB_CACHE
    unreachable = hub_unreachable()
    if unreachable:
        print(f"{unreachable}: checking the cache only", flush=True)
    problems = []
    for weights in pinned:
        target = f"{weights.backbone} ({weights.repo_id}: {' or '.join(weights.filenames)})"
        problem = f"{target}: not in the cache"
        try:
            path = cached(weights, cache) if unreachable else download(weights, cache)
        except Exception as error:  # reported with the others at the end; the rest are still fetched
            path, problem = None, f"{target}: {type(error).__name__}: {error}"
        if path is None:
            problems.append(problem)
            print(f"MISSING {weights.backbone:22} {weights.repo_id}", flush=True)
            continue
        print(
            f"OK      {weights.backbone:22} {weights.repo_id}/{path.name}  {path.stat().st_size / 2**20:,.1f} MiB  "
            f"sha256 {file_sha256(path)}  {path}",
            flush=True,
        )
    print(f"hub cache: {cache}")
    if problems:
        listed = "\n  ".join(problems)
        raise WeightsUnavailableError(
            f"{len(problems)} of {len(pinned)} checkpoint(s) could not be fetched"
            f"{f' ({unreachable})' if unreachable else ''}:\n  {listed}\n"
            "Run `make weights` (san-prepare weights) on a machine that reaches the hub, without "
            "HF_HUB_OFFLINE=1 (behind a proxy: set HTTPS_PROXY), then copy its hub cache here and set "
            "HF_HUB_CACHE to the copy."
        )
    print(
        f"to use it on another machine: copy {cache} there and set HF_HUB_CACHE=<the copy> "
        "(HF_HUB_OFFLINE=1 works then)"
    )
