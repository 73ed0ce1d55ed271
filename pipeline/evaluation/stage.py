"""The ``eval`` stage: ``python -m pipeline eval checkpoint=DIR data=MANIFEST out=DIR eval.batch_size=N``.

It reads a checkpoint directory (``model.safetensors`` + ``model.json``) and an evaluation split's
manifest, refuses a checkpoint whose class table or preset does not match before any inference, runs
the evaluation on every rank (``torchrun`` sets RANK/WORLD_SIZE: gloo on CPU, NCCL on GPUs) and writes
the files of :mod:`pipeline.evaluation.outputs` from rank 0. Training stages call
:func:`run_evaluation` for their periodic evaluation.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dino_core.atd import anchor_distances
from dino_core.builder import build_criterion
from dino_core.config import DINOConfig
from pipeline.data.manifest import Manifest
from pipeline.evaluation.config import EvalConfig, TTAConfig
from pipeline.evaluation.engine import AnchorDistances, EvalRun, evaluate
from pipeline.evaluation.outputs import Tracker, flat_metrics, write_outputs
from pipeline.evaluation.samples import EvalSample

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A checkpoint that cannot be evaluated on this data or under this config; says what differs."""


@dataclass
class EvalStageConfig:
    """``python -m pipeline eval``: score a checkpoint on an evaluation split, with and without TTA."""

    checkpoint: Path | None = None
    """Checkpoint directory (``model.safetensors`` + ``model.json``). Required."""
    data: Path | None = None
    """The evaluation split: its ``manifest.json`` or the folder holding it. Required."""
    out: Path = Path("outputs/eval")
    """The stage's directory: metrics.json, detections*.json, pr_curve.png, drawn/."""
    preset: str | None = None
    """Refuse a checkpoint of another model preset (None: accept the checkpoint's preset)."""
    shards: str | None = None
    """Where the shard files are, as a template with ``{name}`` (None: beside the manifest)."""
    device: str = "auto"
    """``auto`` (this rank's GPU when there is one, else the CPU), ``cpu`` or ``cuda``."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)

    def __post_init__(self) -> None:
        if self.checkpoint is None:
            raise ValueError("checkpoint must be set: checkpoint=DIR (a directory with model.json)")
        if self.data is None:
            raise ValueError("data must be set: data=MANIFEST (an evaluation split's manifest.json)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")


def check_checkpoint(
    card_preset: str,
    card_classes: list[dict[str, Any]],
    num_classes: int,
    categories: list[dict[str, Any]],
    expected_preset: str | None,
) -> None:
    """Refuse a checkpoint that does not fit the data or the config (called before any inference).

    Args:
        card_preset: the checkpoint's model preset name.
        card_classes: its class table, ``[{"id", "name"}]`` (the dataset category ids it was trained on).
        num_classes: its classification head size (class index == category id, so ids must be below it).
        categories: the evaluation split's category table (the manifest's).
        expected_preset: the preset the config asks for (None: any).

    Raises:
        CheckpointMismatchError: naming what differs and what to do.
    """
    if expected_preset is not None and card_preset != expected_preset:
        raise CheckpointMismatchError(
            f"the checkpoint is a {card_preset!r} model but the config asks for preset={expected_preset!r}; "
            f"pass preset={card_preset} (or preset=null) or evaluate a {expected_preset} checkpoint"
        )
    theirs = {int(c["id"]): str(c["name"]) for c in card_classes}
    ours = {int(c["id"]): str(c["name"]) for c in categories}
    if theirs != ours:
        only_model = sorted(set(theirs) - set(ours))
        only_data = sorted(set(ours) - set(theirs))
        renamed = sorted(i for i in set(ours) & set(theirs) if ours[i] != theirs[i])
        raise CheckpointMismatchError(
            f"the checkpoint's class table ({len(theirs)} classes) does not match the evaluation data's "
            f"category table ({len(ours)}): ids only in the checkpoint {only_model[:10]}, only in the data "
            f"{only_data[:10]}, named differently {[(i, theirs[i], ours[i]) for i in renamed[:5]]}; evaluate "
            "on the split the model was trained for, or fine-tune it on this label space first"
        )
    too_large = [i for i in ours if i >= num_classes]
    if too_large:
        raise CheckpointMismatchError(
            f"category ids {too_large[:10]} are not below the checkpoint's num_classes={num_classes}; "
            "class index == category id, so the model cannot predict them"
        )


def atd_function(model_cfg: DINOConfig) -> AnchorDistances:
    """The per-batch anchor distances of ATD (``dino_core.atd``) with the model's own Hungarian matcher."""
    return functools.partial(anchor_distances, matcher=build_criterion(model_cfg).matcher)


def manifest_sha256(manifest: Manifest) -> str:
    """sha256 of the manifest file's bytes (what metrics.json records as the data evaluated)."""
    path = Path(manifest.location)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_evaluation(
    model: nn.Module,
    samples: Iterable[EvalSample],
    categories: list[dict[str, Any]],
    eval_cfg: EvalConfig,
    tta_cfg: TTAConfig,
    out_dir: Path,
    header: dict[str, Any],
    anchor_distances: AnchorDistances | None = None,
    expected_images: int | None = None,
    tracker: Tracker | None = None,
    step: int | None = None,
) -> EvalRun | None:
    """Evaluate ``model`` and write the outputs (rank 0); the entry point for periodic evaluation too.

    All ranks call it together with their own ``samples``. Rank 0 writes ``out_dir`` and, with a
    ``tracker``, logs :func:`~pipeline.evaluation.outputs.flat_metrics` (``step``: the epoch) and the
    files. Returns the :class:`EvalRun` on rank 0, None elsewhere.
    """
    run = evaluate(
        model,
        samples,
        categories,
        eval_cfg,
        tta_cfg,
        anchor_distances=anchor_distances,
        expected_images=expected_images,
    )
    if run is None:
        return None
    settings = {"eval": asdict(eval_cfg), "tta": asdict(tta_cfg)}
    write_outputs(run, out_dir, categories, header, settings, eval_cfg.draw_score_threshold)
    plain = run.metrics["plain"].stats
    log.info(
        "eval: %d images, AP %s, AP50 %s%s",
        run.num_images,
        _fmt(plain["AP"]),
        _fmt(plain["AP50"]),
        "".join(f", {mode} AP {_fmt(m.stats['AP'])}" for mode, m in run.metrics.items() if mode != "plain"),
    )
    if tracker is not None:
        tracker.log_metrics(flat_metrics(run), step=step)
        tracker.log_artifacts(out_dir, artifact_path=None if step is None else f"eval/epoch_{step:03d}")
    return run


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _device(choice: str) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA GPU is visible; use device=cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes (RANK/WORLD_SIZE); True when this call created it."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
