"""The Objects365 layout and split recipe.

``root/zhiyuan_objv2_train.json`` and ``root/zhiyuan_objv2_val.json`` (365 categories, ids 1-365), with
``file_name`` values like ``images/v1/patch8/objects365_v1_00420917.jpg`` relative to ``root``. The
pretraining recipe's split: val is the first ``o365_val_holdout`` (5,000) val images, counted in
ascending image id so the choice does not depend on the JSON's order; train is the whole train file plus
the other val images. Known faults are repaired by :func:`pipeline.data.annotation_checks.check_annotations`
with ``repair=True``; images listed but absent become ``missing_image`` rejects.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.coco_source import SourceFile
from pipeline.data.config import DatasetConfig

TRAIN_JSON = "zhiyuan_objv2_train.json"
VAL_JSON = "zhiyuan_objv2_val.json"


def o365_sources(cfg: DatasetConfig) -> list[SourceFile]:
    """The annotation files and image ranks of an Objects365 split (see the module docstring)."""
    root = Path(cfg.root) if cfg.root is not None else Path(cfg.annotations).parent  # type: ignore[arg-type]
    images = Path(cfg.images) if cfg.images is not None else root
    holdout = cfg.o365_val_holdout
    if cfg.split == "val":
        return [SourceFile(root / VAL_JSON, images, keep_lowest=holdout)]
    return [SourceFile(root / TRAIN_JSON, images), SourceFile(root / VAL_JSON, images, skip_lowest=holdout)]
