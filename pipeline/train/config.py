"""Typed configuration of the training stages (``python -m pipeline pretrain`` / ``finetune``).

Plain dataclasses with field docstrings; they are the Hydra/OmegaConf structured schemas of
``conf/pretrain.yaml`` and ``conf/finetune.yaml``, so field types are limited to int/float/bool/str/Path,
``X | None``, ``list[...]`` and nested dataclasses. Every ``__post_init__`` raises ``ValueError`` naming
the key (``train.lr must be > 0``); cross-field checks run in :class:`TrainStageConfig`, so a bad config
fails before any process group, GPU or Ray worker starts.

Recipe defaults follow the paper (DESIGN.md, Table 8): lr 1e-4, backbone lr 1e-5, weight decay 1e-4,
gradient clipping 0.1, batch 1 per GPU. The values the paper leaves open are documented where they are
set (LR drop epochs in ``conf/train/*.yaml``, EMA decay 0.9997 as in the official code, off by default as
there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dino_core.config import DINOConfig
from dino_core.presets import preset
from pipeline.config import flatten
from pipeline.data.manifest import is_remote
from pipeline.evaluation.config import EvalConfig, TTAConfig
from pipeline.tracking_config import TrackingConfig

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
LAUNCHERS = ("auto", "single", "torchrun", "ray")
STAGES = ("pretrain", "finetune")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

# Settings that do not change what a stage trains or the numbers it evaluates (bookkeeping, speed, memory,
# pictures): left out of :meth:`TrainStageConfig.result_settings`.
_NOT_RESULT_SETTINGS = (
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.nan_patience",
    "train.activation_checkpointing.",
    "eval.batch_size",
    "eval.num_workers",
    "eval.scorer",
    "eval.draw_images",
    "eval.draw_score_threshold",
    "eval.progress_every_s",
)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class ActivationCheckpointingConfig:
    """Recompute activations in the backward pass instead of storing them (each part its own switch)."""

    backbone: bool = False
    """Backbone stages (ResNet layers / Swin stages)."""
    encoder: bool = False
    """Deformable encoder layers."""
    decoder: bool = False
    """Decoder layers."""


@dataclass
class EMAConfig:
    """Exponential moving average of the weights (the official ``ModelEma``: updated after every step)."""

    enabled: bool = False
    decay: float = 0.9997
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step (official default)."""
    use: bool = True
    """When enabled: the EMA weights are the stage's weights (periodic evaluation, ``out/model.safetensors``)
    and the raw weights go to ``out/raw/``; false: the raw weights are the stage's and the EMA goes to
    ``out/ema/``."""

    def __post_init__(self) -> None:
        _require(0.0 < self.decay < 1.0, f"train.ema.decay must be in (0, 1), got {self.decay}")


@dataclass
class DataSourceConfig:
    """One weighted training source (e.g. Objects365 train and the val images beyond the first 5,000)."""

    manifest: str = ""
    """The split's ``manifest.json`` (path, split folder or http(s) URL)."""
    weight: float = 1.0
    """Relative sampling weight."""
    shards: str | None = None
    """Where the shard files are, as a template with ``{name}``; None: beside the manifest."""

    def __post_init__(self) -> None:
        _require(bool(self.manifest), "data_sources[].manifest must name a manifest.json")
        _require(self.weight > 0, f"data_sources[].weight must be > 0, got {self.weight} ({self.manifest})")


@dataclass
class TrainConfig:
    """The optimisation recipe and the loop's bookkeeping (the ``train`` node)."""

    epochs: int = 26
    """Passes over the training data (an epoch is ``epoch_samples`` images over all ranks)."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0: the epochs decide."""
    batch_size: int = 1
    """Images per process per micro-batch (the paper: 1 image per GPU)."""
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    lr_linear_proj_mult: float = 0.1
    """The deformable attention's sampling-offset projections train at ``lr * lr_linear_proj_mult`` (the
    official ``lr_linear_proj_names = ['reference_points', 'sampling_offsets']``)."""
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = True
    """Weight decay on normalisation weights and biases too (the official code decays every parameter);
    false puts them in ``*/no_decay`` groups."""
    clip_max_norm: float = 0.1
    """Gradient clipping (global L2 norm); 0 turns it off."""
    lr_drop_epochs: list[int] = field(default_factory=list)
    """At the start of each listed epoch (0-based) the lr of every group is multiplied by
    ``lr_drop_factor`` (the official StepLR/MultiStepLR, here applied at the step the epoch starts).
    Increasing, each in ``1 .. epochs - 1``: a drop the run never reaches is refused."""
    lr_drop_factor: float = 0.1
    warmup_steps: int = 0
    """Linear warm-up from ``lr / warmup_steps`` over this many optimizer steps (0: none, as officially)."""
    grad_accumulation: int = 1
    """Micro-batches per optimizer step."""
    checkpoint_every: int = 1000
    """Write a checkpoint every this many optimizer steps (0: only at epoch ends and at the end)."""
    keep_checkpoints: int = 3
    """Step checkpoints kept (the newest; ``latest``'s is never deleted); 0 keeps all."""
    log_every: int = 50
    """Progress line, tracking metrics and the one host read of the loss terms every this many steps."""
    eval_every_epochs: int = 1
    """Evaluate on ``val_data`` after every this many epochs (and always at the end); 0: at the end only."""
    seed: int = 42
    aug_scale: float = 1.0
    """Scale of the training augmentation's sizes (1.0: short side 480-800; fine-tuning 1.5)."""
    num_workers: int = 2
    """Data-loading worker processes per rank (fixed for a run: resuming needs the same number)."""
    shuffle_buffer: int = 64
    """Samples in each shard-draw's shuffle buffer."""
    epoch_samples: int | None = None
    """Images per epoch over all ranks; None: the training sources' sample count."""
    nan_patience: int = 5
    """Stop after this many consecutive non-finite losses (each one skips its step)."""
    backbone_weights: Path | None = None
    """Local ImageNet weight file for the backbone (safetensors or a weights-only .pth); pretraining only."""
    class_aliases: list[str] = field(default_factory=list)
    """Fine-tuning: extra ``"<target name>=<source name>"`` pairs for the class-head remap, for classes
    whose names differ between the label spaces (e.g. ``"tv=Monitor/TV"``)."""
    activation_checkpointing: ActivationCheckpointingConfig = field(
        default_factory=ActivationCheckpointingConfig
    )
    ema: EMAConfig = field(default_factory=EMAConfig)

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "grad_accumulation", "log_every", "nan_patience"):
            _require(getattr(self, key) >= 1, f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in (
            "max_steps",
            "warmup_steps",
            "checkpoint_every",
            "keep_checkpoints",
            "eval_every_epochs",
            "seed",
        ):
            _require(getattr(self, key) >= 0, f"train.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("lr", "lr_backbone", "lr_linear_proj_mult", "aug_scale"):
            _require(getattr(self, key) > 0, f"train.{key} must be > 0, got {getattr(self, key)}")
        _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.clip_max_norm >= 0, f"train.clip_max_norm must be >= 0, got {self.clip_max_norm}")
        _require(
            0.0 < self.lr_drop_factor <= 1.0,
            f"train.lr_drop_factor must be in (0, 1], got {self.lr_drop_factor}",
        )
        drops = list(self.lr_drop_epochs)
        _require(
            all(e >= 1 for e in drops) and drops == sorted(set(drops)),
            f"train.lr_drop_epochs must be increasing epochs >= 1 (0-based epoch starts; 0 would only lower "
            f"train.lr), got {drops}",
        )
        late = [e for e in drops if e >= self.epochs]
        _require(
            not late,
            f"train.lr_drop_epochs {drops} has drops at epochs {late}, which a run of "
            f"train.epochs={self.epochs} (epochs 0..{self.epochs - 1}) never reaches; raise train.epochs, or "
            "leave them out "
            f"(train.lr_drop_epochs=[{','.join(str(e) for e in drops if e < self.epochs)}])",
        )
        _require(self.num_workers >= 0, f"train.num_workers must be >= 0, got {self.num_workers}")
        _require(self.shuffle_buffer >= 1, f"train.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        _require(
            self.epoch_samples is None or self.epoch_samples >= 1,
            f"train.epoch_samples must be >= 1 (or null), got {self.epoch_samples}",
        )
        for alias in self.class_aliases:
            target, sep, source = alias.partition("=")
            _require(
                bool(sep and target.strip() and source.strip()),
                f"train.class_aliases entries must be '<target name>=<source name>', got {alias!r}",
            )


@dataclass
class DeepSpeedConfig:
    """How the DeepSpeed engine runs the model (the ``deepspeed`` node).

    Default ZeRO stage 2. The 218M-parameter Swin-L detector holds ~0.9 GB of fp32 weights, ~0.9 GB of
    gradients and ~1.7 GB of AdamW moments per replica (~3.5 GB), while one 800x1333 image's activations
    take many times that even with checkpointing: memory is dominated by activations, which no ZeRO stage
    shards. ZeRO-2 shards the optimizer state and the gradients (~2.6 GB less per GPU on 64 GPUs) with
    the same communication volume as plain data parallelism (a reduce-scatter of the gradients plus an
    all-gather of the updated weights) and nothing added to the forward pass. ZeRO-3 would also shard the
    ~0.9 GB of weights but gathers every layer's parameters in the forward and again in the backward,
    ~1.5x the traffic, a poor trade at one image per GPU. Stage 1 saves less than 2 at no lower cost.
    """

    zero_stage: int = 2
    """0 (plain data parallel), 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters)."""
    precision: str = "auto"
    """``auto``: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU; ``bf16`` (torch autocast,
    fp32 weights, as dino_core is written for: sampling locations and boxes stay fp32); ``fp16`` (DeepSpeed
    fp16 weights with dynamic loss scaling; needs ZeRO >= 1); ``fp32``."""
    fp16_initial_scale_power: int = 16
    """fp16 only: the dynamic loss scale starts at ``2 ** this``."""
    fp16_loss_scale_window: int = 1000
    """fp16 only: steps without overflow before the loss scale is raised."""
    offload_optimizer: bool = False
    """ZeRO >= 1: keep the optimizer state (and its step) in CPU memory."""
    offload_params: bool = False
    """ZeRO-3: keep the parameters in CPU memory between uses."""
    overlap_comm: bool = False
    """Overlap the gradient reduction with the backward pass (more memory for buckets)."""

    def __post_init__(self) -> None:
        _require(
            0 <= self.zero_stage <= 3, f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}"
        )
        _require(
            self.precision in PRECISIONS,
            f"deepspeed.precision must be one of {PRECISIONS}, got {self.precision!r}",
        )
        _require(
            self.precision != "fp16" or self.zero_stage >= 1,
            "deepspeed.precision=fp16 needs deepspeed.zero_stage >= 1 (the fp32 master weights the stage "
            "exports are read from the ZeRO checkpoint)",
        )
        _require(
            not self.offload_optimizer or self.zero_stage >= 1,
            "deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1",
        )
        _require(
            not self.offload_params or self.zero_stage == 3,
            "deepspeed.offload_params needs deepspeed.zero_stage=3",
        )
        _require(
            0 <= self.fp16_initial_scale_power <= 32,
            f"deepspeed.fp16_initial_scale_power must be in [0, 32], got {self.fp16_initial_scale_power}",
        )
        _require(
            self.fp16_loss_scale_window >= 1,
            f"deepspeed.fp16_loss_scale_window must be >= 1, got {self.fp16_loss_scale_window}",
        )


@dataclass
class LauncherConfig:
    """How the processes are started (the ``launcher`` node); the training code is the same for all.

    ``auto``: ``torchrun`` when the launcher's environment is present (RANK/WORLD_SIZE from torchrun, the
    ``deepspeed`` launcher or ``srun`` + torchrun), else ``single``. ``ray``: Ray Train's ``TorchTrainer``
    starts ``num_workers`` workers on a local Ray or on the cluster at ``ray_address``.
    """

    kind: str = "auto"
    num_workers: int = 2
    """Ray: training workers (one process each; one per GPU with ``use_gpu``)."""
    use_gpu: bool = False
    """Ray: one GPU per worker."""
    cpus_per_worker: float = 1.0
    """Ray: CPUs reserved per worker (data-loading workers run inside this reservation)."""
    ray_address: str | None = None
    """Ray: an existing cluster (``auto``, ``host:6379``, ``ray://host:10001``); None: start a local Ray."""
    max_failures: int = 0
    """Ray: restarts of the worker group after a worker failure; each restart resumes from ``latest``."""
    placement_strategy: str = "PACK"
    """Ray: how workers are placed on nodes (``PACK``, ``SPREAD``, ``STRICT_PACK``, ``STRICT_SPREAD``)."""

    def __post_init__(self) -> None:
        _require(self.kind in LAUNCHERS, f"launcher.kind must be one of {LAUNCHERS}, got {self.kind!r}")
        _require(self.num_workers >= 1, f"launcher.num_workers must be >= 1, got {self.num_workers}")
        _require(
            self.cpus_per_worker > 0, f"launcher.cpus_per_worker must be > 0, got {self.cpus_per_worker}"
        )
        _require(self.max_failures >= -1, f"launcher.max_failures must be >= -1, got {self.max_failures}")
        _require(
            self.placement_strategy in PLACEMENTS,
            f"launcher.placement_strategy must be one of {PLACEMENTS}, got {self.placement_strategy!r}",
        )


@dataclass
class TrainStageConfig:
    """``python -m pipeline pretrain|finetune``: one training stage, from shards to a model directory.

    Output layout (``out``)::

        checkpoints/step_00001000/   one complete checkpoint per directory (DeepSpeed files, train state,
                                     per-rank RNG, EMA as a model directory)
        checkpoints/latest           the name of the newest complete checkpoint (switched atomically)
        model.safetensors, model.json   the stage's consolidated fp32 weights and card (written last)
        raw/ or ema/                 the other weights when EMA is enabled
        metrics.jsonl                one record per progress line (step, losses, lr per group, images/s)
        eval/epoch_NNN/              periodic evaluations; eval/final/ at the end
        train_result.json            the completion record
    """

    model: DINOConfig = field(default_factory=lambda: preset("dino_swinl_4scale"))
    """The architecture (``model=<preset>``). ``num_classes`` is derived from the training data's category
    table (max id + 1); the preset's value is replaced and the change is logged."""
    stage: str = "pretrain"
    """``pretrain`` or ``finetune`` (set by the command's config)."""
    data: str | None = None
    """The training split's manifest (path, split folder or URL); shorthand for one source of weight 1."""
    data_sources: list[DataSourceConfig] = field(default_factory=list)
    """Weighted training sources (used together with ``data`` if both are given); same category table."""
    val_data: str | None = None
    """The evaluation split's manifest for periodic evaluation; None: no evaluation."""
    out: Path = Path("outputs/pretrain")
    """The stage's directory (must be on storage every node sees for multi-node runs)."""
    init: Path | None = None
    """Fine-tuning: the model directory of a pretraining run (``out`` of ``pretrain``)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)
    """TTA of the final evaluation (off by default: periodic evaluations are always plain)."""

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            from dino_core.config import config_from_dict

            self.model = config_from_dict(self.model)
        _require(isinstance(self.model, DINOConfig), "model must be a model preset (model=<preset>)")
        _require(self.stage in STAGES, f"stage must be one of {STAGES}, got {self.stage!r}")
        _require(
            bool(self.data) or len(self.data_sources) > 0,
            "data must be set: data=MANIFEST (the training split's manifest.json), or data_sources",
        )
        if self.stage == "finetune":
            _require(
                self.init is not None,
                "finetune needs init=DIR: the output directory of a pretraining run (model.json + "
                "model.safetensors)",
            )
            _require(
                self.train.backbone_weights is None,
                "train.backbone_weights is for pretraining; finetune takes the backbone from init",
            )
        else:
            _require(
                self.init is None,
                "init is for finetune (python -m pipeline finetune init=DIR ...); pretraining starts from "
                "train.backbone_weights",
            )
        _require(
            self.launcher.kind != "ray" or self.launcher.num_workers >= 1,
            "launcher.num_workers must be >= 1 for launcher.kind=ray",
        )
        _require(
            not (self.train.ema.enabled and self.deepspeed.offload_params),
            "train.ema with deepspeed.offload_params is not supported (the EMA update gathers the "
            "parameters on the device)",
        )

    def result_settings(self) -> dict[str, Any]:
        """The settings that decide what the stage trains and the numbers it reports, flat by dotted key
        (``train.lr``, ``data``, ``tta.scales``; local paths made absolute), as JSON values.

        The completion record keeps them, so that a rerun of a finished stage with other values is refused
        instead of reported as done. The model and the class table are checked apart (with the
        checkpoints); bookkeeping (``train.log_every``, ``eval.num_workers``, ...) is left out.
        """
        settings: dict[str, Any] = {
            "data": _location(self.data),
            "data_sources": [
                {"manifest": _location(s.manifest), "weight": s.weight, "shards": s.shards}
                for s in self.data_sources
            ],
            "val_data": _location(self.val_data),
            "init": _location(self.init),
            "deepspeed.precision": self.deepspeed.precision,
        }
        if self.deepspeed.precision == "fp16":
            settings["deepspeed.fp16_initial_scale_power"] = self.deepspeed.fp16_initial_scale_power
            settings["deepspeed.fp16_loss_scale_window"] = self.deepspeed.fp16_loss_scale_window
        for section in ("train", "eval", "tta"):
            settings.update({f"{section}.{k}": v for k, v in flatten(getattr(self, section)).items()})
        settings["train.backbone_weights"] = _location(self.train.backbone_weights)
        return {k: v for k, v in settings.items() if not k.startswith(_NOT_RESULT_SETTINGS)}

    def sources(self) -> list[DataSourceConfig]:
        """The training sources: ``data`` (weight 1) followed by ``data_sources``."""
        first = [DataSourceConfig(manifest=str(self.data))] if self.data else []
        return first + list(self.data_sources)


def _location(value: str | Path | None) -> str | None:
    """A path or URL as the same string from any working directory (local paths made absolute)."""
    if value is None:
        return None
    text = str(value)
    return text if is_remote(text) else os.path.abspath(text)
