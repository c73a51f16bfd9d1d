"""Evaluating a final model on further test sets: the robustness sets of SSF's ImageNet-1K table.

A run asks with `protocol.extra_evaluations: [imagenet_a, imagenet_r, imagenet_c]` and carries
each named set's dataset config under `extra_datasets.<name>` (composed by the experiment:
configs/experiment/gic.yaml). Every set is read through the ordinary loaders and scored by the
trainer's evaluation (model EMA and data-parallel sharding included), as its dataset config says:

- `head_classes_file`: the set's classes are a subset of the model's head; only their logits
  compete (ImageNet-A/R, san.data.hendrycks.subset_correct);
- a test role listing several splits (ImageNet-C's `<corruption>/<severity>` folders) is
  evaluated split by split, and `split_summary` names how the per-split top-1 are summarised
  (`imagenet_c_mce`: Hendrycks & Dietterich's mCE and the unnormalised mean error).

Nothing is cached (`trainer.data_cache`): each image is read once. The results go to the
record's `metrics.extra_evaluations.<name>`, top-1 in percent as every metric of the record.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from san.data.hendrycks import imagenet_c_summary
from san.data.imagefolder import head_indices
from san.data.loaders import build_loader
from san.data.preprocessing import Preprocessing
from san.errors import ConfigError


def _imagenet_c_mce(per_split: Mapping[str, float]) -> dict[str, Any]:
    by_corruption: dict[str, dict[int, float]] = {}
    for split, top1 in per_split.items():
        corruption, _, severity = split.rpartition("/")
        if not corruption or not severity.isdigit():
            raise ConfigError(f"split_summary imagenet_c_mce reads <corruption>/<severity> splits; got {split!r}")
        by_corruption.setdefault(corruption, {})[int(severity)] = top1
    return imagenet_c_summary(by_corruption)


# dataset.split_summary: how per-split top-1 (percent) are summarised
SPLIT_SUMMARIES: dict[str, Callable[[Mapping[str, float]], dict[str, Any]]] = {"imagenet_c_mce": _imagenet_c_mce}


def extra_evaluation_sets(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The dataset configs `protocol.extra_evaluations` names, in its order (empty when off)."""
    names = list(config["protocol"].get("extra_evaluations") or [])
    if not names:
        return {}
    if config["protocol"]["evaluate"] != "test":
        raise ConfigError(
            f"protocol.extra_evaluations {names} evaluates test sets, which only a final run reads; this "
            f"run evaluates {config['protocol']['evaluate']!r}: set protocol=final or protocol.extra_evaluations=[]"
        )
    available = config.get("extra_datasets") or {}
    missing = [name for name in names if name not in available]
    if missing:
        raise ConfigError(
            f"protocol.extra_evaluations names {missing}, whose dataset configs are not in this run's "
            f"extra_datasets (it has {sorted(available)}); compose them as configs/experiment/gic.yaml does: "
            "`- /dataset@extra_datasets.<name>: <name>` in the experiment's defaults"
        )
    for name in names:
        summary = available[name].get("split_summary")
        if summary is not None and summary not in SPLIT_SUMMARIES:
            raise ConfigError(
                f"dataset {name!r}: unknown split_summary {summary!r}; accepted: {sorted(SPLIT_SUMMARIES)}"
            )
    return {name: dict(available[name]) for name in names}


def _evaluate(trainer, dataset: Mapping[str, Any], preprocessing, loader_options, shard, indices) -> dict[str, Any]:
    loader = build_loader(
        dataset,
        "test",
        preprocessing,
        train=False,
        batch_size=trainer.cfg["eval_batch_size"],
        shard=shard,
        **{**loader_options, "cache_dir": None},
    )
    return trainer.evaluate(loader, trainer.cfg["limit_eval_batches"], indices)


def evaluate_extra_sets(
    trainer,
    datasets: Mapping[str, Mapping[str, Any]],
    preprocessing: Preprocessing,
    loader_options: Mapping[str, Any],
    shard: tuple[int, int] = (0, 1),
) -> dict[str, dict[str, Any]]:
    """{name: {"top1", "loss", "images"}} per set; a set of several splits: {"per_split": {split:
    top1}, "images"} and its `split_summary`'s figures ({"mce", "mean_error", ...} for ImageNet-C)."""
    results = {}
    for name, dataset in datasets.items():
        indices = head_indices(dataset)
        splits = dataset["splits"]["test"]
        if isinstance(splits, str) or dataset.get("split_summary") is None:
            results[name] = _evaluate(trainer, dataset, preprocessing, loader_options, shard, indices)
            continue
        per_split, images = {}, 0
        for split in splits:
            metrics = _evaluate(
                trainer, {**dataset, "splits": {"test": split}}, preprocessing, loader_options, shard, indices
            )
            per_split[split] = metrics["top1"]
            images += metrics["images"]
        summary = SPLIT_SUMMARIES[dataset["split_summary"]](per_split)
        results[name] = {**summary, "per_split": per_split, "images": images}
    return results
