"""The command line: ``python -m pipeline <command> [key=value ...] [--multirun]``.

The command picks a primary config (``conf/<command>.yaml``); everything after it is Hydra's (overrides,
``--multirun``, ``--cfg job``). The composed config is validated against the command's schema before the
stage function is called, so nothing runs on an invalid config.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.config import COMMANDS, CONF_DIR, Command, ConfigError, register, validate


def usage() -> str:
    """The list of commands, for ``--help`` and unknown commands."""
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: python -m pipeline <command> [key=value ...] [--multirun]", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items()]
    lines += ["", "Show a command's composed config: python -m pipeline <command> --cfg job"]
    return "\n".join(lines)


def _run(command: Command, cfg: DictConfig) -> int | None:
    sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if "out" in cfg and sweep:
        # Each job of a sweep writes to its own directory (<sweep dir>/<job number>).
        cfg.out = HydraConfig.get().runtime.output_dir
    if "tracking" in cfg and sweep and cfg.tracking.kind != "none" and not cfg.tracking.uri:
        # The jobs of a sweep share one store (<sweep dir>/mlflow.db), so their runs sit side by side.
        store = Path(HydraConfig.get().sweep.dir).resolve() / "mlflow.db"
        cfg.tracking.uri = f"sqlite:///{store.as_posix()}"
    if "out" in cfg and cfg.out is not None:
        # Absolute before the config resolves: ${out} interpolations then name the same directory in every
        # process (Ray workers, torchrun ranks), whatever their working directory.
        cfg.out = str(Path(str(cfg.out)).resolve())
    try:
        config = validate(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return command.entry_function()(config)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if not (CONF_DIR / f"{command.config_name}.yaml").is_file():
        print(
            f"error: {CONF_DIR / command.config_name}.yaml is missing; run from a checkout of the project",
            file=sys.stderr,
        )
        return 2
    for arg in rest:
        if arg.startswith("out=") and Path(arg[4:]).is_file():  # Hydra would fail creating it, in a traceback
            print(f"error: {arg} is a file; out= takes a directory", file=sys.stderr)
            return 2
    register(command)
    status: list[int | None] = []

    @hydra.main(config_path=str(CONF_DIR), config_name=command.config_name, version_base="1.3")
    def task(cfg: DictConfig) -> None:
        code = _run(command, cfg)
        status.append(code)
        if code and HydraConfig.get().mode == RunMode.MULTIRUN:
            # A sweep job's exit code does not leave a Ray launcher's worker: fail the job, so Hydra reports
            # it and the sweep exits non-zero with any launcher.
            raise RuntimeError(f"{name} exited with code {code}")

    if any(a in ("-m", "--multirun") for a in rest) and not any(
        a.startswith("hydra.sweep.dir=") for a in rest
    ):
        # An absolute folder fixed here: every job and launcher (Ray workers included) then agrees on it.
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        rest = [*rest, f"hydra.sweep.dir={Path.cwd() / 'multirun' / command.config_name / stamp}"]
    saved = sys.argv
    sys.argv = [f"{Path(saved[0]).name} {name}", *rest]
    try:
        task()
    finally:
        sys.argv = saved
    return max((code or 0 for code in status), default=0)
