"""The command line: ``python -m pipeline <command> [key=value ...] [--multirun]``.

The command picks a primary config (``conf/<command>.yaml``); everything after it is Hydra's (overrides,
``--multirun``, ``--cfg job``). The composed config is validated against the command's schema before the
stage function is called, so nothing runs on an invalid config. Before anything is written into the
command's ``out``, the CLI refuses an ``out`` that holds another command's output (:func:`out_refusal`);
Hydra's record of the command (``out/.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``) is written
only once the stage has accepted its inputs (:func:`pipeline.config.inputs_accepted`, or the stage ended
with exit code 0 or an exception), so a refused command leaves an existing ``out`` byte for byte as it was.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.config import (
    COMMANDS,
    CONF_DIR,
    Command,
    ConfigError,
    defer_until_accepted,
    drop_deferred,
    hydra_value,
    inputs_accepted,
    override_problem,
    register,
    validate,
)

RECORD_DIR = ".hydra"
"""Where the command's record goes in ``out`` (Hydra's own ``output_subdir`` is off: conf/stage_base.yaml)."""
TRAINING = ("pretrain", "finetune")
REFUSED = 2
"""The exit code of a command that refused its input before doing any work."""


def usage() -> str:
    """The list of commands, for ``--help`` and unknown commands."""
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: python -m pipeline <command> [key=value ...] [--multirun]", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items()]
    lines += ["", "Show a command's composed config: python -m pipeline <command> --cfg job"]
    return "\n".join(lines)


def out_owner(out: Path) -> tuple[str, str] | None:
    """Which command's output the folder ``out`` holds, from the files at its top (cheap: no big file is
    read): ``(command, evidence)``; None for a missing folder or one that no command's output is in."""
    if not out.is_dir():
        return None
    if (out / "summary.json").is_file():
        return "run", "summary.json: a pipeline's folder"
    try:
        recorded = json.loads((out / "COMPLETED.json").read_text())
        if isinstance(recorded, dict) and recorded.get("command") in COMMANDS:
            return str(recorded["command"]), "COMPLETED.json: a stage of a pipeline"
    except (OSError, ValueError):
        pass
    markers = [n for n in ("checkpoints", "model.json", "train_result.json") if (out / n).exists()]
    if markers:
        try:
            stage = json.loads((out / "model.json").read_text()).get("stage")
        except (OSError, ValueError, AttributeError):
            stage = None
        return (stage if stage in TRAINING else "pretrain/finetune"), f"{', '.join(markers)}: a training run"
    if (out / "manifest.json").is_file():
        return "shard", "manifest.json: a shard split"
    if (out / "metrics.json").is_file() and (out / "detections.json").is_file():
        return "eval", "metrics.json, detections.json: an evaluation"
    if (out / "demo.json").is_file():
        return "make-demo-data", "demo.json: the demo dataset"
    return None


def out_refusal(command: str, out: Path) -> str | None:
    """Why ``command`` may not write into ``out`` (it holds another command's output), or None.

    A training stage into a training run's folder is the training stage's own check (it compares the
    checkpoints' stage, model and class table); ``shard``'s ``out`` is the root its splits go under, so a
    split folder is refused for it too.
    """
    owner = out_owner(out)
    if owner is None:
        return None
    stage, evidence = owner
    if command in TRAINING and (stage in TRAINING or stage == "pretrain/finetune"):
        return None
    if command == "shard" and stage == "shard" and evidence.startswith("manifest.json"):
        return (
            f"out={out} is a shard split ({evidence}); shard's out= is the root the splits go under "
            f"(<out>/<dataset>/<split>/): out={out.parent.parent}"
        )
    if stage == command:
        return None
    suggestion = out.with_name(f"{out.name}_{command.replace('-', '_')}")
    return (
        f"out={out} holds the output of {stage} ({evidence}); {command} would write its files among "
        f"them: give {command} a folder of its own, e.g. out={suggestion}"
    )


def _write_record(task_cfg: DictConfig) -> None:
    """Hydra's record of the command (what its ``output_subdir`` would have held) into ``out/.hydra``."""
    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir) / RECORD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, node in (
        ("config.yaml", task_cfg),
        ("hydra.yaml", HydraConfig.instance().cfg),
        ("overrides.yaml", hydra_cfg.overrides.task),
    ):
        (folder / name).write_text(OmegaConf.to_yaml(node), encoding="utf-8")


def _run(command: Command, cfg: DictConfig) -> int | None:
    task_cfg = copy.deepcopy(cfg)  # as composed, before the changes below (what Hydra would record)
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
        return REFUSED
    if "out" in cfg:
        refusal = out_refusal(command.name, Path(str(cfg.out)))
        if refusal:
            print(f"error: {refusal}", file=sys.stderr)
            return REFUSED
        drop_deferred()
        defer_until_accepted(lambda: _write_record(task_cfg))
    try:
        code = command.entry_function()(config)
    except BaseException:
        inputs_accepted()  # a crash, not a refusal: record what ran
        raise
    if not code:
        inputs_accepted()
    drop_deferred()  # refused or failed before accepting its inputs: out keeps the record of its last run
    return code


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
            return REFUSED
        key, _, value = arg.partition("=")
        if key.rsplit(".", 1)[-1] == "shards" and "{" in value and not re.fullmatch(r"'.*'|\".*\"", value):
            # Hydra's override grammar reads {...} as a dict and fails with a parser message.
            print(
                f"error: {arg}: quote the template for Hydra, e.g. \"shards='{value}'\" in the shell",
                file=sys.stderr,
            )
            return REFUSED
        problem = override_problem(arg) if "=" in arg and not arg.startswith("-") else None
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return REFUSED
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
        sweep_dir = Path.cwd() / "multirun" / command.config_name / stamp
        rest = [*rest, f"hydra.sweep.dir={hydra_value(str(sweep_dir))}"]
    saved = sys.argv
    sys.argv = [f"{Path(saved[0]).name} {name}", *rest]
    try:
        task()
    finally:
        sys.argv = saved
    return max((code or 0 for code in status), default=0)
