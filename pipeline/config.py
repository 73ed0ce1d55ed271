"""Hydra configuration of every command: typed stage schemas, model presets as config nodes, validation.

Each command (``python -m pipeline <command>``) has a primary config ``conf/<command>.yaml`` whose
defaults list starts with its schema node ``<command>_schema`` (the dataclass in :data:`COMMANDS`), so a
wrong key, type or value fails at composition or in the dataclasses' ``__post_init__`` checks before any
work starts. Model presets (``dino_core.presets``) are registered as the ``model`` group, so
``model=dino_swinl_4scale`` picks a preset and ``model.num_queries=300`` overrides a field of it.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dino_core.presets import PRESETS

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A composed configuration that does not validate; the message names the key and the problem."""


_deferred: list[Callable[[], None]] = []
"""What the CLI does only once the running command has accepted its inputs (see :func:`inputs_accepted`)."""


def defer_until_accepted(action: Callable[[], None]) -> None:
    """Run ``action`` when the running command calls :func:`inputs_accepted` (the CLI: Hydra's record)."""
    _deferred.append(action)


def drop_deferred() -> None:
    """Forget the deferred actions (the command was refused, or it ended)."""
    _deferred.clear()


def inputs_accepted() -> None:
    """Called by a stage once its inputs are checked, before it writes into its ``out``: runs what the CLI
    deferred until then (the record of the command in ``out/.hydra``), so that a refused command leaves
    ``out`` as it was. Idempotent; does nothing outside the CLI (tests, the stages of ``run``)."""
    while _deferred:
        _deferred.pop(0)()


@dataclass(frozen=True)
class Command:
    """One CLI command: its primary config, its schema and the function that runs it."""

    name: str
    schema: str
    """``module:Class`` of the root dataclass of the command's config."""
    entry: str
    """``module:function`` called with the validated config object; returns an exit code or None."""
    help: str

    @property
    def config_name(self) -> str:
        """The primary config file (``conf/<config_name>.yaml``) and the schema node's prefix."""
        return self.name.replace("-", "_")

    def schema_class(self) -> type:
        """The schema dataclass (imported lazily: command modules may pull heavy libraries)."""
        return _load(self.schema)

    def entry_function(self) -> Callable[[Any], int | None]:
        """The stage function."""
        return _load(self.entry)


COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        Command(
            "shard",
            "pipeline.data.config:ShardStageConfig",
            "pipeline.data.shard:run",
            "shard a COCO-format dataset into WebDataset tars (verify=true: re-read and check them)",
        ),
        Command(
            "make-demo-data",
            "pipeline.data.config:DemoDataConfig",
            "pipeline.data.demo_dataset:run",
            "write the embedded coloured-shapes dataset (COCO format, two label spaces)",
        ),
        Command(
            "model-info",
            "pipeline.model_info:ModelInfoConfig",
            "pipeline.model_info:run",
            "print a model preset's parameter counts as one JSON object",
        ),
        Command(
            "predict",
            "pipeline.predict:PredictConfig",
            "pipeline.predict:run",
            "detect objects in a folder of images with an official or our own checkpoint",
        ),
        Command(
            "eval",
            "pipeline.evaluation.stage:EvalStageConfig",
            "pipeline.evaluation.stage:run",
            "score a checkpoint on an evaluation split (COCO AP, ATD, with and without TTA)",
        ),
        Command(
            "run",
            "pipeline.orchestrate_config:RunConfig",
            "pipeline.orchestrate:run",
            "run a whole pipeline on Ray (default: the embedded demo; experiment=<name> for a recipe)",
        ),
        Command(
            "pretrain",
            "pipeline.train.config:TrainStageConfig",
            "pipeline.train.stage:run",
            "pretrain the detector with DeepSpeed (resumes from out/checkpoints/latest by itself)",
        ),
        Command(
            "finetune",
            "pipeline.train.config:TrainStageConfig",
            "pipeline.train.stage:run",
            "fine-tune a pretraining run (init=DIR) on another label space, class heads remapped by name",
        ),
    )
}


def _load(path: str) -> Any:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _unlocked(node: DictConfig | ListConfig) -> DictConfig | ListConfig:
    # Frozen dataclasses become read-only config nodes, which Hydra could not override; the dataclasses
    # are re-frozen (and re-validated) by OmegaConf.to_object.
    OmegaConf.set_readonly(node, False)
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        child = node._get_node(key)
        if isinstance(child, DictConfig | ListConfig):
            _unlocked(child)
    return node


def structured(obj: Any) -> DictConfig:
    """A typed, overridable config node from a dataclass type or instance."""
    return _unlocked(OmegaConf.structured(obj))


def register(command: Command) -> None:
    """Register the model presets and ``command``'s schema in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    for name, model in PRESETS.items():
        store.store(group="model", name=name, node=structured(model))
    store.store(name=f"{command.config_name}_schema", node=structured(command.schema_class()))


def compose(command: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a command's config as the CLI would (for tests and orchestration), without running it."""
    register(COMMANDS[command])
    # Inside a running Hydra app (``run`` composing its stages) Hydra's global state is taken: set it aside.
    global_hydra = GlobalHydra.instance()
    outer = global_hydra.hydra if global_hydra.is_initialized() else None
    global_hydra.clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=COMMANDS[command].config_name, overrides=overrides or [])
    finally:
        if outer is not None:
            GlobalHydra.instance().initialize(outer)


def validate(cfg: DictConfig) -> Any:
    """Turn a composed config into its schema's dataclass object, running every ``__post_init__`` check.

    Raises:
        ConfigError: naming the offending key and the problem.
    """
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(f"invalid configuration: {error}") from None
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError(f"invalid configuration: {error}") from None


_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_/.:+@%-]+")
"""ASCII characters Hydra's override grammar reads as themselves in an unquoted value (not ``~``)."""


def hydra_value(text: str) -> str:
    """``text`` written as a Hydra override value that parses back to exactly the string ``text``.

    A path with spaces, parentheses, commas, quotes, ``~`` or non-ASCII letters is syntax (or an error)
    to Hydra's override grammar unquoted, and ``10`` or ``true`` would parse as a number or a bool: such
    text is single-quoted, with a quote, and the backslashes right before a quote or the closing one,
    escaped. A path or URL of plain characters (it holds a ``/``, so it is no number) stays as it is.
    ``${...}`` stays an interpolation, as everywhere in Hydra.
    """
    if "/" in text and _PLAIN_VALUE.fullmatch(text):
        return text
    body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    body = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body)
    return f"'{body}'"


def shell_word(text: str) -> str:
    """``text`` as one POSIX shell word: bare when safe, in double quotes when it holds Hydra's single
    quotes (``"out='/runs/a (copy)'"``) and nothing the shell expands there, else ``shlex.quote``'s form."""
    quoted = shlex.quote(text)
    if quoted != text and "'" in text and not any(c in text for c in '"$`\\!'):
        return f'"{text}"'
    return quoted


def override_problem(override: str) -> str | None:
    """Why Hydra's override grammar cannot read the command-line ``key=value`` override (``None`` when it
    can), and the quoted form to give when the value is meant as a string: a path with a space and a
    parenthesis, or a ``~``, fails in the parser with a message that names neither the override nor
    the fix."""
    try:
        OverridesParser.create().parse_override(override)
    except HydraException as error:
        key, _, value = override.partition("=")
        reason = str(error).splitlines()[0]
        return (
            f"{override}: Hydra cannot read this override ({reason}); if the value is a path or other "
            f"text, quote it for Hydra: {shell_word(f'{key}={hydra_value(value)}')}"
        )
    return None


def to_yaml(config: Any) -> str:
    """The resolved config of a validated config object as YAML (artifacts, completion records)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config), resolve=True)


def flatten(config: Any) -> dict[str, Any]:
    """A validated config object as ``{"a.b.c": value}`` (MLflow params, completion-record keys)."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for field in dataclasses.fields(value):
                visit(f"{prefix}{field.name}.", getattr(value, field.name))
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(f"{prefix}{key}.", item)
        else:
            flat[prefix[:-1]] = str(value) if isinstance(value, Path) else value

    visit("", config)
    return flat
