"""Experiment tracking: every stage's parameters, metrics and files in MLflow (the only MLflow importer).

A stage opens its run with :func:`start_run` and logs through the :class:`Tracker` it gets::

    with start_run(cfg.tracking, cfg.out, "pretrain", config=cfg, tags={"dataset.manifest_sha256": h}) as t:
        t.log_metrics({"train/loss": 1.2}, step=100)
        t.log_artifact(out / "metrics.json")

Only rank 0 logs (``RANK`` from torchrun/Ray Train, or ``rank=``); the other ranks, ``tracking=none`` and
an unreachable server get a :class:`NullTracker` (the last with a warning), so tracking never stops a
training run. A run gets: params = the flattened resolved config; tags = git commit, stage, world size and
what the stage adds (the dataset manifest's sha256); artifacts = ``config.yaml`` plus what the stage logs.
Runs nest: ``tracking.parent_run_id`` creates the stage's run under a parent (``run`` makes one parent per
pipeline run), ``tracking.run_id`` logs into an existing run (the one ``run`` made for the stage).
"""

from __future__ import annotations

import fcntl
import functools
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.tracking_config import DEFAULT_DB, TrackingConfig, ui_command

__all__ = [
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "TrackingConfig",
    "create_run",
    "end_run",
    "git_commit",
    "start_run",
    "ui_command",
]

MAX_PARAM_LENGTH = 6000
"""MLflow's limit on a param value; longer values are cut (the whole config is in config.yaml)."""
BATCH = 100
"""MLflow's limit on params (and tags) per log_batch call."""
REPO_DIR = Path(__file__).resolve().parent.parent
REFUSED = ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS")
"""MLflow error codes of requests the store refused (the store itself works)."""


class Tracker:
    """The logging interface stages use; this base class logs nothing (``tracking=none``, ranks > 0).

    It also satisfies :class:`pipeline.evaluation.outputs.Tracker` (``log_metrics``, ``log_artifacts``).
    """

    run_id: str = ""
    """The MLflow run id; empty when nothing is logged."""

    @property
    def active(self) -> bool:
        """Whether calls reach a tracking store."""
        return False

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters (values are stringified; MLflow params cannot change once logged)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics at ``step`` (non-finite values are logged as they are)."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload one file."""

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        """Upload every file under ``directory``."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Upload ``text`` as the artifact ``artifact_file`` (e.g. ``config.yaml``)."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (stringified)."""


class NullTracker(Tracker):
    """A tracker that logs nothing."""


class MlflowTracker(Tracker):
    """Logs into one MLflow run through :class:`mlflow.MlflowClient` (no global active-run state, so
    several runs can be open in one process and a run can be continued from another process).

    A failing call warns. A store that cannot be reached (server gone, database locked) turns the tracker
    off for good: losing tracking must not lose a training run. A request the store refuses (a param
    logged again with another value) loses that call only.
    """

    def __init__(
        self, client: Any, run_id: str, log_files: bool = True, store: tuple[Path, ...] = ()
    ) -> None:
        self._client = client
        self.run_id = run_id
        self._log_files = log_files
        self._broken = False
        self._store = tuple(p.resolve() for p in store)
        """The local store's own files (SQLite database, artifact root), never uploaded into itself."""

    @property
    def active(self) -> bool:
        return not self._broken

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> None:
        if self._broken:
            return
        try:
            function(*args, **kwargs)
        except Exception as error:  # any tracking failure must leave the stage running
            refused = getattr(error, "error_code", "") in REFUSED
            self._broken = not refused
            warnings.warn(
                f"tracking: {what} failed for MLflow run {self.run_id} ({type(error).__name__}: "
                f"{str(error)[:500]}); "
                + ("this call is lost" if refused else "tracking is off for the rest of this stage"),
                RuntimeWarning,
                stacklevel=3,
            )

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), BATCH):
            self._call("log_params", self._client.log_batch, self.run_id, params=items[start : start + BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, step or 0) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):
            chunk = items[start : start + 1000]
            self._call("log_metrics", self._client.log_batch, self.run_id, metrics=chunk)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self._log_files:
            self._call("log_artifact", self._client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        if not self._log_files:
            return
        # File by file, leaving out a store that lives inside the directory (a stage's default SQLite
        # store is in its output directory: uploading it into itself would never end).
        directory = Path(directory).resolve()
        for path in sorted(directory.rglob("*")):
            if not path.is_file() or any(path == s or s in path.parents for s in self._store):
                continue
            if path.name.startswith(DEFAULT_DB):
                continue
            relative = path.parent.relative_to(directory).as_posix()
            target = "/".join(p for p in (artifact_path or "", "" if relative == "." else relative) if p)
            self._call("log_artifacts", self._client.log_artifact, self.run_id, str(path), target or None)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self._log_files:
            self._call("log_text", self._client.log_text, self.run_id, text, artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        for start in range(0, len(items), BATCH):
            self._call("set_tags", self._client.log_batch, self.run_id, tags=items[start : start + BATCH])


def _param_value(value: Any) -> str:
    text = str(value)
    if len(text) > MAX_PARAM_LENGTH:
        text = text[: MAX_PARAM_LENGTH - 20] + " ...(cut; see config.yaml)"
    return text


def rank_from_env() -> int:
    """This process's global rank: ``RANK`` (torchrun, Ray Train, Slurm wrappers) or 0."""
    return int(os.environ.get("RANK", "0"))


def world_size_from_env() -> int:
    """The number of training processes: ``WORLD_SIZE`` or 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@functools.cache
def git_commit() -> str:
    """The code's git commit (``+dirty`` when the checkout has uncommitted changes to tracked files).

    ``DINO_GIT_COMMIT`` wins (set it where the code is shipped without ``.git``, e.g. a Ray job's
    working directory); ``unknown`` outside a checkout.
    """
    if os.environ.get("DINO_GIT_COMMIT"):
        return os.environ["DINO_GIT_COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _server_reachable(uri: str, timeout_s: float) -> str | None:
    """None when the tracking server at ``uri`` answers ``/health``, else the reason it does not."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except (urllib.error.URLError, OSError, ValueError) as error:
        return str(getattr(error, "reason", error))


def _lock_file(database: Path) -> Path:
    """The file whose lock serialises the first use of SQLite store ``database``."""
    return database.parent / f".{database.name}.lock"


def _client(cfg: TrackingConfig, out: Path | str) -> tuple[Any, str] | str:
    """An MlflowClient and its URI, or the reason why tracking cannot start."""
    uri = cfg.resolved_uri(out)
    if uri.startswith(("http://", "https://")):
        reason = _server_reachable(uri, cfg.connect_timeout_s)
        if reason is not None:
            return f"the MLflow server {uri} is unreachable ({reason})"
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri), uri
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    # The first use of a SQLite store creates and migrates its tables; two processes doing it at once (the
    # jobs of a Ray-launched sweep) break the migration, so one at a time, under a file lock.
    with _lock_file(database).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    return client, uri


def _experiment_id(client: Any, uri: str, name: str) -> str:
    """The id of experiment ``name``, created on first use (SQLite: artifacts beside the database)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        # Another process (a parallel sweep job) created it between the lookup and the create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def create_run(
    cfg: TrackingConfig,
    out: Path | str,
    stage: str,
    config: Any = None,
    tags: Mapping[str, Any] | None = None,
    world_size: int | None = None,
) -> Tracker:
    """Create (or, with ``cfg.run_id``, reopen) the stage's run and log its config and tags.

    Use :func:`start_run` unless the run must outlive this call (``run`` keeps its parent run open across
    stages); end it with :func:`end_run`. Returns a :class:`NullTracker` for ``tracking=none`` and, with a
    warning, when the store cannot be reached.

    Args:
        cfg: the stage's ``tracking`` section.
        out: the stage's output directory (home of the default SQLite store).
        stage: the stage name (tag ``stage``; the run's name unless ``cfg.run_name``).
        config: the validated config object: logged as flattened params and ``config.yaml``.
        tags: extra tags, e.g. ``{"dataset.manifest_sha256": ...}``.
        world_size: tag ``world_size``; None: ``WORLD_SIZE`` or 1.
    """
    if not cfg.enabled:
        return NullTracker()
    try:
        made = _client(cfg, out)
        if isinstance(made, str):
            warnings.warn(f"tracking: {made}; continuing without tracking", RuntimeWarning, stacklevel=2)
            return NullTracker()
        client, uri = made
        from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

        all_tags = {
            "stage": stage,
            "git.commit": git_commit(),
            MLFLOW_GIT_COMMIT: git_commit(),
            "world_size": world_size if world_size is not None else world_size_from_env(),
            **(tags or {}),
        }
        if cfg.run_id:
            run_id = cfg.run_id
            client.get_run(run_id)  # fails now, naming the id, if it does not exist
        else:
            if cfg.parent_run_id:
                all_tags[MLFLOW_PARENT_RUN_ID] = cfg.parent_run_id
                experiment_id = client.get_run(cfg.parent_run_id).info.experiment_id
            else:
                experiment_id = _experiment_id(client, uri, cfg.experiment)
            run_id = client.create_run(experiment_id, run_name=cfg.run_name or stage).info.run_id
    except Exception as error:  # tracking trouble must not stop the stage
        warnings.warn(
            f"tracking: cannot start an MLflow run at {cfg.resolved_uri(out)} ({type(error).__name__}: "
            f"{error}); continuing without tracking",
            RuntimeWarning,
            stacklevel=2,
        )
        return NullTracker()
    store: tuple[Path, ...] = ()
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        store = (database, _lock_file(database), database.parent / "mlartifacts")
    tracker = MlflowTracker(client, run_id, cfg.log_artifacts, store)
    tracker.set_tags(all_tags)
    if config is not None:
        log_config(tracker, config)
    return tracker


def log_config(tracker: Tracker, config: Any) -> None:
    """Log a validated config object: flattened params and ``config.yaml`` (the resolved config)."""
    if not tracker.active:
        return
    from pipeline.config import flatten, to_yaml

    tracker.log_params(flatten(config))
    tracker.log_text(to_yaml(config), "config.yaml")


def end_run(tracker: Tracker, status: str = "FINISHED") -> None:
    """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED`` (nothing for a NullTracker)."""
    if isinstance(tracker, MlflowTracker):
        tracker._call("end_run", tracker._client.set_terminated, tracker.run_id, status)


@contextmanager
def start_run(
    cfg: TrackingConfig,
    out: Path | str,
    stage: str,
    config: Any = None,
    tags: Mapping[str, Any] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> Iterator[Tracker]:
    """The stage's run as a context manager: FINISHED on exit, FAILED on an exception (then re-raised).

    Ranks other than 0 (``rank``, or ``RANK``) get a :class:`NullTracker`. With ``cfg.run_id`` the run is
    someone else's (``run`` made it for this stage): it is logged into but not ended here.
    """
    if (rank if rank is not None else rank_from_env()) != 0:
        yield NullTracker()
        return
    tracker = create_run(cfg, out, stage, config, tags, world_size)
    owned = not cfg.run_id
    try:
        yield tracker
    except BaseException:
        if owned:
            end_run(tracker, "KILLED" if isinstance(sys.exc_info()[1], KeyboardInterrupt) else "FAILED")
        raise
    if owned:
        end_run(tracker, "FINISHED")


def finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric, finite entries of ``metrics`` (for summaries read back from JSON with nulls)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
