"""The COCO ground-truth dict of an evaluation set, built from the shards' per-image records.

Each shard sample's ``json`` (data contract 1) holds the image id, file name, width, height and the COCO
annotations (``bbox`` xywh px, ``category_id`` in the dataset's own id space, ``area``, ``iscrowd``).
Ranks collect the records of the images they evaluated; rank 0 builds one ground truth from all of them,
so the scored set is exactly the set of images inferred.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def image_record(sample_json: dict[str, Any]) -> dict[str, Any]:
    """The part of a shard sample's record that scoring needs: id, file name, size, annotations."""
    missing = [k for k in ("id", "width", "height") if k not in sample_json]
    if missing:
        raise ValueError(f"shard sample record lacks {missing}; was it written by the shard stage?")
    return {
        "id": int(sample_json["id"]),
        "file_name": str(sample_json.get("file_name", "")),
        "width": int(sample_json["width"]),
        "height": int(sample_json["height"]),
        "annotations": [
            {
                "category_id": int(a["category_id"]),
                "bbox": [float(v) for v in a["bbox"]],
                "area": float(a["area"]) if "area" in a else float(a["bbox"][2]) * float(a["bbox"][3]),
                "iscrowd": int(a.get("iscrowd", 0)),
            }
            for a in sample_json.get("annotations", [])
        ],
    }


def build_ground_truth(
    records: Iterable[dict[str, Any]], categories: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """A COCO dataset dict from :func:`image_record` outputs and the category table (``id``, ``name``).

    Images are sorted by id; annotation ids are renumbered 1..N in that order (COCO's scorers treat an
    annotation id 0 as "unmatched", and ids from different shards need not be unique).

    Raises:
        ValueError: a duplicate image id (an image evaluated twice), or an annotation whose category is
            not in the table.
    """
    by_id: dict[int, dict[str, Any]] = {}
    for record in records:
        if record["id"] in by_id:
            raise ValueError(
                f"image id {record['id']} appears twice in the evaluation set; each image must be "
                "evaluated exactly once (check the eval stream's split over ranks and workers)"
            )
        by_id[record["id"]] = record
    category_ids = {int(c["id"]) for c in categories}
    images, annotations = [], []
    for image_id in sorted(by_id):
        record = by_id[image_id]
        images.append({k: record[k] for k in ("id", "file_name", "width", "height")})
        for ann in record["annotations"]:
            if ann["category_id"] not in category_ids:
                raise ValueError(
                    f"image {image_id} has an annotation of category {ann['category_id']}, which is not "
                    "in the manifest's category table"
                )
            annotations.append({**ann, "id": len(annotations) + 1, "image_id": image_id})
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": int(c["id"]), "name": str(c["name"])} for c in categories],
    }
