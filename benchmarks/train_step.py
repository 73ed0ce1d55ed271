"""One training step on one device: images/s and peak memory; ours, with the MSDA reference, and the official.

    python benchmarks/train_step.py [--models dino_r50_4scale dino_swinl_4scale] [--sizes 800x1333 1200x2000]
        [--precision bf16] [--checkpointing off backbone] [--msda fused reference] [--iters 10] [--warmup 3]
        [--boxes 20] [--device cuda] [--engine plain|deepspeed] [--official DIR] [--json FILE] [--profile K]

    # CPU smoke run (checks the script, measures nothing worth comparing):
    python benchmarks/train_step.py --device cpu --models debug --sizes 128x160 --precision fp32 \\
        --checkpointing off backbone all --msda reference fused --iters 3 --warmup 1

One image per step (batch 1, the paper's recipe per GPU), random weights, a random normalised image of the
given size and ``--boxes`` random boxes. "ours" is the training stage's step (``pipeline.train.step``: crowd
filter, copy, box count, forward + loss under autocast, one finiteness read, backward, clipping 0.1, AdamW
with the recipe's parameter groups) for each ``--msda`` implementation (``fused``: the kernels package's op,
``reference``: the pure-PyTorch spec). ``--engine deepspeed`` runs the same step through the stage's
DeepSpeed engine at ZeRO-2 in one process (the per-rank work of a multi-GPU run; a single-rank stage
runs at stage 0, see ``effective_zero_stage``), where DeepSpeed is installed; ``plain`` uses torch's AdamW and
``clip_grad_norm_`` directly (needs torch, timm and this repository only). ``--precision bf16`` is
autocast bf16 with fp32 weights (the stage's ``bf16``); ``fp16`` is autocast fp16 with a GradScaler.

``--official DIR``: the official DINO repository (fetched to a scratch folder, never committed). Its step
is its own ``engine.train_one_epoch`` over the same synthetic batch (fp16 AMP as its ``--amp``, clipping
0.1, its per-step loss reduction and ``.item()`` logging), with its CUDA MSDA kernel built from
``DIR/models/dino/ops`` (patched for current PyTorch by ``kernels.bench``). GPU only: its denoising code
calls ``.cuda()`` unconditionally, so the CPU smoke run skips it.
``--profile K`` also profiles three of our steps per configuration (``torch.profiler``) and prints the K
operators that took the most device time (CPU time on the CPU), and each one's share of the step.
``--checkpointing``: ``off``; ``backbone`` (the training presets' setting, and what the official
``use_checkpoint`` does: block by block in the backbone; the official step runs with it for both this and
``all``); ``all`` (backbone, encoder and decoder). Reference figures measured on 2026-11-24 on an H100
(fp16 AMP): R50 4-scale 4.0-4.2 img/s, 3.9 GiB; Swin-L 4-scale with checkpointing 2.2-2.7 img/s, 6.6 GiB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import types
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from dino_core.builder import build_criterion, build_dino
from dino_core.presets import preset
from pipeline.data.collate import Batch
from pipeline.train.config import DeepSpeedConfig, TrainConfig
from pipeline.train.optim import group_rules, parameter_groups
from pipeline.train.reporting import memory_gib
from pipeline.train.step import (
    LossMeter,
    TrainModule,
    all_finite,
    global_num_boxes,
    loss_term_names,
    stack_terms,
    to_device,
    training_targets,
)

REPO = Path(__file__).resolve().parent.parent
OFFICIAL_CONFIGS = {"dino_r50_4scale": "DINO_4scale.py", "dino_swinl_4scale": "DINO_4scale_swin.py"}


def synthetic_batch(height: int, width: int, boxes: int, num_classes: int, seed: int = 0) -> Batch:
    """A normalised random image and ``boxes`` random boxes (cxcywh in [0.1, 0.9], sides 0.05-0.4)."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.3 + 0.4 * torch.rand(boxes, 2, generator=g)
    sides = 0.05 + 0.35 * torch.rand(boxes, 2, generator=g)
    target = {
        "boxes": torch.cat([centres, sides], 1),
        "labels": torch.randint(1, num_classes, (boxes,), generator=g),
        "iscrowd": torch.zeros(boxes, dtype=torch.bool),
    }
    return Batch(
        torch.randn(1, 3, height, width, generator=g),
        torch.tensor([[height, width]]),
        [target],
        torch.tensor([1]),
        torch.tensor([[height, width]]),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[], None], device: torch.device, iters: int, warmup: int) -> dict[str, Any]:
    """Warm up, then time ``iters`` steps: images/s over the timed steps and the peak memory during them."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {
        "images_per_s": len(times) / sum(times),
        "best_step_s": min(times),
        "median_step_s": sorted(times)[len(times) // 2],
        "peak_memory_gib": memory_gib(device),
    }


def profile_table(step: Callable[[], None], device: torch.device, rows: int, steps: int = 3) -> str:
    """The ``rows`` operators with the most self time on ``device`` over ``steps`` calls of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)


def our_step(
    name: str, batch: Batch, precision: str, checkpointing: str, msda: str, device: torch.device, engine: str
) -> Callable[[], None]:
    """The training stage's step for preset ``name`` (see the module docstring)."""
    cfg = replace(preset(name), msda=msda)
    torch.manual_seed(0)
    model = build_dino(cfg)
    model.set_activation_checkpointing(
        backbone=checkpointing != "off", encoder=checkpointing == "all", decoder=checkpointing == "all"
    )
    train = TrainConfig(clip_max_norm=0.1)
    groups, _ = parameter_groups(model, group_rules(train), train.weight_decay)
    optimizer = torch.optim.AdamW(
        [g.as_torch() for g in groups],
        lr=train.lr,
        weight_decay=train.weight_decay,
        fused=device.type == "cuda",
    )
    module = TrainModule(model, build_criterion(cfg)).to(device)
    names = loss_term_names(cfg)
    meter = LossMeter(names)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if engine == "deepspeed":
        return _deepspeed_step(module, optimizer, batch, precision, names, meter, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        targets, count = training_targets(batch)
        images, sizes, targets = to_device(batch, targets, device, torch.float32)
        num_boxes = global_num_boxes(count, device)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            terms = module(images, sizes, targets, num_boxes)
        vector = stack_terms(terms, names)
        if not all_finite(terms["loss"]):
            raise RuntimeError("non-finite loss in the benchmark")
        scaler.scale(terms["loss"]).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, train.clip_max_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        meter.add(vector)

    return step


def _deepspeed_step(
    module: TrainModule,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    precision: str,
    names: list[str],
    meter: LossMeter,
    device: torch.device,
) -> Callable[[], None]:
    from pipeline.launch import free_port
    from pipeline.train.engine import Engine, deepspeed_config, init_distributed

    if not torch.distributed.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        init_distributed()
    engine = Engine(
        module, optimizer, deepspeed_config(DeepSpeedConfig(), TrainConfig(), precision), precision
    )

    def step() -> None:
        targets, count = training_targets(batch)
        images, sizes, targets = to_device(batch, targets, device, engine.input_dtype)
        terms = engine(images, sizes, targets, global_num_boxes(count, device))
        vector = stack_terms(terms, names)
        if not all_finite(terms["loss"]):
            raise RuntimeError("non-finite loss in the benchmark")
        engine.backward(terms["loss"])
        engine.step()
        meter.add(vector)

    return step


def official_step(
    official: Path, name: str, batch: Batch, checkpointing: bool, device: torch.device, iters: int
) -> Callable[[], None]:
    """The official code's training step (its ``train_one_epoch`` over ``iters`` copies of the batch)."""
    sys.path.insert(0, str(official))
    for missing in ("addict", "yapf", "yapf.yapflib", "yapf.yapflib.yapf_api"):  # its config parser only
        sys.modules.setdefault(missing, types.SimpleNamespace(Dict=dict, FormatCode=None))
    from kernels.bench import build_official

    sys.modules["MultiScaleDeformableAttention"] = build_official(official / "models" / "dino" / "ops")
    import util.misc as misc

    misc.is_main_process = lambda: False  # no torchvision weight download for its ResNet
    import engine as official_engine
    from models.dino.dino import build_dino as build_official_dino
    from util.misc import nested_tensor_from_tensor_list

    namespace: dict[str, Any] = {}
    config = official / "config" / "DINO" / OFFICIAL_CONFIGS[name]
    for path in (config.parent / "coco_transformer.py", config):
        exec(path.read_text(), namespace)
    args = argparse.Namespace(**{k: v for k, v in namespace.items() if not k.startswith("_")})
    for key, value in dict(
        device=device.type,
        dataset_file="coco",
        masks=False,
        frozen_weights=None,
        amp=True,
        use_checkpoint=checkpointing,
        onecyclelr=False,
        use_ema=False,
        debug=False,
    ).items():
        setattr(args, key, value)
    torch.manual_seed(0)
    model, criterion, _ = build_official_dino(args)
    model.to(device)
    param_dicts = [
        {"params": [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]},
        {
            "params": [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad],
            "lr": 1e-5,
        },
    ]
    optimizer = torch.optim.AdamW(param_dicts, lr=args.lr, weight_decay=args.weight_decay)
    target = batch.targets[0]
    height, width = batch.image_sizes[0].tolist()
    sample = (
        nested_tensor_from_tensor_list([batch.images[0]]),
        [
            {
                "boxes": target["boxes"],
                "labels": target["labels"],
                "image_id": torch.tensor([1]),
                "orig_size": torch.tensor([height, width]),
                "size": torch.tensor([height, width]),
            }
        ],
    )

    def epoch() -> None:
        official_engine.train_one_epoch(
            model, criterion, [sample] * iters, optimizer, device, 0, args.clip_max_norm, args=args
        )

    return epoch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["dino_r50_4scale", "dino_swinl_4scale"])
    parser.add_argument("--sizes", nargs="+", default=["800x1333", "1200x2000"], help="HxW per step")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument(
        "--checkpointing", nargs="+", default=["off", "backbone"], choices=["off", "backbone", "all"]
    )
    parser.add_argument(
        "--msda", nargs="+", default=["fused", "reference"], choices=["fused", "reference", "auto"]
    )
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--boxes", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--engine", default="plain", choices=["plain", "deepspeed"])
    parser.add_argument("--official", type=Path, help="the official DINO repository (scratch copy)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "out" / "train_step.json")
    parser.add_argument("--profile", type=int, default=0, metavar="K", help="print the K costliest ops")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        print(
            f"{row['model']:<18} {row['size']:>9} ckpt {row['checkpointing']:<8} {row['variant']:<24} "
            f"{row['images_per_s']:7.3f} img/s  {row['peak_memory_gib']:6.2f} GiB  "
            f"(median step {row['median_step_s']:.3f} s)",
            flush=True,
        )

    for name in args.models:
        for size in args.sizes:
            height, width = (int(v) for v in size.lower().split("x"))
            batch = synthetic_batch(height, width, args.boxes, preset(name).num_classes)
            for checkpointing in args.checkpointing:
                common = {"model": name, "size": size, "checkpointing": checkpointing}
                for msda in args.msda:
                    step = our_step(name, batch, args.precision, checkpointing, msda, device, args.engine)
                    result = measure(step, device, args.iters, args.warmup)
                    record(
                        {**common, "variant": f"ours {args.engine} msda={msda} {args.precision}", **result}
                    )
                    if args.profile:
                        print(profile_table(step, device, args.profile), flush=True)
                    del step
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                if args.official is not None and device.type != "cuda":
                    print("official step: skipped (its denoising code only runs on CUDA)", flush=True)
                elif args.official is not None and name in OFFICIAL_CONFIGS:
                    epoch = official_step(
                        args.official, name, batch, checkpointing != "off", device, args.iters
                    )
                    epoch()  # warm-up: one epoch of --iters steps
                    result = measure(epoch, device, 1, 0)
                    seconds = result["median_step_s"] / args.iters
                    record(
                        {
                            **common,
                            "variant": "official fp16 amp",
                            "images_per_s": 1.0 / seconds,
                            "best_step_s": seconds,
                            "median_step_s": seconds,
                            "peak_memory_gib": result["peak_memory_gib"],
                        }
                    )
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    )
    report = {
        "device": device_name,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return 0 if all(math.isfinite(r["images_per_s"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
