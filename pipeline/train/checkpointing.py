"""Step checkpoints of a training stage: layout, atomic ``latest``, train state, per-rank RNG, resume checks.

Layout under ``<out>/checkpoints/`` (contract 3 in DESIGN.md)::

    step_00001000/                      one complete checkpoint
        <DeepSpeed files>               model, optimizer and ZeRO partitions of every rank
        train_state.json                step, epoch, data position, counters, model and class table
        ranks/rank_00000.json           per-rank state: RNG (torch CPU/CUDA, numpy, python), unread loss sums
        ema/model.safetensors + model.json   the EMA weights as a model directory (when EMA is on)
    latest                              the name of the newest complete checkpoint

A checkpoint is written into ``.partial-step_XXXXXXXX/``; after every rank has finished writing (a
barrier), rank 0 renames it to ``step_XXXXXXXX/`` and then replaces ``latest`` atomically, so ``latest``
never names an incomplete checkpoint and a kill at any moment loses at most the steps since the last one.
Nothing here imports DeepSpeed: the engine writes its own files into the directory given.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dino_core.config import DINOConfig, config_differences, config_from_dict
from pipeline.checkpoint import atomic_write_bytes

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
PARTIAL_PREFIX = ".partial-"
TRAIN_STATE = "train_state.json"
RANKS = "ranks"
EMA_DIR = "ema"
STATE_FORMAT = "dino-pipeline/train-state-v1"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be resumed from; the message says what and what to do."""


class IncompatibleRunError(CheckpointError):
    """``out`` holds checkpoints of a run this config cannot continue (other model, classes or layout)."""


def step_tag(step: int) -> str:
    """The checkpoint directory name of optimizer step ``step``."""
    return f"step_{step:08d}"


@dataclass
class TrainState:
    """Where a run stands (``train_state.json``): enough to continue it exactly."""

    stage: str
    global_step: int
    """Optimizer steps taken."""
    epoch: int
    """The epoch the next batch belongs to."""
    batch_in_epoch: int
    """Micro-batches of ``epoch`` already consumed on every rank (the data stream's ``start_step``)."""
    micro_batches: int
    """Micro-batches consumed in total (including skipped ones)."""
    skipped_nonfinite: int
    world_size: int
    batch_size: int
    num_workers: int
    grad_accumulation: int
    seed: int
    batches_per_epoch: int
    model: dict[str, Any]
    """The architecture (``config_to_dict``; ``num_classes`` as derived)."""
    classes: list[dict[str, Any]]
    """The training class table (``id``, ``name``)."""
    ema: bool = False
    zero_stage: int | None = None
    """The ZeRO stage the run used (its checkpoint files' layout); None in states written before it was
    recorded."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The last evaluation's metrics (flat), if any."""
    format: str = STATE_FORMAT

    def to_json(self) -> bytes:
        """The JSON bytes."""
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> TrainState:
        """Parse; raises CheckpointError naming ``where`` for anything but this format."""
        try:
            raw = json.loads(data)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{where} is not JSON ({error})") from None
        if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{where} is not a {STATE_FORMAT} train state")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


# The fields a run must keep to be continued: the data position (stream seeds, slots, epoch length) and
# the ZeRO partitioning depend on them.
_RESUME_INVARIANTS = (
    "world_size",
    "batch_size",
    "num_workers",
    "grad_accumulation",
    "seed",
    "batches_per_epoch",
)


def check_same_run(
    saved: TrainState, stage: str, model: dict[str, Any], classes: list[dict[str, Any]], where: Path
) -> None:
    """Refuse checkpoints of another run: another stage, architecture (``model``, a
    :func:`~dino_core.config.config_to_dict`) or class table. Needs no process group, so the stage checks
    it before launching any worker.

    Raises:
        IncompatibleRunError: naming what differs.
    """
    if saved.stage != stage:
        raise IncompatibleRunError(
            f"{where} holds checkpoints of a {saved.stage} run, this is {stage}: use another out="
        )
    saved_model = _normalised(saved.model, where)
    current_model = config_from_dict(model)
    if saved_model != current_model:
        differing = config_differences(saved_model, current_model, "checkpoint")
        raise IncompatibleRunError(
            f"{where} holds checkpoints of another model ({'; '.join(differing[:6])}): use another out= for "
            "this model, or the model= of that run to continue it"
        )
    if saved.classes != classes:
        saved_ids = {int(c["id"]): c["name"] for c in saved.classes}
        current_ids = {int(c["id"]): c["name"] for c in classes}
        diff = sorted(k for k in set(saved_ids) | set(current_ids) if saved_ids.get(k) != current_ids.get(k))
        raise IncompatibleRunError(
            f"{where} holds checkpoints trained on another class table (ids differing: {diff[:10]}): use "
            "another out= for this data"
        )


def check_resumable(saved: TrainState, current: TrainState, where: Path) -> None:
    """Refuse to continue ``saved`` (found in ``where``) under a config that changes what it is.

    Raises:
        IncompatibleRunError: another stage, architecture or class table (:func:`check_same_run`), or
            another world size / batch size / data workers / seed / accumulation / epoch length (the data
            position and the ZeRO partitions are defined for those) / ZeRO stage (the checkpoint files'
            layout).
    """
    check_same_run(saved, current.stage, current.model, current.classes, where)
    changed = [
        f"{k} {getattr(saved, k)} -> {getattr(current, k)}"
        for k in _RESUME_INVARIANTS
        if getattr(saved, k) != getattr(current, k)
    ]
    if saved.zero_stage is not None and saved.zero_stage != current.zero_stage:
        changed.append(f"ZeRO stage {saved.zero_stage} -> {current.zero_stage}")
    if changed:
        raise IncompatibleRunError(
            f"cannot resume {where} with a different {', '.join(changed)}: the data position and the "
            "ZeRO partitions are defined for the saved values; rerun with them, or start a new out="
        )


def _normalised(model: dict[str, Any], where: Path) -> DINOConfig:
    # Through the config class, so that a field added since the checkpoint compares as its default.
    try:
        return config_from_dict(model)
    except (TypeError, ValueError) as error:
        raise IncompatibleRunError(
            f"{where} holds checkpoints of a model this version cannot describe ({error}); use another out="
        ) from None


class CheckpointDir:
    """The ``<out>/checkpoints`` directory of a run."""

    def __init__(self, out: Path) -> None:
        self.root = Path(out) / CHECKPOINTS

    def partial(self, step: int) -> str:
        """The temporary tag a checkpoint of ``step`` is written under."""
        return f"{PARTIAL_PREFIX}{step_tag(step)}"

    def latest(self) -> str | None:
        """The tag ``latest`` names, checked to be a complete checkpoint; None when there is none.

        Raises:
            CheckpointError: ``latest`` names a directory without its train state.
        """
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        if not _STEP_DIR.match(tag) or not (self.root / tag / TRAIN_STATE).is_file():
            raise CheckpointError(
                f"{pointer} names {tag!r}, which is not a complete checkpoint in {self.root}; point it at "
                "the newest step_* directory holding train_state.json"
            )
        return tag

    def read_state(self, tag: str) -> TrainState:
        """The train state of checkpoint ``tag``."""
        path = self.root / tag / TRAIN_STATE
        return TrainState.from_json(path.read_bytes(), path)

    def write_state(self, tag: str, state: TrainState) -> None:
        """Write ``train_state.json`` into checkpoint ``tag`` (rank 0)."""
        atomic_write_bytes(self.root / tag / TRAIN_STATE, state.to_json())

    def write_rank_state(self, tag: str, rank: int, state: dict[str, Any]) -> None:
        """Write this rank's state (RNG, loss sums) into checkpoint ``tag``."""
        atomic_write_bytes(self.root / tag / RANKS / f"rank_{rank:05d}.json", json.dumps(state).encode())

    def read_rank_state(self, tag: str, rank: int) -> dict[str, Any]:
        """This rank's state of checkpoint ``tag``."""
        path = self.root / tag / RANKS / f"rank_{rank:05d}.json"
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint was written by fewer ranks")
        return json.loads(path.read_text())

    def ema_dir(self, tag: str) -> Path:
        """Where the EMA weights of checkpoint ``tag`` are (a model directory)."""
        return self.root / tag / EMA_DIR

    def commit(self, step: int) -> str:
        """Rank 0, after every rank wrote ``partial(step)``: rename it to its tag, then switch ``latest``.

        A complete directory of the same tag (left by a run killed between the rename and ``latest``) is
        replaced: its step is being redone from an earlier checkpoint.
        """
        tag = step_tag(step)
        final = self.root / tag
        if final.exists():
            log.warning("replacing %s (a checkpoint newer than latest, left by an interrupted run)", final)
            shutil.rmtree(final)
        os.replace(self.root / self.partial(step), final)
        _fsync_dir(self.root)
        atomic_write_bytes(self.root / LATEST, tag.encode())
        return tag

    def step_dirs(self) -> list[str]:
        """Complete-looking checkpoint tags, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir())

    def prune(self, keep: int, protect: set[str]) -> list[str]:
        """Delete all but the ``keep`` newest checkpoints (never those in ``protect``); 0 keeps all."""
        if keep <= 0:
            return []
        tags = self.step_dirs()
        doomed = [t for t in tags[: max(len(tags) - keep, 0)] if t not in protect]
        for tag in doomed:
            shutil.rmtree(self.root / tag, ignore_errors=True)
        return doomed

    def remove_partials(self) -> list[str]:
        """Delete checkpoints that were never completed (rank 0, before training starts)."""
        if not self.root.is_dir():
            return []
        stale = [p for p in self.root.iterdir() if p.name.startswith(PARTIAL_PREFIX)]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return [p.name for p in stale]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators as JSON-able data (no pickles)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }
    if device.type == "cuda":
        state["cuda"] = _b64(torch.cuda.get_rng_state(device))
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Undo :func:`rng_state` (the CUDA generator of ``device`` when saved on a GPU)."""
    torch.set_rng_state(_unb64(state["torch"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(_unb64(state["cuda"]), device)
