"""Typed configuration of experiment tracking (the ``tracking`` config group: ``mlflow``, ``none``, ...).

Kept apart from :mod:`pipeline.tracking` so that every stage schema can hold a ``tracking`` section
without importing MLflow: importing this module costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TRACKING_KINDS = ("mlflow", "none")
DEFAULT_DB = "mlflow.db"
"""The SQLite store's file name inside a stage's (or a pipeline's) output directory."""


@dataclass(frozen=True)
class TrackingConfig:
    """Where and how a stage reports parameters, metrics and artifacts.

    A stage calls :func:`pipeline.tracking.start_run` with this section; only rank 0 logs.
    """

    kind: str = "mlflow"
    """``mlflow``, or ``none`` to turn tracking off (``tracking=none``)."""
    uri: str = ""
    """MLflow tracking URI: ``http://host:5000`` for a server, ``sqlite:////abs/mlflow.db``; empty: a
    SQLite store ``<out>/mlflow.db`` in the stage's output directory (the pipeline's for ``run``)."""
    experiment: str = "dino"
    """MLflow experiment name; one per pipeline (``run`` puts every stage's run in it)."""
    run_name: str = ""
    """Name of the run a stage creates; empty: the stage name."""
    parent_run_id: str = ""
    """Create the stage's run nested under this run (a sweep or pipeline parent)."""
    run_id: str = ""
    """Log into this existing run instead of creating one; its creator ends it (``run`` uses this to hand a
    stage the nested run it made for it, also across Ray workers)."""
    log_artifacts: bool = True
    """Upload files (resolved config, manifests, metrics.json, plots); false logs values only."""
    connect_timeout_s: float = 5.0
    """How long to wait for a tracking server to answer before tracking is turned off with a warning."""

    def __post_init__(self) -> None:
        if self.kind not in TRACKING_KINDS:
            raise ValueError(f"tracking.kind must be one of {TRACKING_KINDS}, got {self.kind!r}")
        if self.uri and "://" not in self.uri:
            raise ValueError(
                f"tracking.uri must be a URI such as http://host:5000 or sqlite:////abs/mlflow.db, got "
                f"{self.uri!r} (leave it empty for a SQLite store in the output directory)"
            )
        if self.kind == "mlflow" and not self.experiment:
            raise ValueError("tracking.experiment must name an MLflow experiment")
        if self.run_id and self.parent_run_id:
            raise ValueError("tracking.run_id and tracking.parent_run_id exclude each other; set one")
        if self.connect_timeout_s <= 0:
            raise ValueError(f"tracking.connect_timeout_s must be > 0, got {self.connect_timeout_s}")

    @property
    def enabled(self) -> bool:
        """Whether anything is logged."""
        return self.kind != "none"

    def resolved_uri(self, out: Path | str) -> str:
        """The tracking URI, with the empty default turned into ``sqlite:///<abs out>/mlflow.db``."""
        if self.uri:
            return self.uri
        return f"sqlite:///{(Path(out).resolve() / DEFAULT_DB).as_posix()}"


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on a tracking URI (printed by ``run``; a server has its own)."""
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {uri}"
