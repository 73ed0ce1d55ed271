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
import zipfile
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
_ZERO_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


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

    ``model.num_classes`` is not a ``model=`` setting: the stage derives it from the training data's class
    table, so a difference there is reported with the class table, as a difference of the data.

    Raises:
        IncompatibleRunError: naming what differs and the setting (``model=`` or ``data=``) it comes from.
    """
    if saved.stage != stage:
        raise IncompatibleRunError(
            f"{where} holds checkpoints of a {saved.stage} run, this is {stage}: use another out="
        )
    saved_model = _normalised(saved.model, where)
    current_model = config_from_dict(model)
    differing = config_differences(saved_model, current_model, "checkpoint")
    architecture = [d for d in differing if not d.startswith("model.num_classes:")]
    if saved.classes != classes:
        problems = []
        if architecture:
            problems.append(f"another model ({'; '.join(architecture[:6])})")
        problems.append(f"another class table ({_class_table_differences(saved.classes, classes)})")
        raise IncompatibleRunError(
            f"{where} holds checkpoints trained on {' and on '.join(problems)}. The class table (and "
            "model.num_classes) come from the training data's manifests (data=, data_sources): use another "
            f"out= for this data{' and model' if architecture else ''}, or the data="
            f"{' and model=' if architecture else ''} of that run to continue it"
        )
    if differing:
        raise IncompatibleRunError(
            f"{where} holds checkpoints of another model ({'; '.join(differing[:6])}): use another out= for "
            "this model, or the model= of that run to continue it"
        )


def _class_table_differences(saved: list[dict[str, Any]], current: list[dict[str, Any]]) -> str:
    """``id 1: checkpoint 'cat', data 'dog'; ...`` (the first 5 ids, and how many differ)."""
    saved_ids = {int(c["id"]): c["name"] for c in saved}
    current_ids = {int(c["id"]): c["name"] for c in current}
    ids = sorted(k for k in set(saved_ids) | set(current_ids) if saved_ids.get(k) != current_ids.get(k))
    shown = [f"id {k}: checkpoint {_name(saved_ids, k)}, data {_name(current_ids, k)}" for k in ids[:5]]
    more = f"; {len(ids) - 5} more" if len(ids) > 5 else ""
    return f"{len(ids)} of {len(set(saved_ids) | set(current_ids))} ids differ: {'; '.join(shown)}{more}"


def _name(table: dict[int, str], class_id: int) -> str:
    return repr(table[class_id]) if class_id in table else "no class"


def check_finished_settings(recorded: dict[str, Any], current: dict[str, Any], out: Path, steps: int) -> None:
    """Refuse to call a finished run done when the config asks for other settings (what
    :meth:`~pipeline.train.config.TrainStageConfig.result_settings` records in ``train_result.json``).

    A finished run is not trained again, so another ``train.lr`` or ``val_data`` would silently not apply.
    Only settings both sides know are compared (a setting added since the run was recorded is not a
    difference); a record without settings (written before they were recorded) cannot be compared.

    Raises:
        IncompatibleRunError: naming every differing setting and the two ways out.
    """
    if not recorded:
        log.warning(
            "%s records no settings (written by an older version): cannot check that the config matches the "
            "finished run",
            out / "train_result.json",
        )
        return
    current = json.loads(json.dumps(current))  # as read back from JSON: lists, not tuples
    differing = [
        f"{key}: finished run {recorded[key]!r}, config {current[key]!r}"
        for key in sorted(recorded.keys() & current.keys())
        if recorded[key] != current[key]
    ]
    if differing:
        shown = "; ".join(differing[:8]) + (f"; {len(differing) - 8} more" if len(differing) > 8 else "")
        raise IncompatibleRunError(
            f"{out} holds a finished run ({steps} steps) of other settings ({shown}), and a finished run is "
            "not trained again: use a new out= to train with these settings, or the finished run's settings "
            "to leave it as it is (to train longer, raise train.epochs or train.max_steps)"
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

    def check_files(self, tag: str, state: TrainState) -> None:
        """Check that checkpoint ``tag`` (whose train state is ``state``) is whole before a run resumes
        from it: the DeepSpeed files (model states; with ZeRO >= 1 each rank's optimizer states) are
        complete torch archives, every rank's state is readable JSON, the EMA weights (if any) a complete
        safetensors file. It reads each file's index, not its data: a truncated or missing file is found
        in milliseconds, before any process group or model is built.

        Raises:
            CheckpointError: naming the checkpoint, each damaged file, and how to resume from an earlier
                checkpoint (nothing is deleted or skipped here).
        """
        directory = self.root / tag
        problems: list[str] = []
        archives = sorted(p for p in directory.glob("*.pt") if p.is_file())
        if not any(p.name.endswith("model_states.pt") for p in archives):
            problems.append("no DeepSpeed model states (*model_states.pt)")
        if state.zero_stage:
            with_optim = {int(m[1]) for p in archives if (m := _ZERO_OPTIM.match(p.name))}
            problems += [
                f"no ZeRO optimizer states of rank {rank} (zero_pp_rank_{rank}_*optim_states.pt)"
                for rank in range(state.world_size)
                if rank not in with_optim
            ]
        problems += [f"{p.name}: {problem}" for p in archives if (problem := _archive_problem(p))]
        for rank in range(state.world_size):
            path = directory / RANKS / f"rank_{rank:05d}.json"
            try:
                rank_state = json.loads(path.read_bytes())
            except FileNotFoundError:
                problems.append(f"{RANKS}/{path.name}: missing")
                continue
            except (OSError, ValueError) as error:
                problems.append(f"{RANKS}/{path.name}: not readable JSON ({error})")
                continue
            if not isinstance(rank_state, dict) or not {"rng", "meter"} <= rank_state.keys():
                problems.append(f"{RANKS}/{path.name}: not a rank state (no rng/meter)")
        ema_file = self.ema_dir(tag) / "model.safetensors"
        if ema_file.is_file() and (problem := _safetensors_problem(ema_file)):
            problems.append(f"{EMA_DIR}/{ema_file.name}: {problem}")
        if problems:
            raise CheckpointError(
                f"the checkpoint {directory} is damaged ({'; '.join(problems[:6])}), so the run cannot "
                f"resume from it. {self.earlier_checkpoint_fix(tag)}"
            )

    def earlier_checkpoint_fix(self, tag: str) -> str:
        """What to do about a damaged checkpoint ``tag``: resume from the newest earlier one, or start
        over."""
        earlier = [t for t in self.step_dirs() if t < tag]
        if earlier:
            return (
                f"To resume from the checkpoint before it, delete {self.root / tag} and write {earlier[-1]} "
                f"into {self.root / LATEST} (the steps since then are trained again); or use a new out="
            )
        return (
            f"It is the only checkpoint: use a new out=, or delete {self.root} to train this out= from the "
            "start"
        )

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


def _archive_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete torch archive (``torch.save``'s zip format), or None. Reads the zip's
    central directory, at the end of the file, and checks every member lies inside the file."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        return f"not a complete torch archive ({size:,} bytes; {error})"
    if not members:
        return "an empty archive"
    end = max(m.header_offset + len(m.filename) + 30 + m.compress_size for m in members)
    if end > size:
        return f"cut short ({size:,} bytes, its index needs {end:,})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None (its header and the data size it names)."""
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length)) if 0 < length < 100_000_000 else None
    except (OSError, ValueError) as error:
        return f"unreadable header ({error})"
    if not isinstance(header, dict):
        return "not a safetensors file"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    needed = 8 + length + max(ends, default=0)
    size = path.stat().st_size
    return f"cut short ({size:,} bytes, its header needs {needed:,})" if size < needed else None


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
