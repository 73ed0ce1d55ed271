"""Typed configuration of ``python -m pipeline run`` (the schema of ``conf/run.yaml``) and of ``paths``.

Light on purpose (no Ray, no torch): the CLI imports the schema of the command it runs before anything
else. A pipeline is an ordered set of stages; each stage is one of the stage commands
(``make-demo-data``, ``shard``, ``pretrain``, ``finetune``, ``eval``) with the overrides an operator
would type after it, so every stage of a ``run`` can be rerun by hand with the command line that its
completion record shows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.tracking_config import TrackingConfig

STAGE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
PATH_ENV = {
    "coco": ("DINO_COCO_ROOT", "the COCO 2017 root"),
    "o365": ("DINO_O365_ROOT", "the Objects365 root"),
    "weights": ("DINO_WEIGHTS_DIR", "the folder of backbone and official DINO weight files"),
}
"""The environment variable behind each ``paths`` entry (``conf/paths/default.yaml``) and what it is."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class PathsConfig:
    """Where the real datasets and weights are on a cluster (``conf/paths``); null until set.

    A pipeline names the ones it reads in ``requires_paths``; an unset one fails validation naming the key
    and its environment variable.
    """

    coco: str | None = None
    """COCO 2017 root: ``train2017/``, ``val2017/``, ``annotations/instances_{train,val}2017.json``."""
    o365: str | None = None
    """Objects365 root: ``zhiyuan_objv2_{train,val}.json`` and ``images/v{1,2}/patch*/``."""
    weights: str | None = None
    """Folder of weight files: backbone ImageNet weights (``swin_large_patch4_window12_384_22k.pth``,
    ``resnet50.pth``) and official DINO checkpoints (``checkpoint0011_4scale.pth``)."""


@dataclass
class StageSpec:
    # Not frozen: OmegaConf makes dict values of a frozen type read-only, so experiments could not set them.
    """One stage of a pipeline: a stage command and its overrides."""

    command: str = ""
    """The stage command (``make-demo-data``, ``shard``, ``pretrain``, ``finetune``, ``eval``)."""
    experiment: str = ""
    """A stage experiment (``conf/experiment/<name>.yaml``) applied first; empty: none."""
    overrides: list[str] = field(default_factory=list)
    """The stage's overrides, as typed after ``python -m pipeline <command>``; reference other stages'
    outputs through ``${out}`` (the pipeline's directory). ``out`` (and the tracking target) is set by
    ``run``."""
    extra: list[str] = field(default_factory=list)
    """More overrides applied last (for a one-off change: ``stages.pretrain.extra=[train.lr=2e-4]``); an
    override of a key that ``overrides`` sets replaces it."""
    after: list[str] = field(default_factory=list)
    """Stages whose outputs this one reads: it starts when they are complete, and reruns when they do."""
    out: str = ""
    """The stage's output directory under the pipeline's (empty: the stage name)."""
    enabled: bool = True
    """False leaves the stage out (its dependants then need its outputs from an earlier run)."""
    num_cpus: float = 1.0
    """CPUs of the Ray task that runs a task stage (make-demo-data, eval); shard tasks and the training
    launcher's workers ask for their own."""
    num_gpus: float = 0.0
    """GPUs of that Ray task (eval on a GPU node: 1)."""


@dataclass(frozen=True)
class RayConfig:
    """Which Ray runs the stages."""

    address: str | None = None
    """An existing cluster (``auto`` on a cluster node, ``ray://head:10001``); None: a local Ray."""
    num_cpus: int | None = None
    """CPUs of the local Ray (None: all of the machine's); ignored with ``address``."""
    dashboard: bool = True
    """Start the local Ray's dashboard (progress of the stages' tasks and the training run)."""
    dashboard_port: int = 8265

    def __post_init__(self) -> None:
        _require(
            self.num_cpus is None or self.num_cpus >= 1, f"ray.num_cpus must be >= 1, got {self.num_cpus}"
        )
        _require(
            1 <= self.dashboard_port <= 65535,
            f"ray.dashboard_port must be a TCP port, got {self.dashboard_port}",
        )


@dataclass
class RunConfig:
    """``python -m pipeline run``: every stage of a pipeline in order, on Ray, tracked in MLflow."""

    name: str = "demo"
    """The pipeline's name: the MLflow experiment and the default output directory ``outputs/<name>``."""
    out: Path = Path("outputs/demo")
    """Everything goes here: one directory per stage, ``summary.json``, the MLflow store."""
    stages: dict[str, StageSpec] = field(default_factory=dict)
    """The stages by name, in the order they run (a stage waits for those in its ``after``)."""
    only: list[str] = field(default_factory=list)
    """Run just these stages (the others must be complete from an earlier run); empty: all."""
    force: list[str] = field(default_factory=list)
    """Rerun these stages even when their completion record matches."""
    requires_paths: list[str] = field(default_factory=list)
    """The ``paths`` entries this pipeline reads (checked before any work)."""
    dry_run: bool = False
    """Validate every stage's config and print the plan (run / skip, command lines), then stop."""
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        _require(bool(self.stages), "stages is empty: pick a pipeline with experiment=<name> (e.g. demo)")
        names = list(self.stages)
        for name, spec in self.stages.items():
            _require(
                bool(STAGE_NAME.match(name)),
                f"stages.{name}: a stage name is lowercase letters, digits and underscores",
            )
            _require(bool(spec.command), f"stages.{name}.command must name a stage command")
            for dependency in spec.after:
                _require(
                    dependency in self.stages,
                    f"stages.{name}.after names {dependency!r}, which is not a stage ({', '.join(names)})",
                )
                _require(
                    names.index(dependency) < names.index(name),
                    f"stages.{name}.after names {dependency!r}, which comes later; list stages in run order",
                )
            _require(spec.num_cpus >= 0, f"stages.{name}.num_cpus must be >= 0, got {spec.num_cpus}")
            _require(spec.num_gpus >= 0, f"stages.{name}.num_gpus must be >= 0, got {spec.num_gpus}")
        for key in ("only", "force"):
            unknown = [s for s in getattr(self, key) if s not in self.stages]
            _require(not unknown, f"{key} names unknown stages {unknown}; stages: {', '.join(names)}")
        for name in self.requires_paths:
            _require(name in PATH_ENV, f"requires_paths names {name!r}; known paths: {', '.join(PATH_ENV)}")
            _require(
                getattr(self.paths, name) is not None,
                f"paths.{name} ({PATH_ENV[name][1]}) is not set and pipeline {self.name!r} reads it: pass "
                f"paths.{name}=/abs/dir or export {PATH_ENV[name][0]}",
            )

    def stage_dir(self, name: str) -> Path:
        """The output directory of stage ``name``."""
        return Path(self.out) / (self.stages[name].out or name)
