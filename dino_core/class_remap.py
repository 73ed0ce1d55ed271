"""Carry a detector's weights into another label space: class rows remapped by category name.

Fine-tuning starts from the pretraining weights, but the classification heads and the denoising label
embedding have one row per class index, and class index == the dataset's category id, which differs
between label spaces (Objects365 "Person" is 1, COCO "person" is 1 too, but "Sneakers" 2 vs "bicycle" 2).
Rows are therefore moved by name: a target class whose (normalised) name, or alias, exists in the source
table gets the source row; any other row keeps its fresh initialisation (the class heads' 1% prior bias,
the embedding's normal init). Every other weight must exist in the source with the same shape.

Pure tensor and dict code, no I/O: the caller reads the files and writes the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

CLASS_ROW_KEYS = (
    "class_head.weight",
    "class_head.bias",
    "query_selection.enc_class_head.weight",
    "query_selection.enc_class_head.bias",
    "label_enc.weight",
)
"""State keys with one row per class index (``label_enc.weight`` has one more: index K, never a label)."""


@dataclass
class RemapReport:
    """What :func:`remap_class_rows` did."""

    loaded: list[str] = field(default_factory=list)
    """State keys copied unchanged from the source."""
    class_keys: list[str] = field(default_factory=list)
    """State keys whose rows were remapped."""
    remapped: list[tuple[str, int, int]] = field(default_factory=list)
    """``(target name, source id, target id)`` of every class whose rows came from the source."""
    reinitialised: list[tuple[str, int]] = field(default_factory=list)
    """``(target name, target id)`` of the classes without a source match (fresh rows)."""

    def summary(self) -> str:
        """One line: counts and the re-initialised names."""
        names = ", ".join(name for name, _ in self.reinitialised[:20])
        more = "" if len(self.reinitialised) <= 20 else f", ... (+{len(self.reinitialised) - 20})"
        return (
            f"{len(self.loaded)} tensors loaded unchanged; class rows of {len(self.class_keys)} tensors "
            f"remapped by name: {len(self.remapped)} classes matched, {len(self.reinitialised)} "
            f"re-initialised [{names}{more}]"
        )

    def as_dict(self) -> dict:
        """JSON-able form."""
        return {
            "loaded": self.loaded,
            "class_keys": self.class_keys,
            "remapped": [{"name": n, "source_id": s, "target_id": t} for n, s, t in self.remapped],
            "reinitialised": [{"name": n, "target_id": t} for n, t in self.reinitialised],
        }


def normalise_name(name: str) -> str:
    """Case- and whitespace-insensitive form of a name (``"Dining  Table"`` -> ``"dining table"``)."""
    return " ".join(str(name).lower().split())


def match_classes(
    source: Mapping[int, str], target: Mapping[int, str], aliases: Mapping[str, str] | None = None
) -> dict[int, int]:
    """Target class id -> source class id, for target classes whose name (or alias) the source has.

    ``aliases``: target name -> source name, for names that differ between the tables.

    Raises:
        ValueError: two source classes share a normalised name (the match would be ambiguous), or an
            alias names a target class the target table lacks or a source class the source table lacks.
    """
    by_name: dict[str, int] = {}
    for class_id, name in sorted(source.items()):
        key = normalise_name(name)
        if key in by_name:
            raise ValueError(
                f"the source class table names two classes {name!r} (ids {by_name[key]} and {class_id}); "
                "names must be unique to remap by name"
            )
        by_name[key] = class_id
    alias = {normalise_name(k): normalise_name(v) for k, v in (aliases or {}).items()}
    unknown = sorted(v for v in alias.values() if v not in by_name)
    if unknown:
        raise ValueError(f"class aliases name source classes that do not exist: {unknown[:10]}")
    targets = {normalise_name(name) for name in target.values()}
    unknown = sorted(k for k in alias if k not in targets)
    if unknown:
        raise ValueError(f"class aliases name target classes that do not exist: {unknown[:10]}")
    matches = {}
    for class_id, name in sorted(target.items()):
        key = normalise_name(name)
        key = alias.get(key, key)
        if key in by_name:
            matches[class_id] = by_name[key]
    return matches


def remap_class_rows(
    source_state: Mapping[str, torch.Tensor],
    init_state: Mapping[str, torch.Tensor],
    source_classes: Mapping[int, str],
    target_classes: Mapping[int, str],
    aliases: Mapping[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], RemapReport]:
    """The target model's state: source weights, with class rows moved by name.

    Args:
        source_state: the trained model's state (source label space).
        init_state: the freshly initialised target model's state (target label space): defines the keys
            and shapes, and the rows of classes without a match.
        source_classes, target_classes: category id (= class index) -> name of each label space.
        aliases: target name -> source name for names that differ.

    Returns:
        The new state (new tensors; the inputs are not modified) and what happened.

    Raises:
        ValueError: a non-class key missing in the source, an unexpected source key, a shape that differs
            outside the class rows, or class ids outside the heads.
    """
    class_keys = [k for k in CLASS_ROW_KEYS if k in init_state]
    missing = sorted(k for k in init_state if k not in source_state)
    unexpected = sorted(k for k in source_state if k not in init_state)
    mismatched = sorted(
        f"{k}: source {tuple(source_state[k].shape)} vs target {tuple(init_state[k].shape)}"
        for k in init_state
        if k in source_state and k not in class_keys and source_state[k].shape != init_state[k].shape
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"the source weights are of another architecture: {len(missing)} missing {missing[:6]}, "
            f"{len(unexpected)} unexpected {unexpected[:6]}, {len(mismatched)} with another shape "
            f"{mismatched[:4]}"
        )
    num_target = int(init_state["class_head.bias"].shape[0])
    num_source = int(source_state["class_head.bias"].shape[0])
    for label, table, size in (
        ("target", target_classes, num_target),
        ("source", source_classes, num_source),
    ):
        outside = sorted(i for i in table if not 0 <= i < size)
        if outside:
            raise ValueError(f"{label} class ids {outside[:10]} are outside its heads' {size} rows")
    matches = match_classes(source_classes, target_classes, aliases)
    report = RemapReport(class_keys=class_keys)
    state: dict[str, torch.Tensor] = {}
    for key, init in init_state.items():
        if key not in class_keys:
            state[key] = source_state[key].detach().clone().to(init.dtype)
            report.loaded.append(key)
            continue
        rows = init.detach().clone()
        source = source_state[key].detach().to(rows.dtype)
        if matches:
            target_ids = torch.tensor(sorted(matches), dtype=torch.long)
            source_ids = torch.tensor([matches[t] for t in sorted(matches)], dtype=torch.long)
            rows[target_ids] = source[source_ids]
        if key == "label_enc.weight":
            # Row K (one past the last class) is never a label; the source row is kept.
            rows[num_target] = source[num_source]
        state[key] = rows
    report.remapped = [(target_classes[t], s, t) for t, s in sorted(matches.items())]
    report.reinitialised = [(name, i) for i, name in sorted(target_classes.items()) if i not in matches]
    return state, report
