"""The training stages: ``python -m pipeline pretrain ...`` and ``python -m pipeline finetune ...``.

:func:`run_training` is what every launcher's worker calls (``pipeline.launch``: one process, torchrun /
the deepspeed launcher, Ray Train). It reads the training manifests (the class table decides
``num_classes``), builds the detector, starts it from ImageNet backbone weights (pretrain) or a
pretraining run (finetune, class heads remapped by name), wraps it in DeepSpeed, resumes from
``<out>/checkpoints/latest`` when there is one, trains (:mod:`pipeline.train.loop`), and leaves the model
directory contract in ``out``: ``model.safetensors`` (consolidated fp32) + ``model.json``, then
``train_result.json`` last.

Everything that can be refused is refused before the process group does any work: a bad manifest, an
``init`` that is not a model directory of this architecture, an ``out`` holding another run's checkpoints,
a finished run of other settings (``train_result.json`` records them), a damaged checkpoint to resume from.
A finished run of the same settings is recognised without building the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dino_core.builder import build_criterion, build_dino
from dino_core.config import config_to_dict
from pipeline.checkpoint import atomic_write_bytes
from pipeline.config import inputs_accepted
from pipeline.data.manifest import Manifest, ManifestError, load_manifest
from pipeline.data.stream import StreamSource, train_loader
from pipeline.data.transforms import train_transform
from pipeline.launch import LaunchError, launch
from pipeline.tracking import start_run
from pipeline.train.checkpointing import (
    CheckpointDir,
    CheckpointError,
    TrainState,
    check_finished_settings,
    check_resumable,
    check_same_run,
)
from pipeline.train.config import TrainStageConfig
from pipeline.train.engine import (
    DistInfo,
    Engine,
    PrecisionError,
    deepspeed_config,
    effective_zero_stage,
    init_distributed,
    resolve_precision,
)
from pipeline.train.loop import RESULT_FILE, Trainer, TrainResult, finished_result, read_result
from pipeline.train.optim import describe_groups, group_rules, parameter_groups, total_steps
from pipeline.train.step import NonFiniteLossError, TrainModule
from pipeline.train.warm_start import InitError, check_init, load_backbone_weights, load_pretrained

__all__ = ["DataError", "TrainResult", "plan_data", "read_result", "run", "run_training"]

log = logging.getLogger("pipeline.train")

INIT_REPORT_FILE = "init_report.json"


class DataError(ValueError):
    """Training data that cannot be used as configured; the message names the manifest."""


@dataclass
class DataPlan:
    """The training data as the stage sees it."""

    sources: list[StreamSource]
    classes: list[dict[str, Any]]
    """``{"id", "name"}`` sorted by id: the training class table."""
    num_classes: int
    val: Manifest | None


def plan_data(cfg: TrainStageConfig) -> DataPlan:
    """Read the manifests: the class table (same in every source), ``num_classes``, the eval split.

    Raises:
        ManifestError: a missing or corrupt manifest.
        DataError: sources with different category tables, an eval split with classes the model lacks.
    """
    sources = [StreamSource(s.manifest, s.weight, s.shards) for s in cfg.sources()]
    manifests = [load_manifest(s.manifest) for s in sources]
    for source, manifest in zip(sources, manifests):
        # Beside the manifest, or where a shard template (``{name}``) puts other copies of the shards.
        manifest.check_local_shards(source.shards or None)
    tables = [{c.id: c.name for c in m.categories} for m in manifests]
    for manifest, table in zip(manifests[1:], tables[1:]):
        if table != tables[0]:
            raise DataError(
                f"training sources {manifests[0].location} and {manifest.location} have different category "
                "tables; mixed sources must share one label space"
            )
    if not tables[0]:
        raise DataError(f"{manifests[0].location} has an empty category table")
    classes = [{"id": i, "name": n} for i, n in sorted(tables[0].items())]
    num_classes = max(tables[0]) + 1
    val = load_manifest(cfg.val_data) if cfg.val_data else None
    if val is not None:
        val.check_local_shards()
    if val is not None:
        differ = [f"{c.id}: {c.name!r}" for c in val.categories if tables[0].get(c.id) != c.name]
        if differ:
            raise DataError(
                f"val_data {val.location} has categories the training split does not (id: name "
                f"{', '.join(differ[:10])}); evaluate on a split of the same label space"
            )
    return DataPlan(sources, classes, num_classes, val)


def _setup_logging(rank: int) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _broadcast(value: Any, info: DistInfo) -> Any:
    if info.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _seed_rank(seed: int, rank: int) -> None:
    # Per-rank generators for what the step draws (denoising noise, drop path); the data stream seeds
    # itself per sample, so these never touch the data order.
    torch.manual_seed(seed + 1000003 * (rank + 1))
    np.random.seed((seed + rank) % 2**32)


def run_training(cfg: TrainStageConfig) -> TrainResult:
    """Run (or resume, or recognise as finished) one training stage on this process; every rank calls it.

    The launcher's environment must describe the process group (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT); :func:`pipeline.launch.launch` provides it for a single process.
    """
    info = init_distributed()
    _setup_logging(info.rank)
    precision = resolve_precision(cfg.deepspeed.precision, info.device)
    zero_stage = effective_zero_stage(cfg.deepspeed, info.world_size, precision)
    if zero_stage != cfg.deepspeed.zero_stage:
        log.info(
            "one rank: ZeRO-%d has nothing to partition, DeepSpeed runs at stage 0 (the same update rule, "
            "less work per step)",
            cfg.deepspeed.zero_stage,
        )
    ds_config = dataclasses.replace(cfg.deepspeed, zero_stage=zero_stage)
    plan = plan_data(cfg)
    model_cfg = dataclasses.replace(cfg.model, num_classes=plan.num_classes)
    if cfg.model.num_classes != plan.num_classes:
        log.info(
            "model.num_classes: %d -> %d (max category id + 1 of the training class table, %d classes)",
            cfg.model.num_classes,
            plan.num_classes,
            len(plan.classes),
        )
    init_card = check_init(cfg.init, model_cfg) if cfg.stage == "finetune" and cfg.init is not None else None
    out = Path(cfg.out)
    checkpoints = CheckpointDir(out)
    if info.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        checkpoints.root.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints.remove_partials():
            log.warning("removed the incomplete checkpoint %s", checkpoints.root / stale)
    tag = _broadcast(checkpoints.latest() if info.rank == 0 else None, info)
    loader = train_loader(
        plan.sources,
        cfg.train.batch_size,
        cfg.train.num_workers,
        cfg.train.seed,
        info.rank,
        info.world_size,
        train_transform(cfg.train.aug_scale),
        epoch_samples=cfg.train.epoch_samples,
        shuffle_buffer=cfg.train.shuffle_buffer,
    )
    state = TrainState(
        stage=cfg.stage,
        global_step=0,
        epoch=0,
        batch_in_epoch=0,
        micro_batches=0,
        skipped_nonfinite=0,
        world_size=info.world_size,
        batch_size=cfg.train.batch_size,
        num_workers=cfg.train.num_workers,
        grad_accumulation=cfg.train.grad_accumulation,
        seed=cfg.train.seed,
        batches_per_epoch=loader.batches_per_epoch,
        model=config_to_dict(model_cfg),
        classes=plan.classes,
        ema=cfg.train.ema.enabled,
        zero_stage=zero_stage,
    )
    if tag is not None:
        saved = checkpoints.read_state(tag)
        check_resumable(saved, state, checkpoints.root)
        total = total_steps(cfg.train, loader.batches_per_epoch)
        finished = finished_result(out, saved.global_step, total)
        if finished is not None:
            check_finished_settings(finished.settings, cfg.result_settings(), out, finished.steps)
            log.info("%s is complete (%d steps): nothing to do", out, finished.steps)
            return finished  # every rank: the same files, the same answer
        checkpoints.check_files(tag, saved)  # before the model, the engine and the process group's work
        state = saved

    torch.manual_seed(cfg.train.seed)
    model = build_dino(model_cfg)
    criterion = build_criterion(model_cfg)
    init_report: dict[str, Any] | None = None
    if tag is None:
        if cfg.train.backbone_weights is not None:
            log.info("%s", load_backbone_weights(model, cfg.train.backbone_weights))
        elif init_card is not None and cfg.init is not None:
            report = load_pretrained(
                model,
                cfg.init,
                init_card,
                {c["id"]: c["name"] for c in plan.classes},
                cfg.train.class_aliases,
            )
            log.info("init from %s: %s", cfg.init, report.summary())
            init_report = {"init": str(cfg.init), **report.as_dict()}
        elif cfg.stage == "pretrain":
            log.warning("train.backbone_weights is not set: the backbone starts from random weights")
    acp = cfg.train.activation_checkpointing
    model.set_activation_checkpointing(backbone=acp.backbone, encoder=acp.encoder, decoder=acp.decoder)
    groups, frozen = parameter_groups(
        model, group_rules(cfg.train), cfg.train.weight_decay, cfg.train.decay_norm_and_bias
    )
    for line in describe_groups(groups, frozen):
        log.info("%s", line)
    # Fused: one kernel per step on the GPU instead of a multi-tensor pass per operation and a host
    # read of each parameter's step count. Not where the state lives in CPU memory.
    optimizer = torch.optim.AdamW(
        [g.as_torch() for g in groups],
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        fused=info.device.type == "cuda" and not cfg.deepspeed.offload_optimizer,
    )
    log.info(
        "DeepSpeed ZeRO-%d, %s, %d rank(s), device %s, micro-batch %d x %d accumulation",
        zero_stage,
        precision,
        info.world_size,
        info.device,
        cfg.train.batch_size,
        cfg.train.grad_accumulation,
    )
    engine = Engine(
        TrainModule(model, criterion).to(info.device),
        optimizer,
        deepspeed_config(ds_config, cfg.train, precision),
        precision,
    )
    trainer = Trainer(
        cfg=cfg,
        model_cfg=model_cfg,
        plan_classes=plan.classes,
        val=plan.val,
        info=info,
        engine=engine,
        loader=loader,
        checkpoints=checkpoints,
        state=state,
    )
    if tag is not None:
        trainer.restore(tag)
        log.info(
            "resumed from %s: step %d, epoch %d, batch %d of %d",
            checkpoints.root / tag,
            state.global_step,
            state.epoch,
            state.batch_in_epoch,
            loader.batches_per_epoch,
        )
    else:
        _seed_rank(cfg.train.seed, info.rank)
    if info.rank == 0 and init_report is not None:
        atomic_write_bytes(out / INIT_REPORT_FILE, json.dumps(init_report, indent=1).encode())
    tags = {"out": str(out.resolve()), "resumed_from": str(tag or ""), "data.classes": str(len(plan.classes))}
    with start_run(cfg.tracking, out, cfg.stage, config=cfg, tags=tags, rank=info.rank) as tracker:
        if init_report is not None:
            tracker.log_artifact(out / INIT_REPORT_FILE)
        trainer.tracker = tracker
        result = trainer.run(resumed_from=tag)
    if info.rank == 0:
        atomic_write_bytes(out / RESULT_FILE, json.dumps(dataclasses.asdict(result), indent=1).encode())
    if info.world_size > 1:
        dist.barrier()
    return result


def run(cfg: TrainStageConfig) -> int:
    """CLI entry of ``pretrain`` and ``finetune``: launch per ``cfg.launcher``; the exit code."""
    try:
        # Refuse bad data or a bad init before any process or Ray worker starts (the workers check again).
        plan = plan_data(cfg)
        model_cfg = dataclasses.replace(cfg.model, num_classes=plan.num_classes)
        if cfg.stage == "finetune" and cfg.init is not None:
            check_init(cfg.init, model_cfg)
        checkpoints = CheckpointDir(Path(cfg.out))
        tag = checkpoints.latest()
        if tag is not None:
            saved = checkpoints.read_state(tag)
            check_same_run(saved, cfg.stage, config_to_dict(model_cfg), plan.classes, checkpoints.root)
            # The finished run's own epoch length: another one is refused by the workers' resume check.
            finished = finished_result(
                cfg.out, saved.global_step, total_steps(cfg.train, saved.batches_per_epoch)
            )
            if finished is not None:
                check_finished_settings(
                    finished.settings, cfg.result_settings(), Path(cfg.out), finished.steps
                )
            else:
                checkpoints.check_files(tag, saved)
        inputs_accepted()  # from here on the run writes into out (the CLI's record first)
        result = launch(cfg, run_training)
    except (
        InitError,
        DataError,
        LaunchError,
        ManifestError,
        CheckpointError,
        NonFiniteLossError,
        PrecisionError,
    ) as error:
        rank = int(os.environ.get("RANK", "0"))
        print(f"error{f' (rank {rank})' if rank else ''}: {error}", file=sys.stderr, flush=True)
        return 2
    if result is None:  # Ray: the workers wrote the record
        result = read_result(cfg.out)
    log.info("%s finished: %d steps, model in %s", cfg.stage, result.steps, result.model_dir)
    return 0
