"""The one-pass JSON section scanner against json.loads, at every chunk boundary."""

from __future__ import annotations

import io
import json

import pytest

from pipeline.data.json_sections import Elements, JSONStructureError, Piece, scan

DOCUMENT = {
    "info": {"description": 'brackets in strings: {[}] "quoted" \\ back\\\\slash \\"', "year": 2017},
    "images": [
        {"id": 1, "file_name": "a [1].jpg", "width": 4, "height": 3},
        {"id": 2, "file_name": 'b"{.jpg', "width": 5, "height": 6},
    ],
    "annotations": [
        {
            "id": 10,
            "image_id": 1,
            "bbox": [1.5, 2, 3, 4],
            "segmentation": [[1, 2, 3, 4, 5, 6]],
            "attributes": {"note": "}}]]"},
        },
        {"id": 11, "image_id": 2, "bbox": [0, 0, 1, 1], "segmentation": {"counts": "a\\\\", "size": [5, 6]}},
        {"id": 12, "image_id": 2, "bbox": [0, 0, 2, 2]},
    ],
    "licenses": [{"id": 1, "name": "x"}],
    "categories": [{"id": 1, "name": "thing [a]"}],
}


def _collect(text: str, chunk_size: int) -> tuple[dict[str, str], dict[str, list[bytes]], list[str]]:
    pieces: dict[str, str] = {}
    elements: dict[str, list[bytes]] = {}
    closed: list[str] = []
    for event in scan(
        io.BytesIO(text.encode()),
        frozenset({"images", "categories"}),
        frozenset({"annotations"}),
        chunk_size=chunk_size,
    ):
        if isinstance(event, Piece):
            pieces[event.key] = pieces.get(event.key, "") + event.data.decode()
        elif isinstance(event, Elements):
            assert len(event.items()) == event.count
            elements.setdefault(event.key, []).extend(event.items())
        elif event[0]:
            closed.append(event[0])
    return pieces, elements, closed


@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 64, 1 << 16])
def test_sections_and_elements_match_json_loads(indent: int | None, chunk_size: int) -> None:
    text = json.dumps(DOCUMENT, indent=indent)
    pieces, elements, closed = _collect(text, chunk_size)
    assert json.loads(pieces["images"]) == DOCUMENT["images"]
    assert json.loads(pieces["categories"]) == DOCUMENT["categories"]
    assert [json.loads(raw) for raw in elements["annotations"]] == DOCUMENT["annotations"]
    assert closed == ["images", "annotations", "categories"]


def test_empty_element_array() -> None:
    pieces, elements, _ = _collect('{"images": [], "annotations": [ ], "categories": []}', 5)
    assert pieces == {"images": "[]", "categories": "[]"} and elements == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"images": [1, 2', "ends inside an open object"),
        ('{"images": "abc', "ends inside a string"),
        ('{"images": []}}', "unbalanced closing bracket"),
        ("[1, 2]", "top level must be one object"),
        ('{"a": 1}, {"b": 2}', "top level must be one object"),
        ('{"annotations": [{"id": 1}, 2]}', "not objects"),
        ('{"annotations": [3]}', "not objects"),
        ('{"annotations": [[1]]}', "not an object"),
        ("", "no top-level object"),
    ],
)
def test_malformed_structure(text: str, message: str) -> None:
    with pytest.raises(JSONStructureError, match=message):
        for chunk_size in (3, 1 << 16):
            _collect(text, chunk_size)
