"""Where a stage's weights start: ImageNet backbone weights (pretraining) or a pretraining run (fine-tuning).

Fine-tuning checks the ``init`` directory before anything else starts (:func:`check_init`: a model
directory of the same architecture, ``num_classes`` aside), then loads its weights with the class rows
remapped by category name (:mod:`dino_core.class_remap`) and reports what was loaded, remapped and
re-initialised. Only safetensors and weights-only files are read (``pipeline.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from dino_core.class_remap import RemapReport, remap_class_rows
from dino_core.config import DINOConfig, config_differences
from dino_core.detector import DINO
from pipeline.checkpoint import MODEL_FILE, ModelCard, load_card, read_weight_file

log = logging.getLogger(__name__)


class InitError(ValueError):
    """An ``init`` directory or weight file that cannot start this stage; says what to do."""


def load_backbone_weights(model: DINO, path: Path) -> str:
    """Load ImageNet weights into the backbone; returns a one-line report.

    Raises:
        InitError: unreadable file, or weights of another backbone (keys and shapes listed).
    """
    try:
        report = model.backbone.load_weights(read_weight_file(path))
    except ValueError as error:
        raise InitError(f"train.backbone_weights={path}: {error}") from None
    return (
        f"backbone weights {path} ({report.layout} layout): {report.loaded} tensors loaded, "
        f"{len(report.ignored)} ignored, {len(report.kept_initial)} kept at init"
    )


def check_init(init: Path, model: DINOConfig) -> ModelCard:
    """The card of a fine-tuning ``init`` directory, checked against the architecture ``model``.

    Raises:
        InitError: not a model directory (no/invalid model.json, no weights), or another architecture.
    """
    try:
        card = load_card(init)
    except ValueError as error:
        raise InitError(
            f"init={init} is not the output of a pretraining run ({error}); pass the pretrain stage's out "
            "directory"
        ) from None
    if not (Path(init) / MODEL_FILE).is_file():
        raise InitError(f"init={init} has model.json but no {MODEL_FILE}; the pretraining run did not finish")
    theirs = dataclasses.replace(card.config, num_classes=model.num_classes)
    if theirs != model:
        differing = config_differences(theirs, model, "init")
        raise InitError(
            f"init={init} holds another architecture than model= asks for ({'; '.join(differing[:5])}); "
            "fine-tune with the model= preset the pretraining used"
        )
    if not card.classes:
        raise InitError(f"init={init}: its model.json has no class table to remap the class heads by")
    return card


def load_pretrained(
    model: DINO, init: Path, card: ModelCard, classes: dict[int, str], aliases: list[str]
) -> RemapReport:
    """Load ``init``'s weights into ``model`` (the fine-tuning label space ``classes``), class rows by name.

    ``aliases``: ``"<target name>=<source name>"`` pairs (``train.class_aliases``).
    """
    pairs = dict(tuple(part.strip() for part in alias.split("=", 1)) for alias in aliases)
    try:
        state, report = remap_class_rows(
            read_weight_file(Path(init) / MODEL_FILE),
            model.state_dict(),
            card.class_names(),
            classes,
            pairs,
        )
    except ValueError as error:
        raise InitError(f"init={init}: {error}") from None
    model.load_state_dict(state, strict=True)
    return report
