"""The training loop of a stage: micro-batches, optimizer steps, checkpoints, evaluations, the export.

One micro-batch: crowd boxes dropped on the host, the batch copied to the device, the box count averaged
over ranks on the device, forward + loss through the engine, one agreed finiteness check (the step's only
host wait besides what the detector itself needs), backward, and at the accumulation boundary the
optimizer step with the scheduled learning rate and the EMA update. Loss terms are summed on the device
and read every ``train.log_every`` steps.

Data position: ``(epoch, batch_in_epoch)`` counts micro-batches consumed on every rank, skipped ones
included, so a resumed run asks the data stream for exactly the batches the uninterrupted run would see
next (``TrainLoader.set_epoch``). Checkpoints are written at accumulation boundaries only: every
``train.checkpoint_every`` steps, at every epoch end (or the first boundary after it), and at the end.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dino_core.builder import build_dino
from dino_core.config import DINOConfig, config_to_dict
from pipeline.checkpoint import MODEL_FILE, ModelCard, read_weight_file, save_model
from pipeline.data.collate import Batch
from pipeline.data.manifest import Manifest
from pipeline.data.stream import TrainLoader
from pipeline.evaluation.config import TTAConfig
from pipeline.evaluation.outputs import flat_metrics
from pipeline.evaluation.samples import eval_samples, images_of_rank
from pipeline.evaluation.stage import atd_function, manifest_sha256, run_evaluation
from pipeline.tracking import NullTracker, Tracker
from pipeline.train.checkpointing import (
    CheckpointDir,
    CheckpointError,
    TrainState,
    check_finished_settings,
    restore_rng,
    rng_state,
    step_tag,
)
from pipeline.train.config import TrainStageConfig
from pipeline.train.ema import EMA
from pipeline.train.engine import DistInfo, Engine, export_fp32_state_dict
from pipeline.train.optim import step_schedule, total_steps
from pipeline.train.reporting import Progress
from pipeline.train.step import (
    LossMeter,
    NonFiniteGuard,
    all_finite,
    global_num_boxes,
    loss_term_names,
    stack_terms,
    to_device,
    training_targets,
)

log = logging.getLogger("pipeline.train")

RESULT_FILE = "train_result.json"


@dataclass
class TrainResult:
    """What a finished stage returns (and writes to ``train_result.json``)."""

    model_dir: str
    """The directory holding ``model.safetensors`` + ``model.json`` (the stage's ``out``)."""
    stage: str
    steps: int
    """Optimizer steps taken over the whole stage (all restarts)."""
    epoch: int
    """The epoch the next batch would belong to."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The final evaluation's flat metrics (empty without ``val_data``) and the last training losses."""
    skipped_nonfinite: int = 0
    checkpoint: str = ""
    """The checkpoint the model was consolidated from."""
    resumed_from: str | None = None
    """The checkpoint this process started from (None: a fresh start)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The settings the stage finished with (:meth:`TrainStageConfig.result_settings`); empty in records
    written before they were kept."""


def read_result(out: Path) -> TrainResult:
    """The completion record a finished stage wrote (``train_result.json``)."""
    return TrainResult(**json.loads((Path(out) / RESULT_FILE).read_text()))


def finished_result(out: Path, global_step: int, total: int) -> TrainResult | None:
    """The completion record of ``out`` when the run is finished: its latest checkpoint is at
    ``global_step`` >= ``total`` (the stage's steps under the current config) and the record was written at
    that step. None when the run has steps left or its export did not complete."""
    if global_step < total or not (Path(out) / RESULT_FILE).is_file():
        return None
    finished = read_result(out)
    return finished if finished.steps == global_step else None


class Trainer:
    """Runs a stage's loop on this rank from ``state`` (fresh or restored with :meth:`restore`)."""

    def __init__(
        self,
        *,
        cfg: TrainStageConfig,
        model_cfg: DINOConfig,
        plan_classes: list[dict[str, Any]],
        val: Manifest | None,
        info: DistInfo,
        engine: Engine,
        loader: TrainLoader,
        checkpoints: CheckpointDir,
        state: TrainState,
    ) -> None:
        self.cfg, self.model_cfg, self.classes, self.val = cfg, model_cfg, plan_classes, val
        self.info, self.engine, self.loader, self.checkpoints = info, engine, loader, checkpoints
        self.state, self.zero_stage = state, engine.zero_stage
        self.tracker: Tracker = NullTracker()
        """Where metrics go on rank 0 (set by the stage once its tracking run is open)."""
        self.out = Path(cfg.out)
        self.names = loss_term_names(model_cfg)
        self.meter = LossMeter(self.names)
        self.guard = NonFiniteGuard(cfg.train.nan_patience, skipped=state.skipped_nonfinite)
        self.total = total_steps(cfg.train, loader.batches_per_epoch)
        self.schedule = step_schedule(cfg.train, loader.batches_per_epoch)
        ema_cfg = cfg.train.ema
        self.ema = EMA(engine.detector, ema_cfg.decay, engine.gather) if ema_cfg.enabled else None
        self.last_checkpoint = "none (no checkpoint was written yet)"
        self.saved_step = -1
        self.pending_epoch_checkpoint = False
        self.lrs = engine.set_lr(self.schedule.factor(state.global_step))
        self.last_losses: dict[str, float] = {}
        self.eval_model: torch.nn.Module | None = None

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self.info.rank

    def _barrier(self) -> None:
        if self.info.world_size > 1:
            dist.barrier()

    # ---- resume -------------------------------------------------------------------------------------

    def restore(self, tag: str) -> None:
        """Continue checkpoint ``tag``: weights, optimizer, RNG, unread loss sums, EMA (collective).

        Raises:
            CheckpointError: DeepSpeed cannot read the checkpoint's files (damage that
                :meth:`CheckpointDir.check_files`, which reads only their indexes, cannot see).
        """
        try:
            self.engine.load(self.checkpoints.root, tag)
        except torch.cuda.OutOfMemoryError:
            raise  # not the files' fault
        except (
            RuntimeError,
            EOFError,
            OSError,
            ValueError,
            pickle.UnpicklingError,
            zipfile.BadZipFile,
        ) as error:
            detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise CheckpointError(
                f"cannot load the checkpoint {self.checkpoints.root / tag} ({type(error).__name__}: "
                f"{detail}); if its files are damaged (a cut copy, a full disk): "
                f"{self.checkpoints.earlier_checkpoint_fix(tag)}"
            ) from error
        rank_state = self.checkpoints.read_rank_state(tag, self.rank)
        restore_rng(rank_state["rng"], self.info.device)
        self.meter.restore(rank_state["meter"], self.info.device)
        if self.ema is not None:
            ema_file = self.checkpoints.ema_dir(tag) / MODEL_FILE
            if ema_file.is_file():
                self.ema.load(read_weight_file(ema_file))
            else:
                log.warning("%s has no EMA weights: the average starts from the restored weights", tag)
        self.last_checkpoint = str(self.checkpoints.root / tag)
        self.saved_step = self.state.global_step
        self.lrs = self.engine.set_lr(self.schedule.factor(self.state.global_step))

    # ---- the loop -----------------------------------------------------------------------------------

    def run(self, resumed_from: str | None) -> TrainResult:
        """Train to the end of the stage, write the final checkpoint and the model directory."""
        state = self.state
        cfg = self.cfg
        finished = (
            finished_result(self.out, state.global_step, self.total) if resumed_from is not None else None
        )
        if finished is not None:
            check_finished_settings(finished.settings, cfg.result_settings(), self.out, finished.steps)
            log.info("%s is complete (%d steps): nothing to do", self.out, state.global_step)
            return finished
        images_per_step = cfg.train.batch_size * self.info.world_size * cfg.train.grad_accumulation
        self.progress = Progress(
            self.out,
            self.total,
            images_per_step,
            self.engine.group_names,
            self.info.device,
            state.global_step,
            enabled=self.rank == 0,
        )
        log.info(
            "training %d steps (%d epochs of %d batches per rank, %d images per step) from step %d",
            self.total,
            cfg.train.epochs,
            self.loader.batches_per_epoch,
            images_per_step,
            state.global_step,
        )
        stop = state.global_step >= self.total
        while not stop and state.epoch < cfg.train.epochs:
            epoch = state.epoch
            self.loader.set_epoch(epoch, state.batch_in_epoch)
            for batch in _forked_iter(self.loader):
                stepped = self._micro_batch(batch)
                epoch_ended = state.epoch != epoch
                if stepped:
                    self._after_step()
                if epoch_ended:
                    self._after_epoch(epoch, stepped)
                elif stepped and self.pending_epoch_checkpoint:
                    self._checkpoint()
                if state.global_step >= self.total:
                    stop = True
                    break
            if not stop and state.epoch == epoch:
                raise RuntimeError(
                    f"the data stream of epoch {epoch} ended after {state.batch_in_epoch} of "
                    f"{self.loader.batches_per_epoch} batches"
                )
        if self.saved_step != state.global_step:
            self._checkpoint()
        metrics = self._finish()
        return TrainResult(
            model_dir=str(self.out),
            stage=cfg.stage,
            steps=state.global_step,
            epoch=state.epoch,
            metrics=metrics,
            skipped_nonfinite=self.guard.skipped,
            checkpoint=self.last_checkpoint,
            resumed_from=resumed_from,
            settings=cfg.result_settings(),
        )

    def _advance(self) -> None:
        state = self.state
        state.micro_batches += 1
        state.batch_in_epoch += 1
        if state.batch_in_epoch == self.loader.batches_per_epoch:
            state.epoch += 1
            state.batch_in_epoch = 0

    def _micro_batch(self, batch: Batch) -> bool:
        """Forward, check, backward and (at the boundary) step; True when an optimizer step was taken."""
        engine, state = self.engine, self.state
        targets, local_boxes = training_targets(batch)
        images, sizes, targets = to_device(batch, targets, self.info.device, engine.input_dtype)
        terms = engine(images, sizes, targets, global_num_boxes(local_boxes, self.info.device))
        vector = stack_terms(terms, self.names)
        finite = all_finite(terms["loss"])
        position = (state.epoch, state.batch_in_epoch)
        self._advance()
        if not finite:
            values = self._agreed_terms(vector)
            del terms
            engine.discard_forward()
            self.guard.record(False, state.global_step, values, self.last_checkpoint)
            state.skipped_nonfinite = self.guard.skipped
            log.warning(
                "non-finite loss at step %d (epoch %d, batch %d): batch skipped (%d in a row, %d in all)",
                state.global_step,
                *position,
                self.guard.in_row,
                self.guard.skipped,
            )
            return False
        self.guard.record(True, state.global_step, None, self.last_checkpoint)
        boundary = engine.at_boundary()
        if boundary:
            self.lrs = engine.set_lr(self.schedule.factor(state.global_step))
        engine.backward(terms["loss"])
        engine.step()
        self.meter.add(vector)
        if boundary:
            state.global_step += 1
            if self.ema is not None:
                self.ema.update()
        return boundary

    def _agreed_terms(self, vector: torch.Tensor) -> dict[str, float]:
        # Failure path only: the terms averaged over ranks (a non-finite one shows as nan/inf).
        summed = vector.detach().double().clone()
        if self.info.world_size > 1:
            dist.all_reduce(summed)
            summed /= self.info.world_size
        return dict(zip(self.names, summed.tolist()))

    def _after_step(self) -> None:
        step = self.state.global_step
        train = self.cfg.train
        if step % train.log_every == 0 or step == self.total:
            self._log()
        if train.checkpoint_every and step % train.checkpoint_every == 0:
            self._checkpoint()

    def _after_epoch(self, epoch: int, stepped: bool) -> None:
        if stepped:
            if self.saved_step != self.state.global_step:
                self._checkpoint()
        else:
            self.pending_epoch_checkpoint = True
        every = self.cfg.train.eval_every_epochs
        last = self.state.epoch >= self.cfg.train.epochs or self.state.global_step >= self.total
        if self.val is not None and every and (epoch + 1) % every == 0 and not last:
            metrics = self._evaluate(f"epoch_{epoch:03d}", epoch, TTAConfig(enabled=False))
            self.state.metrics = metrics

    def _log(self) -> None:
        losses = self.meter.read()
        if not losses:
            return
        self.last_losses = losses
        extra: dict[str, float] = {"train/skipped_nonfinite": float(self.guard.skipped)}
        scale = self.engine.loss_scale()
        if scale is not None:
            extra["train/loss_scale"] = scale
        state = self.state
        epochs_done = state.epoch + state.batch_in_epoch / self.loader.batches_per_epoch
        scalars = self.progress.report(state.global_step, epochs_done, losses, self.lrs, extra)
        if self.rank == 0:
            self.tracker.log_metrics(scalars, step=self.state.global_step)

    # ---- checkpoints --------------------------------------------------------------------------------

    def _card(self, ema: bool, metrics: dict[str, Any], source: str) -> ModelCard:
        return ModelCard(
            model=config_to_dict(self.model_cfg),
            classes=self.classes,
            step=self.state.global_step,
            epoch=self.state.epoch,
            stage=self.cfg.stage,
            metrics=metrics,
            source=source,
            ema=ema,
        )

    def _checkpoint(self) -> None:
        """Write a complete checkpoint of the current step and switch ``latest`` to it (collective)."""
        start = time.perf_counter()
        step = self.state.global_step
        partial = self.checkpoints.partial(step)
        self.engine.save(self.checkpoints.root, partial)
        self.checkpoints.write_rank_state(
            partial, self.rank, {"rng": rng_state(self.info.device), "meter": self.meter.state()}
        )
        wanted = self.ema is not None and (self.rank == 0 or self.engine.gathers)
        full = self.engine.full_state_dict() if wanted else None
        if self.rank == 0:
            if self.ema is not None and full is not None:
                source = str(self.checkpoints.root / step_tag(step))  # its name once committed
                save_model(
                    self.checkpoints.root / partial / "ema",
                    self.ema.state_dict(full),
                    self._card(True, self.state.metrics, source),
                )
            self.state.skipped_nonfinite = self.guard.skipped
            self.checkpoints.write_state(partial, self.state)
        self._barrier()
        if self.rank == 0:
            tag = self.checkpoints.commit(step)
            latest = str(self.checkpoints.root / tag)
            removed = self.checkpoints.prune(self.cfg.train.keep_checkpoints, {tag})
            log.info(
                "checkpoint %s (epoch %d, batch %d) in %.1f s%s",
                latest,
                self.state.epoch,
                self.state.batch_in_epoch,
                time.perf_counter() - start,
                f"; removed {', '.join(removed)}" if removed else "",
            )
            self.tracker.set_tags({"checkpoint/latest": latest})
        self._barrier()
        self.last_checkpoint = str(self.checkpoints.root / step_tag(step))
        self.saved_step = step
        self.pending_epoch_checkpoint = False
        self.progress.exclude(time.perf_counter() - start)

    # ---- evaluation and export ----------------------------------------------------------------------

    def _complete(self, exported: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> None:
        """Check the consolidated checkpoint against the live weights, in place: it must hold every
        trainable parameter and agree with the live fp32 values (a difference means it was read from
        another checkpoint). Frozen parameters and buffers, which ZeRO-1 checkpoints leave out and which
        never change, are taken from the live model; the keys end in the model's order."""
        trainable = {n for n, p in self.engine.detector.named_parameters() if p.requires_grad}
        lost = sorted(k for k in trainable if k not in exported)
        if lost:
            raise RuntimeError(f"the consolidated checkpoint lacks trained parameters {lost[:5]}")
        worst = max(((exported[k] - live[k].cpu()).abs().max().item() for k in trainable), default=0.0)
        if worst > 0:
            log.warning("the consolidated checkpoint differs from the live weights by up to %.3g", worst)
        complete = {k: exported[k] if k in exported else v.cpu() for k, v in live.items()}
        exported.clear()
        exported.update(complete)

    def _weights(self) -> dict[str, torch.Tensor]:
        """The stage's weights on every rank (collective): the EMA when enabled and used, else the raw."""
        full = self.engine.full_state_dict()
        if self.ema is not None and self.cfg.train.ema.use:
            return self.ema.state_dict(full)
        return full

    def _evaluate(self, label: str, epoch: int, tta: TTAConfig) -> dict[str, float]:
        """Evaluate the stage's weights on ``val_data`` into ``out/eval/<label>`` (collective); rank 0
        returns the flat metrics."""
        assert self.val is not None
        start = time.perf_counter()
        weights = self._weights()
        device = self.info.device
        with _forked_rng(device):
            if self.eval_model is None:
                self.eval_model = build_dino(self.model_cfg).to(device)
            self.eval_model.load_state_dict(weights, strict=True)
            del weights
            header = {
                "checkpoint": {
                    "path": self.last_checkpoint,
                    "preset": None,
                    "step": self.state.global_step,
                    "epoch": self.state.epoch,
                    "stage": self.cfg.stage,
                    "ema": self.ema is not None and self.cfg.train.ema.use,
                    "source": "training",
                },
                "dataset": {
                    "manifest": self.val.location,
                    "manifest_sha256": manifest_sha256(self.val),
                    "dataset": self.val.dataset,
                    "split": self.val.split,
                },
            }
            workers = self.cfg.eval.num_workers
            run = run_evaluation(
                self.eval_model,
                eval_samples(self.val, self.rank, self.info.world_size, workers),
                [{"id": c.id, "name": c.name} for c in self.val.categories],
                self.cfg.eval,
                tta,
                self.out / "eval" / label,
                header,
                anchor_distances=atd_function(self.model_cfg),
                expected_images=images_of_rank(self.val, self.rank, self.info.world_size, workers),
                tracker=self.tracker if self.rank == 0 else None,
                step=epoch,
            )
        self.progress.exclude(time.perf_counter() - start)
        return flat_metrics(run) if run is not None else {}

    def _finish(self) -> dict[str, Any]:
        """Final evaluation, then the consolidated model directory (``model.json`` written last)."""
        metrics: dict[str, Any] = {}
        if self.val is not None:
            metrics.update(self._evaluate("final", self.state.epoch, self.cfg.tta))
        if self.last_losses:
            metrics.update({f"train/{k}": v for k, v in self.last_losses.items()})
        live = self.engine.full_state_dict() if self.rank == 0 or self.engine.gathers else {}
        if self.rank == 0:
            tag = step_tag(self.state.global_step)
            raw = export_fp32_state_dict(self.checkpoints.root, tag, self.zero_stage)
            if raw is None:
                raw = {k: v.cpu() for k, v in live.items()}
            else:
                self._complete(raw, live)
            source = str(self.checkpoints.root / tag)
            primary, other, other_dir = raw, None, "ema"
            if self.ema is not None:
                averaged = {k: v.cpu() for k, v in self.ema.state_dict(raw).items()}
                primary, other = (averaged, raw) if self.cfg.train.ema.use else (raw, averaged)
                other_dir = "raw" if self.cfg.train.ema.use else "ema"
            use_ema = self.ema is not None and self.cfg.train.ema.use
            if other is not None:
                save_model(self.out / other_dir, other, self._card(not use_ema, metrics, source))
            save_model(self.out, primary, self._card(use_ema, metrics, source))
            log.info(
                "wrote %s (%s weights, step %d)",
                self.out / MODEL_FILE,
                "EMA" if use_ema else "raw",
                self.state.global_step,
            )
            self.tracker.set_tags({"model_dir": str(self.out.resolve())})
            self.tracker.log_artifact(self.out / "model.json")
        self._barrier()
        return metrics


@contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def _forked_iter(loader: TrainLoader) -> Iterator[Batch]:
    # A DataLoader draws its workers' base seed from the global generator when iterated; the data stream
    # seeds itself, so keeping that draw out of the global state keeps resumed runs identical.
    with torch.random.fork_rng(devices=[]):
        iterator = iter(loader)
    yield from iterator
