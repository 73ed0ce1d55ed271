"""``python -m pipeline run``: every stage of a pipeline in order, on Ray, tracked in MLflow.

A pipeline (``conf/run.yaml`` + ``experiment=<name>``) is an ordered set of stages, each a stage command
with its overrides (:class:`~pipeline.orchestrate_config.StageSpec`). ``run``:

1. composes and validates every stage's config exactly as ``python -m pipeline <command> <overrides>``
   would, before any work (a bad key, type or value fails naming the stage and the key);
2. joins Ray (a local one by default, ``ray.address=auto`` for a cluster);
3. opens the MLflow parent run of this ``run`` (one experiment per pipeline);
4. runs each stage when the stages in its ``after`` are complete: ``pretrain``/``finetune`` from this
   driver through their launcher (Ray Train on the cluster), the other stages as Ray tasks (sharding fans
   out into one Ray task per shard), each in its own nested MLflow run that the stage logs into;
5. writes a completion record per stage, ``summary.json``, and prints the summary table.

Each stage reads only files of earlier stages. A completion record ``<out>/<stage>/COMPLETED.json`` holds
the sha256 of the stage's resolved config (without ``tracking``) and the output ids of the stages it
read; a later ``run`` skips the stage when both match, so finished stages are skipped, a failed stage
(which leaves no record) reruns alone, and a stage reruns with everything downstream of it when its
config changes.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from pipeline.checkpoint import atomic_write_bytes
from pipeline.config import (
    COMMANDS,
    CONF_DIR,
    ConfigError,
    compose,
    flatten,
    hydra_value,
    shell_word,
    to_yaml,
    validate,
)
from pipeline.data.coco_source import resolve_sources
from pipeline.data.config import ShardStageConfig
from pipeline.data.manifest import is_remote
from pipeline.data.shard import superseded_split
from pipeline.orchestrate_config import PATH_ENV, RunConfig, StageSpec
from pipeline.stage_task import run_stage
from pipeline.tracking import NullTracker, Tracker, create_run, end_run, finite, git_commit, ui_command

RECORD = "COMPLETED.json"
STARTED = "STARTED.json"
"""What a started stage runs with (config hash, inputs): only an interrupted run of the same is resumed."""
RECORD_FORMAT = "dino-pipeline/stage-record-v1"
SUMMARY = "summary.json"
DRIVER_COMMANDS = ("pretrain", "finetune")
"""Stages run from the driver: their launcher places the work (Ray Train workers on the cluster)."""
EVAL_MODES = (("plain", "AP w/o TTA"), ("tta_one_to_one", "AP with TTA"))
TRAIN_KEY_METRICS = ("train/loss", "plain/AP", "plain/AP50")
"""What the summary keeps of a training stage's final metrics (last loss, its periodic evaluation)."""


class PipelineError(RuntimeError):
    """A pipeline that cannot run as configured (the message names the stage and what to do)."""


@dataclass
class Stage:
    """One stage of this run: its spec, validated config and state."""

    name: str
    spec: StageSpec
    overrides: list[str]
    """The full override list the stage's config was composed from (its command line)."""
    config: Any
    """The validated stage config object."""
    record_path: Path
    config_sha256: str
    status: str = "pending"
    """pending -> running -> complete | skipped | failed | blocked; ``disabled``; ``not selected``."""
    wall_s: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    output_id: str = ""
    """Identity of the outputs this stage left (from its record); part of its dependants' keys."""
    mlflow_run_id: str = ""

    @property
    def command(self) -> str:
        """The stage command."""
        return self.spec.command

    @property
    def out(self) -> Path:
        """The stage's output directory (``out`` of its config)."""
        return Path(self.config.out)

    def command_line(self) -> str:
        """The command that runs this stage alone (as recorded)."""
        return " ".join(["python -m pipeline", self.command, *(shell_word(o) for o in self.overrides)])


# ----------------------------------------------------------------------------------------------- planning


def override_key(override: str) -> str:
    """The key an override sets (``+a.b=1`` -> ``a.b``; ``~a`` -> ``a``)."""
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(*lists: list[str]) -> list[str]:
    """Concatenate override lists; a later override of the same key replaces the earlier one in place."""
    merged: dict[str, str] = {}
    for overrides in lists:
        for override in overrides:
            merged[override_key(override)] = override
    return list(merged.values())


def _has_group_default(command: str, group: str) -> bool:
    text = (CONF_DIR / f"{COMMANDS[command].config_name}.yaml").read_text()
    return re.search(rf"^\s*-\s*(optional\s+)?(override\s+)?/?{group}\s*:", text, re.MULTILINE) is not None


def _has_field(command: str, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(COMMANDS[command].schema_class()))


def stage_overrides(cfg: RunConfig, name: str, root: Path) -> list[str]:
    """The overrides a stage's config is composed from: its experiment, its overrides and extras, then
    the directory and tracking target that ``run`` assigns."""
    spec = cfg.stages[name]
    first = []
    if spec.experiment:
        prefix = "" if _has_group_default(spec.command, "experiment") else "+"
        first.append(f"{prefix}experiment={spec.experiment}")
    assigned = [f"out={hydra_value(str(root / (spec.out or name)))}"]
    if _has_field(spec.command, "tracking"):
        if cfg.tracking.enabled:
            assigned += [
                f"tracking.kind={cfg.tracking.kind}",
                f"tracking.uri={hydra_value(cfg.tracking.resolved_uri(root))}",
                f"tracking.experiment={cfg.tracking.experiment}",
            ]
        else:
            assigned.append("tracking.kind=none")
    given = [_quote_out(o, str(cfg.out)) for o in [*spec.overrides, *spec.extra]]
    return merge_overrides(first, given, assigned)


def _quote_out(override: str, out: str) -> str:
    """``override`` with its value quoted for Hydra when the value is the run's ``out`` or a path under it
    (an experiment's ``${out}/...``) and ``out`` has characters Hydra reads as syntax (a space and a
    parenthesis, a comma, a quote)."""
    key, sep, value = override.partition("=")
    under_out = value.startswith(out) and value[len(out) : len(out) + 1] in ("", "/")
    if not sep or not under_out or hydra_value(f"{out}/") == f"{out}/":
        return override
    return f"{key}={hydra_value(value)}"


def config_sha256(config: Any) -> str:
    """sha256 of a stage's resolved config without its ``tracking`` section (which names this run's
    MLflow runs and so changes every time)."""
    flat = {k: v for k, v in flatten(config).items() if not k.startswith("tracking.")}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


def plan(cfg: RunConfig) -> list[Stage]:
    """Compose and validate every enabled stage's config (no work is done).

    Raises:
        PipelineError: listing every stage whose config does not compose or validate, with the reason.
    """
    root = Path(cfg.out).resolve()
    stages, problems = [], []
    for name, spec in cfg.stages.items():
        if spec.command not in COMMANDS or spec.command == "run":
            problems.append(
                f"stages.{name}.command: unknown stage command {spec.command!r}; "
                f"commands: {', '.join(c for c in COMMANDS if c != 'run')}"
            )
            continue
        overrides = stage_overrides(cfg, name, root)
        try:
            config = validate(compose(spec.command, overrides))
        except ConfigError as error:
            problems.append(f"stage {name} (python -m pipeline {spec.command} ...): {error}")
            continue
        except Exception as error:  # Hydra's composition errors (unknown key or group option)
            problems.append(f"stage {name} (python -m pipeline {spec.command} ...): {_first_line(error)}")
            continue
        stage = Stage(name, spec, overrides, config, root / name / RECORD, config_sha256(config))
        if not spec.enabled:
            stage.status = "disabled"
        elif cfg.only and name not in cfg.only:
            stage.status = "not selected"
        stages.append(stage)
    if problems:
        raise PipelineError("invalid pipeline configuration:\n  " + "\n  ".join(problems))
    return stages


def external_inputs(stage: Stage) -> list[tuple[str, Path, str]]:
    """The local files and folders a stage reads that it does not get from another stage: ``(config key,
    path, "file" | "folder" | "path")`` (dataset roots and annotation files, backbone weights, manifests,
    checkpoints and ``init`` given as paths). Computed from the config alone: nothing is read."""
    config, found = stage.config, []
    if stage.command == "shard":
        data = config.dataset
        for source in resolve_sources(data):
            found.append(
                (
                    "dataset.annotations" if data.annotations is not None else "dataset.root",
                    source.annotations,
                    "file",
                )
            )
            found.append(
                ("dataset.images" if data.images is not None else "dataset.root", source.image_root, "folder")
            )
    elif stage.command in DRIVER_COMMANDS:
        if config.train.backbone_weights is not None:
            found.append(("train.backbone_weights", Path(config.train.backbone_weights), "file"))
        if config.init is not None:
            found.append(("init", Path(config.init), "folder"))
        for key in ("data", "val_data"):
            if getattr(config, key):
                found.append((key, Path(str(getattr(config, key))), "path"))
        for i, source in enumerate(config.data_sources):
            found.append((f"data_sources[{i}].manifest", Path(source.manifest), "path"))
    elif stage.command == "eval":
        found += [("checkpoint", Path(config.checkpoint), "path"), ("data", Path(str(config.data)), "path")]
    return [(key, path, kind) for key, path, kind in found if not is_remote(str(path))]


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_inputs(cfg: RunConfig, stages: list[Stage]) -> None:
    """Fail naming every local input of the stages to run that is missing (:func:`external_inputs`), before
    any work: a mistyped dataset root or weight file would otherwise surface after hours of earlier stages.
    Paths under the pipeline's ``out`` are left alone: earlier stages write them. Existence checks only.

    Raises:
        PipelineError: one line per missing path: the stage, the key, the path and what to set.
    """
    root = Path(cfg.out).resolve()
    paths = {name: getattr(cfg.paths, name) for name in PATH_ENV if getattr(cfg.paths, name)}
    problems = []
    for stage in stages:
        if stage.status != "pending":
            continue
        record = read_record(stage.record_path)
        if stage.name not in cfg.force and record and record.get("config_sha256") == stage.config_sha256:
            continue  # complete for this config: skipped (an input stage that reruns makes it check its own)
        for key, path, kind in external_inputs(stage):
            resolved = path.resolve()
            if _within(resolved, root):
                continue
            exists = {"file": resolved.is_file, "folder": resolved.is_dir, "path": resolved.exists}[kind]()
            if exists:
                continue
            via = next((n for n, v in paths.items() if _within(path, Path(v))), None)
            if via is not None:
                fix = f"set paths.{via} (or {PATH_ENV[via][0]}) to {PATH_ENV[via][1]}"
            else:
                fix = (
                    f"fix {key} in the stage's overrides, or pass 'stages.{stage.name}.extra=[\"{key}=...\"]'"
                )
            what = {"file": "no such file", "folder": "no such folder", "path": "not found"}[kind]
            problems.append(f"stage {stage.name}: {key}: {path}: {what}; {fix}")
    if problems:
        raise PipelineError("missing inputs (nothing was run):\n  " + "\n  ".join(problems))


def _say(message: str) -> None:
    """A progress line of the orchestrator (timestamped: stages run for minutes to days)."""
    print(f"[run {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


# ------------------------------------------------------------------------------------- completion records


def read_record(path: Path) -> dict[str, Any] | None:
    """A stage's completion record, or None when there is none (or it is unreadable: then it reruns)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def _upstream(stage: Stage, by_name: dict[str, Stage]) -> dict[str, str]:
    return {dep: by_name[dep].output_id for dep in stage.spec.after if dep in by_name}


def _matching_record(stage: Stage, by_name: dict[str, Stage]) -> dict[str, Any] | None:
    record = read_record(stage.record_path)
    if record is None or record.get("config_sha256") != stage.config_sha256:
        return None
    if record.get("upstream") != _upstream(stage, by_name):
        return None
    return record


def _write_record(stage: Stage, by_name: dict[str, Stage], started: float) -> None:
    stage.output_id = uuid.uuid4().hex
    record = {
        "format": RECORD_FORMAT,
        "stage": stage.name,
        "command": stage.command,
        "command_line": stage.command_line(),
        "config_sha256": stage.config_sha256,
        "upstream": _upstream(stage, by_name),
        "output_id": stage.output_id,
        "out": str(stage.out),
        "started": _iso(started),
        "finished": _iso(time.time()),
        "wall_s": round(stage.wall_s, 2),
        "metrics": stage.metrics,
        "mlflow_run_id": stage.mlflow_run_id,
        "git_commit": git_commit(),
    }
    atomic_write_bytes(stage.record_path, (json.dumps(record, indent=1, default=str) + "\n").encode())


def _set_aside_superseded(stage: Stage, upstream: dict[str, str]) -> None:
    """Rename the output of an earlier run of ``stage`` that this run does not continue to
    ``<stage>.replaced-<time>``: a complete run (this one has another config or inputs, or is forced) or an
    interrupted run of another config or inputs. Its checkpoints would otherwise be resumed from, or
    refused as another model's; nothing is deleted. An interrupted run of this very config and inputs is
    kept, to resume from.

    Only a stage that owns its directory (``out`` not shared with other stages) is moved.
    """
    if stage.spec.out or stage.out.resolve() != stage.record_path.parent.resolve() or not stage.out.exists():
        return
    if not _continues_earlier_run(stage, upstream):
        _move_aside(stage.out, stage.name)


def _continues_earlier_run(stage: Stage, upstream: dict[str, str]) -> bool:
    """Whether this run of ``stage`` may keep what an earlier run wrote: none finished, and the one that
    was interrupted (if any) had this config and these inputs."""
    if read_record(stage.record_path) is not None:
        return False
    try:
        started = json.loads((stage.record_path.parent / STARTED).read_text())
    except (OSError, json.JSONDecodeError):
        return True
    return started == {"config_sha256": stage.config_sha256, "upstream": upstream}


def _set_aside_superseded_split(stage: Stage, upstream: dict[str, str]) -> None:
    """Rename a shard stage's split to ``<split>.replaced-<time>`` when this run does not continue the
    earlier one (its input stage reran, e.g. new image bytes under the same annotations, or it is forced),
    or when it is a finished split of other input or settings (which the stage refuses to write over). An
    interrupted split of this config and inputs is kept: the stage resumes it."""
    if not isinstance(stage.config, ShardStageConfig) or not stage.config.split_dir.exists():
        return
    if not _continues_earlier_run(stage, upstream) or superseded_split(stage.config):
        _move_aside(stage.config.split_dir, stage.name)


def _move_aside(path: Path, stage_name: str) -> None:
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
    target = path.with_name(f"{path.name}.replaced-{stamp:%Y%m%dT%H%M%S}")
    while target.exists():
        target = target.with_name(f"{target.name}-{uuid.uuid4().hex[:4]}")
    path.rename(target)
    _say(f"{stage_name}: the output of an earlier run (other config or inputs) moved to {target}")


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------ stage results


def _manifest_inputs(config: Any) -> dict[str, str]:
    """sha256 of every dataset manifest the stage's config points at (by config key)."""
    hashes = {}
    for key, value in flatten(config).items():
        if not isinstance(value, str) or not value or key.startswith("tracking."):
            continue
        path = Path(value)
        manifest = path / "manifest.json" if path.is_dir() else path
        if manifest.name == "manifest.json" and manifest.is_file():
            hashes[key] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    return hashes


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def stage_outputs(stage: Stage) -> tuple[dict[str, Any], list[Path], dict[str, str]]:
    """Key metrics, files to log (those the stage does not log itself) and tags of a finished stage, read
    from the files it wrote."""
    out, config = stage.out, stage.config
    if stage.command == "make-demo-data":
        demo = _read_json(out / "demo.json").get("splits", {})
        metrics = {
            f"{split}/images": int(v["num_images"]) for split, v in demo.items() if "num_images" in v
        } | {
            f"{split}/boxes": int(v["num_annotations"]) for split, v in demo.items() if "num_annotations" in v
        }
        return metrics, [out / "demo.json"], {}
    if stage.command == "shard":
        manifest_path = Path(config.split_dir) / "manifest.json"
        manifest = _read_json(manifest_path)
        metrics = {
            "samples": manifest.get("num_samples"),
            "annotations": manifest.get("num_annotations"),
            "shards": len(manifest.get("shards", [])),
            "rejects": len(manifest.get("rejects", [])),
        }
        sha = hashlib.sha256(manifest_path.read_bytes()).hexdigest() if manifest_path.is_file() else ""
        return metrics, [manifest_path], {"dataset.manifest_sha256": sha}
    if stage.command == "eval":
        data = _read_json(out / "metrics.json")
        results = data.get("results", {})
        metrics = {
            f"{mode}/{stat}": results[mode].get(stat)
            for mode, _ in EVAL_MODES
            if mode in results
            for stat in ("AP", "AP50", "AP75")
        }
        return metrics, [], {}
    if stage.command in DRIVER_COMMANDS:
        return _train_outputs(out)
    return {}, [], {}


def _train_outputs(out: Path) -> tuple[dict[str, Any], list[Path], dict[str, str]]:
    result = _read_json(out / "train_result.json")
    final = result.get("metrics", {})
    metrics = {"steps": result.get("steps")} | {k: final.get(k) for k in TRAIN_KEY_METRICS if k in final}
    return metrics, [out / "train_result.json", out / "metrics.jsonl"], {}


# -------------------------------------------------------------------------------------------- execution


_stage_task = ray.remote(max_retries=0)(run_stage)


def _ray_env() -> dict[str, str]:
    env = {
        "RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0"),
        "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"),
        "DINO_GIT_COMMIT": git_commit(),
        "PYTHONUNBUFFERED": "1",
    }
    return env


def connect_ray(cfg: RunConfig) -> tuple[bool, str]:
    """Join the configured Ray (or start a local one); (whether this call started it, dashboard URL)."""
    if ray.is_initialized():
        return False, ""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = _ray_env()
    if cfg.ray.address:
        context = ray.init(address=cfg.ray.address, log_to_driver=True)
    else:
        # Local workers import this package from the driver's import path (a cluster has it installed or
        # gets it as the job's working directory).
        env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
        context = ray.init(
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=cfg.ray.dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=cfg.ray.dashboard_port,
            runtime_env={"env_vars": env},
            log_to_driver=True,
        )
    url = getattr(context, "dashboard_url", "") or ""
    return True, (f"http://{url}" if url and not url.startswith("http") else url)


class Runner:
    """Runs the planned stages in order; see the module docstring."""

    def __init__(self, cfg: RunConfig, stages: list[Stage], parent: Tracker) -> None:
        self.cfg, self.stages, self.parent = cfg, stages, parent
        self.by_name = {s.name: s for s in stages}
        self.root = Path(cfg.out).resolve()
        self.on_change: Callable[[], None] = lambda: None
        self.started_ray = False
        self.dashboard = ""
        self.running: dict[str, Tracker] = {}
        """The MLflow runs of the stages started and not finished (ended as KILLED on an interrupt)."""

    def interrupted(self) -> None:
        """Mark the running stages interrupted and end their MLflow runs (Ctrl-C, a killed driver)."""
        for name, tracker in self.running.items():
            self.by_name[name].status, self.by_name[name].error = "failed", "interrupted"
            end_run(tracker, "KILLED")
        self.running.clear()

    def _ray(self) -> None:
        """Join Ray before the first stage that runs (a rerun that skips everything needs none)."""
        if ray.is_initialized():
            return
        self.started_ray, self.dashboard = connect_ray(self.cfg)
        if self.dashboard:
            _say(f"Ray dashboard (stages as tasks, the training runs): {self.dashboard}")
        self.on_change()

    def _deps_state(self, stage: Stage) -> str:
        """``ready``, ``wait`` or ``blocked`` (a stage it reads failed or is not complete)."""
        for dep in stage.spec.after:
            upstream = self.by_name[dep]
            if upstream.status in ("complete", "skipped"):
                continue
            if upstream.status in ("failed", "blocked"):
                return "blocked"
            if upstream.status in ("disabled", "not selected"):
                if read_record(upstream.record_path) is None:
                    return "blocked"
                continue
            return "wait"
        return "ready"

    def _adopt_inactive(self) -> None:
        # Disabled or unselected stages count with the outputs of their last complete run.
        for stage in self.stages:
            if stage.status in ("disabled", "not selected"):
                record = read_record(stage.record_path)
                stage.output_id = record.get("output_id", "") if record else ""

    def run(self) -> bool:
        """Run every stage; True when all selected stages are complete or skipped."""
        self._adopt_inactive()
        in_flight: dict[Any, tuple[Stage, float, Tracker]] = {}
        while True:
            progressed = False
            for stage in self.stages:
                if stage.status != "pending":
                    continue
                state = self._deps_state(stage)
                if state == "blocked":
                    failed = [
                        d for d in stage.spec.after if self.by_name[d].status not in ("complete", "skipped")
                    ]
                    stage.status, stage.error = "blocked", f"needs {', '.join(failed)}"
                    _say(f"{stage.name}: not run: {stage.error}")
                    progressed = True
                    continue
                if state == "wait":
                    continue
                record = None if stage.name in self.cfg.force else _matching_record(stage, self.by_name)
                if record is not None:
                    self._skip(stage, record)
                    progressed = True
                    continue
                if stage.command in DRIVER_COMMANDS:
                    if in_flight:
                        continue  # training runs alone: wait for the running tasks first
                    self._run_in_driver(stage)
                else:
                    ref, started, tracker = self._submit(stage)
                    in_flight[ref] = (stage, started, tracker)
                progressed = True
            if in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    stage, started, tracker = in_flight.pop(ref)
                    try:
                        code, error = ray.get(ref)
                    except ray.exceptions.RayError as failure:
                        code, error = 1, _first_line(failure)
                    self._finish(stage, started, tracker, code, error)
                continue
            if not progressed:
                break
        return all(s.status in ("complete", "skipped", "disabled", "not selected") for s in self.stages)

    def _skip(self, stage: Stage, record: dict[str, Any]) -> None:
        stage.status = "skipped"
        stage.output_id = record.get("output_id", "")
        stage.metrics = record.get("metrics", {})
        stage.wall_s = float(record.get("wall_s", 0.0))
        stage.mlflow_run_id = record.get("mlflow_run_id", "")
        _say(f"{stage.name}: complete since {record.get('finished')} for this config: skipped")
        self.parent.set_tags({f"skipped.{stage.name}.mlflow_run_id": stage.mlflow_run_id or "-"})
        self.on_change()

    def _start(self, stage: Stage) -> tuple[float, Tracker]:
        self._ray()
        upstream = _upstream(stage, self.by_name)
        _set_aside_superseded(stage, upstream)
        _set_aside_superseded_split(stage, upstream)
        stage.record_path.unlink(missing_ok=True)  # a failure must leave no record
        stage.record_path.parent.mkdir(parents=True, exist_ok=True)
        started = {"config_sha256": stage.config_sha256, "upstream": upstream}
        atomic_write_bytes(stage.record_path.parent / STARTED, json.dumps(started).encode())
        (stage.record_path.parent / "config.yaml").write_text(to_yaml(stage.config))
        tracking = dataclasses.replace(
            self.cfg.tracking, parent_run_id=self.parent.run_id, run_name=stage.name, run_id=""
        )
        tags = {"command": stage.command, "command_line": stage.command_line()[:5000]}
        manifests = _manifest_inputs(stage.config)
        if manifests:
            tags["dataset.manifest_sha256"] = ",".join(sorted(set(manifests.values())))
            tags |= {f"dataset.manifest_sha256.{k}": v for k, v in manifests.items()}
        logs_itself = _has_field(stage.command, "tracking")
        # A stage with a tracking section logs its own (final) config into the run made here; the others'
        # config is logged now.
        tracker = (
            create_run(tracking, self.root, stage.name, None if logs_itself else stage.config, tags, 1)
            if self.parent.active
            else NullTracker()
        )
        stage.mlflow_run_id = tracker.run_id
        self.running[stage.name] = tracker
        if tracker.run_id and logs_itself:
            stage.config = dataclasses.replace(
                stage.config, tracking=dataclasses.replace(stage.config.tracking, run_id=tracker.run_id)
            )
        stage.status = "running"
        _say(f"{stage.name}: starting: {stage.command_line()}")
        self.on_change()
        return time.time(), tracker

    def _submit(self, stage: Stage) -> tuple[Any, float, Tracker]:
        started, tracker = self._start(stage)
        ref = _stage_task.options(
            name=f"stage:{stage.name}",
            num_cpus=stage.spec.num_cpus,
            num_gpus=stage.spec.num_gpus,
            runtime_env={"env_vars": _ray_env()},
        ).remote(COMMANDS[stage.command].entry, stage.config)
        return ref, started, tracker

    def _run_in_driver(self, stage: Stage) -> None:
        started, tracker = self._start(stage)
        code, error = run_stage(COMMANDS[stage.command].entry, stage.config)
        self._finish(stage, started, tracker, code, error)

    def _finish(self, stage: Stage, started: float, tracker: Tracker, code: int, error: str) -> None:
        stage.wall_s = time.time() - started
        self.running.pop(stage.name, None)
        if code != 0:
            stage.status, stage.error = "failed", error or f"exit code {code}"
            _say(f"{stage.name}: FAILED after {stage.wall_s:.1f} s: {stage.error}")
            tracker.set_tags({"error": stage.error[:5000]})
            end_run(tracker, "FAILED")
            self.on_change()
            return
        metrics, files, tags = stage_outputs(stage)
        stage.metrics = {k: v for k, v in metrics.items() if v is not None}
        # A stage that logs itself has its metrics in its run at their own steps already: logging the
        # summary values again would add a point at step 0 to its curves.
        logs_itself = _has_field(stage.command, "tracking")
        tracker.log_metrics({"wall_s": stage.wall_s} | ({} if logs_itself else finite(stage.metrics)))
        tracker.set_tags(tags)
        for path in files:
            if path.is_file():
                tracker.log_artifact(path)
        end_run(tracker, "FINISHED")
        self.parent.log_metrics(
            {f"{stage.name}/wall_s": stage.wall_s}
            | {f"{stage.name}/{k}": v for k, v in finite(stage.metrics).items()}
        )
        _write_record(stage, self.by_name, started)
        stage.status = "complete"
        _say(f"{stage.name}: complete in {stage.wall_s:.1f} s {_metric_text(stage)}")
        self.on_change()


# ------------------------------------------------------------------------------------------------ summary


def _metric_text(stage: Stage) -> str:
    """The stage's key metrics in a few words for the summary table."""
    m = stage.metrics
    if stage.command == "eval":
        parts = []
        for mode, label in EVAL_MODES:
            if f"{mode}/AP" in m:
                parts.append(f"{label}: AP {_pct(m[f'{mode}/AP'])} AP50 {_pct(m.get(f'{mode}/AP50'))}")
        return "; ".join(parts)
    if stage.command == "shard":
        samples, boxes, shards = (m.get(k, "?") for k in ("samples", "annotations", "shards"))
        return f"{samples} images, {boxes} boxes in {shards} shards"
    if stage.command == "make-demo-data":
        images = sum(v for k, v in m.items() if k.endswith("/images"))
        boxes = sum(v for k, v in m.items() if k.endswith("/boxes"))
        return f"{images} images, {boxes} boxes"
    if stage.command in DRIVER_COMMANDS:
        text = f"{m.get('steps', '?')} steps, loss {_num(m.get('train/loss'))}"
        if "plain/AP" in m:
            text += f"; val AP {_pct(m['plain/AP'])} AP50 {_pct(m.get('plain/AP50'))}"
        return text
    return ", ".join(f"{k} {_num(v)}" for k, v in list(m.items())[:5])


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f}"


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _evaluation(stages: list[Stage]) -> dict[str, Any]:
    """AP and AP50 with and without TTA of the pipeline's last evaluation stage that has them."""
    for stage in reversed(stages):
        if stage.command == "eval" and stage.metrics:
            return {
                label: {"AP": stage.metrics.get(f"{mode}/AP"), "AP50": stage.metrics.get(f"{mode}/AP50")}
                for mode, label in (("plain", "without_tta"), ("tta_one_to_one", "with_tta"))
                if f"{mode}/AP" in stage.metrics
            } | {"stage": stage.name}
    return {}


def summary(cfg: RunConfig, stages: list[Stage], started: float, status: str, extra: dict[str, Any]) -> dict:
    """The content of ``summary.json``."""
    return {
        "pipeline": cfg.name,
        "status": status,
        "out": str(Path(cfg.out).resolve()),
        "started": _iso(started),
        "wall_s": round(time.time() - started, 2),
        "git_commit": git_commit(),
        "evaluation": _evaluation(stages),
        "stages": {
            s.name: {
                "status": s.status,
                "command": s.command,
                "wall_s": round(s.wall_s, 2),
                "out": str(s.out),
                "metrics": s.metrics,
                "command_line": s.command_line(),
                "mlflow_run_id": s.mlflow_run_id,
                **({"error": s.error} if s.error else {}),
            }
            for s in stages
        },
        **extra,
    }


def summary_table(data: dict[str, Any]) -> str:
    """The printed summary: a row per stage, the evaluation with and without TTA, how to look further."""
    rows = [("stage", "status", "time", "key metrics")]
    for name, stage in data["stages"].items():
        wall = f"{stage['wall_s']:.1f} s" if stage["status"] in ("complete", "failed", "skipped") else "-"
        text = stage.get("error") or _metric_text(_StageView(stage))
        rows.append((name, stage["status"], wall, text))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    lines.insert(1, "-" * (sum(widths) + 6 + max(len(r[3]) for r in rows)))
    evaluation = data.get("evaluation") or {}
    for label, text in (("without_tta", "without TTA"), ("with_tta", "with TTA   ")):
        if label in evaluation:
            values = evaluation[label]
            lines.append(f"AP {text}: AP {_pct(values['AP'])}  AP50 {_pct(values['AP50'])}")
    lines.append(
        f"pipeline {data['pipeline']}: {data['status']} in {data['wall_s']:.1f} s; {data['out']}/{SUMMARY}"
    )
    mlflow = data.get("mlflow") or {}
    if mlflow.get("ui"):
        lines.append(f"MLflow (experiment {mlflow['experiment']!r}): {mlflow['ui']}")
    return "\n".join(lines)


@dataclass
class _StageView:
    """A summary row as a Stage-like object for :func:`_metric_text`."""

    data: dict[str, Any]

    @property
    def command(self) -> str:
        return self.data["command"]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.data["metrics"]


# -------------------------------------------------------------------------------------------------- entry


def describe_plan(stages: list[Stage], force: Sequence[str] = ()) -> str:
    """What a run would do (``dry_run=true``): per stage run, skip or blocked, and its command line."""
    by_name = {s.name: s for s in stages}
    lines, reruns, blocked = [], set(), set()
    for stage in stages:
        missing = [
            d
            for d in stage.spec.after
            if d in blocked
            or (by_name[d].status in ("disabled", "not selected") and not by_name[d].output_id)
        ]
        if stage.status in ("disabled", "not selected"):
            record = read_record(stage.record_path)
            stage.output_id = record.get("output_id", "") if record else ""
            action = stage.status
        elif missing:
            action = f"blocked (needs {', '.join(missing)})"
            blocked.add(stage.name)
        elif stage.name in force:
            action = "run (forced)"
        elif set(stage.spec.after) & reruns:
            action = "run (an input stage runs)"
        elif _matching_record(stage, by_name) is not None:
            action = "skip (complete for this config)"
            stage.output_id = read_record(stage.record_path)["output_id"]
        else:
            action = "run"
        if action.startswith("run"):
            reruns.add(stage.name)
        lines.append(f"{stage.name}: {action}\n    {stage.command_line()}")
    return "\n".join(lines)


def run(cfg: RunConfig) -> int:
    """The ``run`` command; the exit code (0: every stage complete or skipped)."""
    started = time.time()
    root = Path(cfg.out).resolve()
    try:
        stages = plan(cfg)
        check_inputs(cfg, stages)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    if cfg.dry_run:
        print(describe_plan(stages, cfg.force), flush=True)
        return 0
    root.mkdir(parents=True, exist_ok=True)
    _say(f"pipeline {cfg.name}: {len(stages)} stages -> {root}")
    uri = cfg.tracking.resolved_uri(root)
    parent = create_run(
        dataclasses.replace(cfg.tracking, run_name=f"{cfg.name} {_iso(started)}"),
        root,
        "pipeline",
        cfg,
        {"pipeline": cfg.name, "ray.address": cfg.ray.address or "local"},
        world_size=1,
    )
    runner = Runner(cfg, stages, parent)
    extra = {
        "ray": {"address": cfg.ray.address or "local", "dashboard": ""},
        "mlflow": {
            "uri": uri if cfg.tracking.enabled else "",
            "experiment": cfg.tracking.experiment,
            "parent_run_id": parent.run_id,
            "ui": ui_command(uri) if parent.active else "",
        },
    }

    def write_summary(status: str = "running") -> dict[str, Any]:
        extra["ray"]["dashboard"] = runner.dashboard
        data = summary(cfg, stages, started, status, extra)
        atomic_write_bytes(root / SUMMARY, (json.dumps(data, indent=1, default=str) + "\n").encode())
        return data

    runner.on_change = write_summary
    status = "failed"
    try:
        status = "complete" if runner.run() else "failed"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        runner.interrupted()
        data = write_summary(status)
        parent.log_metrics(
            {
                f"eval/{label}/{k}": v
                for label, m in data["evaluation"].items()
                if isinstance(m, dict)
                for k, v in finite(m).items()
            }
            | {"wall_s": data["wall_s"]}
        )
        parent.log_artifact(root / SUMMARY)
        end_run(parent, {"complete": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))
        if runner.started_ray:
            ray.shutdown()
        print("\n" + summary_table(data), flush=True)
    return 0 if status == "complete" else 1
