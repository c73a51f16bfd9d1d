"""`san-bench`: speed and memory, measured side by side in one process, as ratios.

For each backbone x method: training images/s and peak memory of this suite's training
step (cached uint8 data on the device, channels_last for convnets, bf16 autocast and
fused AdamW on a GPU); inference images/s of the unmerged model, the merged model and
the plain backbone; FLOPs per image (fused attention off, so attention is counted). Then
the data path (decoded-split cache vs per-step PIL decoding) and the same training step
through a reference-style pipeline (per-step PIL decode in DataLoader workers, float32,
default memory format), so the speed-up is a ratio taken on the same machine in the same
run. Absolute numbers are only meaningful on a GPU; on a CPU read the ratios.

`--imagefolder` adds the full-data path (ImageNet-1K, CIFAR-100 of the GIC suite): images/s
through the very DataLoader a run builds for an ImageFolder split (JPEG decode and the
random-resized crop in worker processes, pinned memory on a GPU, persistent workers, prefetch),
which is what feeds the GPU when a split is too large to cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from san.atomic import atomic_write_bytes
from san.backbones import backbone_data_config, create_backbone
from san.cli.console import console_script
from san.config import compose_config
from san.data.cache import TensorLoader, decode_split
from san.data.imagefolder import list_split
from san.data.loaders import build_loader
from san.data.preprocessing import Preprocessing
from san.data.splits import Example, read_split
from san.data.transforms import ImageListDataset, build_transform
from san.efficiency import model_flop_utilisation, peak_tflops, run_flops
from san.methods.base import NotMergeableError, UnsupportedBackboneError
from san.methods.registry import build_method_from_config
from san.provenance import environment
from san.trainer import Trainer, build_optimizer, resolve_device, resolve_precision

# One method's VTAB-1K protocol: 19 tasks x (8 grid points on 800 images + 3 final seeds on
# 1,000 images) x 110 epochs.
VTAB_IMAGE_STEPS = 19 * (8 * 800 + 3 * 1000) * 110


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(function, iterations: int, warmup: int, device: torch.device, repeats: int = 3) -> float:
    """Seconds per call: the best of `repeats` timed runs (the least disturbed by other load)."""
    for _ in range(warmup):
        function()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        for _ in range(iterations):
            function()
        _sync(device)
        best = min(best, (time.perf_counter() - started) / iterations)
    return best


def _config(backbone: str, method: str, input_size: int | None) -> dict[str, Any]:
    overrides = [f"backbone={backbone}", f"method={method}"] + (
        [f"backbone.input_size={input_size}"] if input_size else []
    )
    config = OmegaConf.to_container(compose_config(overrides), resolve=True)
    config["backbone"].update(pretrained=False, checkpoint_path=None)  # speed does not depend on weights
    return config


def _build(config: dict[str, Any], device: torch.device, channels_last: bool):
    model, _ = create_backbone(config["backbone"], 10)
    adapted = build_method_from_config(model, config["method"])
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    adapted.model.to(device, memory_format=memory_format)
    return adapted, memory_format


def train_step_images_per_s(
    config, device, batch_size, steps, warmup, *, channels_last, precision, compile_step: bool = False
) -> tuple[float, int | None]:
    """Images/s of the Trainer's own `train_step` (the code path a run takes) on uint8
    batches already on the device, as the decoded-split cache serves them."""
    import tempfile

    adapted, _ = _build(config, device, channels_last)
    preprocessing = backbone_data_config(adapted.model, config["backbone"])
    size = preprocessing.input_size
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    trainer_cfg = dict(
        config["trainer"],
        device=str(device),
        precision={None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[precision],
    )
    if compile_step:
        trainer_cfg["compile"] = True
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(
            adapted, preprocessing, trainer_cfg, config["optim"], 0, Path(run_dir), "bench", channels_last=channels_last
        )
        adapted.set_train_mode(True)
        seconds = _timed(lambda: trainer.train_step(images, labels), steps, warmup, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return batch_size / seconds, peak


def _concurrent_worker(args) -> float:
    config, device_name, batch_size, steps, warmup, channels_last, threads = args
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device_name)
    images_per_s, _ = train_step_images_per_s(
        config,
        device,
        batch_size,
        steps,
        warmup,
        channels_last=channels_last,
        precision=resolve_precision("auto", device),
    )
    return images_per_s


def concurrent_runs_images_per_s(config, device, batch_size, steps, warmup, channels_last, runs: int) -> dict:
    """Total training images/s of `runs` processes sharing one device, vs one process alone.

    VTAB-1K runs at batch 64 rarely fill a GPU; this says whether the sweep should place
    several on one device (launcher=local_parallel launcher.runs_per_device=K)."""
    import concurrent.futures
    import multiprocessing

    threads = max(1, torch.get_num_threads() // runs) if device.type == "cpu" else 0
    job = (config, str(device), batch_size, steps, warmup, channels_last, threads)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        single = pool.submit(_concurrent_worker, job[:-1] + (0,)).result()
    with concurrent.futures.ProcessPoolExecutor(runs, mp_context=context) as pool:
        together = sum(pool.map(_concurrent_worker, [job] * runs))
    return {
        "runs": runs,
        "single_images_per_s": single,
        "concurrent_total_images_per_s": together,
        "gain": together / single,
    }


def inference_images_per_s(model, device, batch_size, size, steps, warmup, precision, memory_format) -> float:
    model.eval()
    x = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=memory_format)
    autocast = torch.autocast(device.type, dtype=precision) if precision else contextlib.nullcontext()

    @torch.no_grad()
    def forward():
        with autocast:
            model(x)

    return batch_size / _timed(forward, steps, warmup, device)


def _train_examples(task_dir: Path) -> list[Example]:
    """The train800 split of a VTAB-format task folder."""
    dataset = {
        "name": task_dir.name,
        "format": "vtab_folder",
        "root": str(task_dir.parent),
        "folder": task_dir.name,
        "num_classes": 10,
        "splits": {"train": "train800"},
    }
    return read_split(dataset, "train")


def reference_pipeline_images_per_s(config, device, task_dir: Path, batch_size: int, steps: int, workers: int) -> float:
    """The usual research-code step: PIL decode + resize per step in DataLoader workers, float32."""
    adapted, _ = _build(config, device, channels_last=False)
    preprocessing = backbone_data_config(adapted.model, config["backbone"])
    transform = build_transform("resize", preprocessing.input_size, preprocessing.interpolation, True)
    loader = torch.utils.data.DataLoader(
        ImageListDataset(_train_examples(task_dir), transform),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
    )
    optimizer = build_optimizer(adapted, config["optim"], device)
    adapted.set_train_mode(True)
    seen, started = 0, None
    for index, (images, labels) in enumerate(loader):
        if index == 1:  # the first batch pays for worker start-up
            _sync(device)
            started, seen = time.perf_counter(), 0
        x = (images.to(device).float() - 127.5) / 127.5
        loss = F.cross_entropy(adapted.model(x), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += labels.numel()
        if index >= steps:
            break
    _sync(device)
    return seen / (time.perf_counter() - started)


def data_path_images_per_s(task_dir: Path, size: int, batch_size: int, workers: int) -> dict[str, float]:
    examples = _train_examples(task_dir)
    transform = build_transform("resize", size, "bicubic", True)
    loader = torch.utils.data.DataLoader(
        ImageListDataset(examples, transform), batch_size=batch_size, shuffle=True, num_workers=workers
    )
    started = time.perf_counter()
    count = sum(labels.numel() for _, labels in loader)
    per_step_decode = count / (time.perf_counter() - started)
    images, labels = decode_split(examples, transform, progress=False)
    cached = TensorLoader(images, labels, batch_size, shuffle=True)
    started = time.perf_counter()
    count = sum(batch_labels.numel() for _, batch_labels in cached)
    return {"pil_dataloader": per_step_decode, "cached_tensor": count / (time.perf_counter() - started)}


# An ImageNet-like stand-in for `--imagefolder tiny`: ImageNet's training JPEGs average about
# 400 x 350 pixels (ILSVRC-2012 train, ~110 KB each); 8 classes x 48 images.
TINY_IMAGEFOLDER = {"classes": 8, "per_class": 48, "size": (400, 350)}


def write_tiny_imagefolder(folder: Path) -> Path:
    """`folder/<wnid>/<wnid>_<i>.JPEG` of ImageNet-sized noise images (the layout timm reads)."""
    from san.testing.imagenet_releases import wnids, write_class_folders

    return write_class_folders(
        folder, wnids(TINY_IMAGEFOLDER["classes"]), TINY_IMAGEFOLDER["per_class"], size=TINY_IMAGEFOLDER["size"]
    )


def imagefolder_images_per_s(
    folder: Path, size: int, batch_size: int, workers: int | str, device: torch.device, batches: int
) -> dict[str, Any]:
    """Images/s through the loader `san.run` builds for an ImageFolder training split (san.data.loaders:
    random-resized crop and flip, workers, pinned memory on a GPU, persistent workers), each batch
    copied to the device as the trainer copies it. The first batch (worker start-up) is not timed;
    a second pass shows the persistent workers' epoch start."""
    dataset = {
        "name": "bench_imagefolder",
        "format": "imagefolder",
        "root": str(folder.parent),
        "folder": folder.name,
        "split_dirs": {"train": "."},
        "splits": {"train": "train"},
        "classes_file": None,  # the sorted class folders, as torchvision's ImageFolder
        "num_classes": len(list_split(folder).classes),
        "transform": "random_resized_crop_flip",
    }
    preprocessing = Preprocessing(input_size=size, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")
    pin_memory = device.type == "cuda"
    loader = build_loader(
        dataset, "train", preprocessing, train=True, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory
    )
    loader.generator.manual_seed(0)
    timed = []
    for _ in range(2):  # two epochs: the second starts with the workers already running
        seen, started = 0, None
        for index, (images, labels) in enumerate(loader):
            images.to(device, non_blocking=True)
            if index == 0:
                _sync(device)
                started = time.perf_counter()
                continue
            seen += labels.numel()
            if index >= batches:
                break
        _sync(device)
        timed.append(seen / (time.perf_counter() - started) if seen else None)
    return {
        "folder": str(folder),
        "images": len(loader.dataset),
        "input_size": size,
        "batch_size": batch_size,
        "workers": loader.num_workers,
        "pin_memory": pin_memory,
        "persistent_workers": loader.persistent_workers,
        "images_per_s": timed[0],
        "images_per_s_second_epoch": timed[1],
    }


def run_bench(
    backbones: list[str],
    methods: list[str],
    batch_size: int,
    steps: int,
    warmup: int,
    input_size: int | None,
    task_dir: Path | None,
    workers: int,
    device_name: str = "auto",
    concurrent_runs: int = 0,
    compile_step: bool = False,
    imagefolder: Path | None = None,
    imagefolder_workers: int | str = "auto",
    imagefolder_batches: int = 20,
) -> dict:
    device = resolve_device(device_name)
    precision = resolve_precision("auto", device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    results: dict[str, Any] = {
        "device": device_name or f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "peak_bf16_tflops": peak_tflops(device_name) if device_name else None,
        "precision": str(precision or "float32"),
        "batch_size": batch_size,
        "steps": steps,
        "compile": compile_step,
        "env": environment(),
        "rows": [],
    }
    for backbone in backbones:
        for method in methods:
            config = _config(backbone, method, input_size)
            channels_last = bool(config["backbone"].get("channels_last"))
            row: dict[str, Any] = {"backbone": backbone, "method": method}
            try:
                row["train_images_per_s"], row["peak_train_memory_bytes"] = train_step_images_per_s(
                    config,
                    device,
                    batch_size,
                    steps,
                    warmup,
                    channels_last=channels_last,
                    precision=precision,
                    compile_step=compile_step,
                )
            except UnsupportedBackboneError as error:
                row["unsupported"] = str(error)
                results["rows"].append(row)
                continue
            adapted, memory_format = _build(config, device, channels_last)
            size = backbone_data_config(adapted.model, config["backbone"]).input_size
            row["input_size"] = size
            row["params_trainable_without_head"] = adapted.parameter_counts()["trainable_without_head"]
            counted = run_flops({**config, "dataset": {"num_classes": 10}})
            row["gflops_per_image"] = counted["forward_flops_per_image"] / 1e9
            row["train_gflops_per_image"] = counted["train_flops_per_image"] / 1e9
            measure = dict(
                device=device,
                batch_size=batch_size,
                size=size,
                steps=steps,
                warmup=warmup,
                precision=precision,
                memory_format=memory_format,
            )
            row["inference_unmerged"] = inference_images_per_s(adapted.model, **measure)
            try:
                # merging writes new weight tensors: put them back in the layout the plain model uses
                merged = adapted.merge().to(device, memory_format=memory_format)
                row["inference_merged"] = inference_images_per_s(merged, **measure)
            except NotMergeableError:
                row["inference_merged"] = None
            plain, _ = _build(_config(backbone, "linear", input_size), device, channels_last)
            row["inference_plain"] = inference_images_per_s(plain.model, **measure)
            row["merged_vs_plain"] = (
                row["inference_merged"] / row["inference_plain"] if row["inference_merged"] else None
            )
            # this method's counted forward + backward FLOPs, not 3x forward for every method
            row["model_flop_utilisation"] = model_flop_utilisation(
                counted["train_flops_per_image"], row["train_images_per_s"], device_name or ""
            )
            row["extrapolated_vtab_sweep_hours"] = VTAB_IMAGE_STEPS / row["train_images_per_s"] / 3600
            if task_dir is not None:
                reference = reference_pipeline_images_per_s(config, device, task_dir, batch_size, steps, workers)
                row["reference_pipeline_images_per_s"] = reference
                row["speedup_vs_reference"] = row["train_images_per_s"] / reference
            results["rows"].append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    if concurrent_runs > 1:
        first = next(row for row in results["rows"] if "input_size" in row)
        config = _config(first["backbone"], first["method"], input_size)
        results["concurrent"] = {
            "backbone": first["backbone"],
            "method": first["method"],
            **concurrent_runs_images_per_s(
                config,
                device,
                batch_size,
                steps,
                warmup,
                bool(config["backbone"].get("channels_last")),
                concurrent_runs,
            ),
        }
    # The data paths read images at the size the rows trained at (224 without rows).
    measured = [row["input_size"] for row in results["rows"] if "input_size" in row]
    size = input_size or (measured[0] if measured else 224)
    if task_dir is not None:
        results["data_path"] = data_path_images_per_s(task_dir, size, batch_size, workers)
        results["data_path"]["input_size"] = size
    if imagefolder is not None:
        results["imagefolder_data_path"] = imagefolder_images_per_s(
            imagefolder,
            size,
            batch_size,
            imagefolder_workers,
            device,
            imagefolder_batches,
        )
    return results


def to_markdown(results: dict) -> str:
    def number(value, digits=1):
        return "—" if value is None else f"{value:,.{digits}f}"

    lines = [
        f"Device: {results['device']}; precision {results['precision']}; batch {results['batch_size']}.",
        "",
        "| backbone | method | params (M) | GFLOPs/img | train GFLOPs/img | train img/s | peak train mem (GiB) | "
        "infer unmerged | infer merged | infer plain | merged/plain | reference img/s | speed-up | MFU | "
        "VTAB sweep (h, extrapolated) |",
        "|---|---|" + "---:|" * 13,
    ]
    for row in results["rows"]:
        if "unsupported" in row:
            lines.append(f"| {row['backbone']} | {row['method']} | unsupported |" + " |" * 12)
            continue
        memory = row["peak_train_memory_bytes"]
        lines.append(
            f"| {row['backbone']} | {row['method']} | {row['params_trainable_without_head'] / 1e6:.3f} | "
            f"{number(row['gflops_per_image'], 3)} | {number(row['train_gflops_per_image'], 3)} | "
            f"{number(row['train_images_per_s'])} | "
            f"{number(memory / 2**30 if memory else None, 2)} | {number(row['inference_unmerged'])} | "
            f"{number(row['inference_merged'])} | {number(row['inference_plain'])} | "
            f"{number(row['merged_vs_plain'], 3)} | "
            f"{number(row.get('reference_pipeline_images_per_s'))} | {number(row.get('speedup_vs_reference'), 2)} | "
            f"{number(row['model_flop_utilisation'], 3)} | {number(row['extrapolated_vtab_sweep_hours'], 1)} |"
        )
    if "data_path" in results:
        data = results["data_path"]
        lines += [
            "",
            f"Data path at {data['input_size']} px: cached tensor {data['cached_tensor']:,.0f} img/s vs "
            f"per-step PIL decode {data['pil_dataloader']:,.0f} img/s "
            f"({data['cached_tensor'] / data['pil_dataloader']:.1f}x).",
        ]
    if "imagefolder_data_path" in results:
        data = results["imagefolder_data_path"]
        lines += [
            "",
            f"ImageFolder data path (the run's DataLoader: JPEG decode + random-resized crop at "
            f"{data['input_size']} px in {data['workers']} workers, pinned memory {data['pin_memory']}, "
            f"persistent workers {data['persistent_workers']}; batch {data['batch_size']}): "
            f"{number(data['images_per_s'], 0)} img/s "
            f"(second epoch {number(data['images_per_s_second_epoch'], 0)} img/s), {data['folder']}.",
        ]
    if "concurrent" in results:
        c = results["concurrent"]
        lines += [
            "",
            f"Several runs on one device ({c['backbone']} x {c['method']}): {c['runs']} processes together "
            f"{c['concurrent_total_images_per_s']:,.0f} img/s vs one alone {c['single_images_per_s']:,.0f} img/s "
            f"({c['gain']:.2f}x).",
        ]
    lines += [
        "",
        "Peak memory is measured on a GPU only (torch.cuda.max_memory_allocated). The reference pipeline decodes "
        "PNGs with PIL in DataLoader workers at every step and trains in float32 without channels_last. "
        "Train GFLOPs are counted per method (one forward + backward through its trainable set, "
        "FlopCounterMode); MFU = train GFLOPs x img/s / the device's dense bf16 peak "
        + (
            f"({results['peak_bf16_tflops']} TFLOP/s)."
            if results.get("peak_bf16_tflops")
            else "(not known for this device: MFU left empty)."
        )
        + (" The training step ran under torch.compile." if results.get("compile") else ""),
    ]
    return "\n".join(lines) + "\n"


@console_script("san-bench", overrides=False)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="san-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", nargs="+", default=["test_vit", "effnet_lite0"])
    parser.add_argument("--methods", nargs="+", default=["linear", "bitfit", "ssf", "san", "lora", "full"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--input-size", type=int, default=None, help="override the backbones' input size")
    parser.add_argument(
        "--task",
        type=Path,
        default=Path("data/demo/digits"),
        help="a VTAB-format task for the data-path and reference-pipeline measurements",
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference pipeline")
    parser.add_argument(
        "--concurrent", type=int, default=2, help="also time this many training processes sharing the device (0: skip)"
    )
    parser.add_argument("--compile", action="store_true", help="time the training step under torch.compile")
    parser.add_argument(
        "--imagefolder",
        default=None,
        help="also time the ImageFolder training loader on this class-folder tree (e.g. data/gic/imagenet1k/train), "
        "or on a generated ImageNet-sized one: --imagefolder tiny",
    )
    parser.add_argument(
        "--imagefolder-workers", default="auto", help="its DataLoader workers (auto: as trainer.num_workers=auto)"
    )
    parser.add_argument("--imagefolder-batches", type=int, default=20, help="batches timed per epoch")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    task = args.task if (args.task / "train800.txt").is_file() else None
    if task is None:
        print(f"no task at {args.task} (make data-demo): skipping the data-path and reference measurements")
    with contextlib.ExitStack() as stack:
        imagefolder = None if args.imagefolder is None else Path(args.imagefolder)
        if args.imagefolder == "tiny":
            imagefolder = write_tiny_imagefolder(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "train")
        workers = args.imagefolder_workers if args.imagefolder_workers == "auto" else int(args.imagefolder_workers)
        results = run_bench(
            args.backbones,
            args.methods,
            args.batch_size,
            args.steps,
            args.warmup,
            args.input_size,
            task,
            args.workers,
            concurrent_runs=args.concurrent,
            compile_step=args.compile,
            imagefolder=imagefolder,
            imagefolder_workers=workers,
            imagefolder_batches=args.imagefolder_batches,
        )
    stem = args.out / time.strftime("bench-%Y%m%d-%H%M%S")
    atomic_write_bytes(stem.with_suffix(".json"), (json.dumps(results, indent=2, default=str) + "\n").encode())
    table = to_markdown(results)
    atomic_write_bytes(stem.with_suffix(".md"), table.encode())
    print(table)
    print(f"written: {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
