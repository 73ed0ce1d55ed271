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
from dino_core.config import DINOConfig, config_differences, config_from_dict
from dino_core.presets import PRESETS
from pipeline.checkpoint import ModelCard, load_card, load_checkpoint
from pipeline.config import inputs_accepted
from pipeline.data.manifest import Manifest, ManifestError, load_manifest, read_text
from pipeline.evaluation.config import EvalConfig, TTAConfig
from pipeline.evaluation.engine import AnchorDistances, EvalRun, evaluate
from pipeline.evaluation.outputs import Tracker, flat_metrics, write_outputs
from pipeline.evaluation.samples import EvalSample, eval_samples, images_of_rank
from pipeline.tracking import Tracker as StageRun
from pipeline.tracking import start_run
from pipeline.tracking_config import TrackingConfig

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A checkpoint that cannot be evaluated on this data or under this config; says what differs."""


@dataclass
class EvalStageConfig:
    """``python -m pipeline eval``: score a checkpoint on an evaluation split, with and without TTA."""

    checkpoint: Path | None = None
    """A model directory (``model.safetensors`` + ``model.json``) or an official DINO ``.pth``. Required."""
    data: Path | None = None
    """The evaluation split: its ``manifest.json`` or the folder holding it. Required."""
    out: Path = Path("outputs/eval")
    """The stage's directory: metrics.json, detections*.json, pr_curve.png, drawn/."""
    model: Any = None
    """``model=<preset>``: refuse a checkpoint of another architecture (required for official files);
    None: the checkpoint's own ``model.json`` defines it. Typed ``Any`` so that Hydra can leave it
    empty (as in ``predict``); checked as a :class:`DINOConfig` below."""
    shards: str | None = None
    """Where the shard files are, as a template with ``{name}`` (None: beside the manifest); local files
    are checked before the model is loaded, URLs and ``pipe:`` commands are left to the reader."""
    device: str = "auto"
    """``auto`` (this rank's GPU when there is one, else the CPU), ``cpu`` or ``cuda``."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow: the run of this evaluation (default: a SQLite store in ``out``; ``tracking=none``: off)."""

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = config_from_dict(self.model)
        if self.model is not None and not isinstance(self.model, DINOConfig):
            raise ValueError(f"model must be a preset (model=<preset>), got {type(self.model).__name__}")
        if self.checkpoint is None:
            raise ValueError("checkpoint must be set: checkpoint=DIR (a model directory with model.json)")
        if self.data is None:
            raise ValueError("data must be set: data=MANIFEST (an evaluation split's manifest.json)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")


def check_checkpoint(card: ModelCard, categories: list[dict[str, Any]], model: DINOConfig | None) -> None:
    """Refuse a checkpoint that does not fit the data or the config; called before any inference.

    Args:
        card: the checkpoint's card: its architecture (``card.config``) and class table (``card.classes``,
            the dataset category ids it predicts: class index == category id).
        categories: the evaluation split's category table (the manifest's ``id``/``name``).
        model: the architecture the config asks for (``model=<preset>``), or None for any.

    Raises:
        CheckpointMismatchError: naming what differs and what to do.
    """
    config = card.config
    if model is not None and config != model:
        differing = config_differences(config, model, "checkpoint")
        raise CheckpointMismatchError(
            f"the checkpoint is a {_preset_name(config) or 'custom'} model, the config asks for "
            f"{_preset_name(model) or 'another architecture'} ({'; '.join(differing[:6])}); drop the "
            "model= override (the checkpoint's model.json defines the architecture) or evaluate a matching "
            "checkpoint"
        )
    theirs_classes = {int(c["id"]): str(c["name"]) for c in card.classes}
    ours_classes = {int(c["id"]): str(c["name"]) for c in categories}
    if theirs_classes != ours_classes:
        only_model = sorted(set(theirs_classes) - set(ours_classes))
        only_data = sorted(set(ours_classes) - set(theirs_classes))
        renamed = sorted(
            i for i in set(ours_classes) & set(theirs_classes) if ours_classes[i] != theirs_classes[i]
        )
        raise CheckpointMismatchError(
            f"the checkpoint's class table ({len(theirs_classes)} classes) does not match the evaluation "
            f"data's category table ({len(ours_classes)}): ids only in the checkpoint {only_model[:10]}, "
            f"only in the data {only_data[:10]}, named differently "
            f"{[(i, theirs_classes[i], ours_classes[i]) for i in renamed[:5]]}; evaluate on the split the "
            "model was trained for, or fine-tune it on this label space first"
        )
    too_large = sorted(i for i in ours_classes if i >= config.num_classes)
    if too_large:
        raise CheckpointMismatchError(
            f"category ids {too_large[:10]} are not below the checkpoint's num_classes={config.num_classes}; "
            "class index == category id, so the model cannot predict them"
        )


def _preset_name(config: DINOConfig) -> str | None:
    return next((name for name, preset in PRESETS.items() if preset == config), None)


def atd_function(model_cfg: DINOConfig) -> AnchorDistances:
    """The per-batch anchor distances of ATD (``dino_core.atd``) with the model's own Hungarian matcher."""
    return functools.partial(anchor_distances, matcher=build_criterion(model_cfg).matcher)


def manifest_sha256(manifest: Manifest) -> str:
    """sha256 of the manifest file's bytes, local or http(s): what metrics.json records as the data."""
    return hashlib.sha256(read_text(manifest.location).encode("utf-8")).hexdigest()


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


def run(cfg: EvalStageConfig) -> int:
    """The ``eval`` command: every rank evaluates its share, rank 0 writes ``cfg.out``; the exit code."""
    assert cfg.checkpoint is not None and cfg.data is not None  # checked by EvalStageConfig
    if cfg.device == "cuda" and not torch.cuda.is_available():
        return _error("device=cuda but no CUDA GPU is visible; use device=cpu")
    device = _device(cfg.device)
    created = _init_distributed(device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    try:
        # The run exists before the checks, so that a refused evaluation is in MLflow too (FAILED).
        with start_run(cfg.tracking, cfg.out, "eval", config=cfg, rank=rank) as tracker:
            _evaluate_checkpoint(cfg, device, rank, world, tracker)
        return 0
    except _Refused as error:
        return _error(str(error))
    finally:
        if created:
            dist.destroy_process_group()


class _Refused(Exception):
    """An input the evaluation refuses before any inference (exit code 2)."""


def _evaluate_checkpoint(
    cfg: EvalStageConfig, device: torch.device, rank: int, world: int, tracker: StageRun
) -> None:
    assert cfg.checkpoint is not None and cfg.data is not None
    try:
        manifest = load_manifest(cfg.data)
    except ManifestError as error:
        raise _Refused(str(error)) from error
    if manifest.num_samples == 0:
        raise _Refused(f"{manifest.location}: the split has no images to evaluate")
    categories = [{"id": c.id, "name": c.name} for c in manifest.categories]
    try:
        if cfg.checkpoint.is_dir():
            # Refuse on the card alone, before reading any weights.
            check_checkpoint(load_card(cfg.checkpoint), categories, cfg.model)
        # Beside the manifest, or where a shard template (``{name}``) puts other copies of the shards.
        manifest.check_local_shards(cfg.shards or None)
        model, card = load_checkpoint(cfg.checkpoint, cfg.model, device)
        check_checkpoint(card, categories, cfg.model)
    except ValueError as error:  # CheckpointMismatchError, missing shards or an unreadable checkpoint
        raise _Refused(str(error)) from error
    header = {
        "checkpoint": {
            "path": str(cfg.checkpoint.resolve()),
            "preset": _preset_name(card.config),
            "step": card.step,
            "epoch": card.epoch,
            "stage": card.stage,
            "ema": card.ema,
            "source": card.source,
        },
        "dataset": {
            "manifest": manifest.location,
            "manifest_sha256": manifest_sha256(manifest),
            "dataset": manifest.dataset,
            "split": manifest.split,
        },
    }
    inputs_accepted()  # from here on the evaluation writes into out (the CLI's record first)
    tracker.set_tags(
        {
            "dataset.manifest_sha256": header["dataset"]["manifest_sha256"],
            "checkpoint": header["checkpoint"]["path"],
        }
    )
    if rank == 0:
        log.info(
            "eval: %s on %s/%s (%d images), %d rank(s), device %s",
            cfg.checkpoint,
            manifest.dataset,
            manifest.split,
            manifest.num_samples,
            world,
            device,
        )
    run_evaluation(
        model,
        eval_samples(manifest, rank, world, cfg.eval.num_workers, cfg.shards),
        categories,
        cfg.eval,
        cfg.tta,
        cfg.out,
        header,
        tracker=tracker if rank == 0 else None,
        anchor_distances=atd_function(card.config),
        expected_images=images_of_rank(manifest, rank, world, cfg.eval.num_workers),
    )
    if rank == 0:
        log.info("eval: wrote %s", cfg.out / "metrics.json")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _device(choice: str) -> torch.device:
    """``cpu``, or ``auto``/``cuda`` (checked visible by ``run``): this rank's GPU when there is one."""
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
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
