"""The one-pass JSON section scanner against json.loads, at every chunk boundary."""

from __future__ import annotations

import io
import json
import math
import random
import threading

import numpy as np
import pytest

from pipeline.data.json_sections import (
    Elements,
    JSONStructureError,
    Piece,
    _structural_positions,
    parse_values,
    scan,
)

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
        ('{"annotations": [1,2]}', "not objects"),
        ('{"annotations": [-1.5,-2e3]}', "not objects"),
        ('{"annotations": [{"id": 1},1,2]}', "not objects"),
        ('{"annotations": [1,2,{"id": 1}]}', "not objects"),
        ('{"annotations": [{"id": 1}, 1, 2, {"id": 2}]}', "not objects"),
        ('{"annotations": [{"id": 1},"a","b"]}', "not objects"),
        ('{"annotations": [{"id": 1} 2]}', "not objects"),
        ('{"annotations": [2 {"id": 1}]}', "not objects"),
        ('{"annotations": [{"id": 1}], "x": "\x1e"}', "control character"),
        ("", "no top-level object"),
    ],
)
def test_malformed_structure(text: str, message: str) -> None:
    for chunk_size in (3, 1 << 16):
        with pytest.raises(JSONStructureError, match=message):
            _collect(text, chunk_size)


class _ReaderRecordingFile(io.BytesIO):
    """A file that records which threads read it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.readers: set[int] = set()

    def read(self, size: int | None = -1) -> bytes:
        self.readers.add(threading.get_ident())
        return super().read(size)


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 9, 64])
@pytest.mark.parametrize(
    ("tail", "valid"), [(b"", True), (b"\n", True), (b" \r\n\t \n", True), (b"\n x", False), (b" {}", False)]
)
def test_what_follows_the_object_is_read_by_the_read_ahead_thread_alone(
    chunk_size: int, tail: bytes, valid: bool
) -> None:
    """Only whitespace may follow the object, wherever a chunk ends ('}' ends the first 8-byte one); one
    thread reads the file, so the bytes hashed through it stay in file order and none is skipped."""
    handle = _ReaderRecordingFile(b'{"a": 1}' + tail)
    events = scan(handle, frozenset({"a"}), frozenset(), chunk_size=chunk_size)
    if valid:
        assert [e for e in events if isinstance(e, tuple) and e[0] == ""][-1] == ("", 8 + len(tail))
    else:
        with pytest.raises(JSONStructureError, match=r"after the end|one object"):
            list(events)
    assert len(handle.readers) == 1 and threading.get_ident() not in handle.readers


@pytest.mark.parametrize("chunk_size", [1, 4, 1 << 16])
def test_garbage_between_elements_is_refused_by_scan_or_left_to_the_element_parser(chunk_size: int) -> None:
    """Inside a chunk, what stands between two elements stays in one element's raw bytes, where its parser
    refuses it; where a chunk edge cuts it off the elements, the scan refuses it."""
    text = '{"annotations": [{"id": 1}, {"id": 2} null, {"id": 3}]}'
    try:
        _, elements, _ = _collect(text, chunk_size)
    except JSONStructureError as error:
        assert "not objects" in str(error)
    else:
        with pytest.raises(ValueError):
            [json.loads(raw) for raw in elements["annotations"]]


def _random_element(rng: random.Random, depth: int = 0) -> object:
    kind = rng.choice(["object", "object", "number", "string", "array"] if depth else ["object"])
    if kind == "number":
        return rng.choice([rng.randint(-99, 99), round(rng.uniform(-50, 50), 2)])
    if kind == "string":
        return rng.choice(["a,b", "1,2", "}{,", "x"])
    if kind == "array":
        return [_random_element(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {
        "id": rng.randint(0, 9),
        "poly": [[round(rng.uniform(-9, 9), 1) for _ in range(rng.randint(0, 6))]],
        "tag": rng.choice(["p,q", "", "{"]),
        "nested": {"k": [rng.randint(-3, 3), {"v": 1}]} if rng.random() < 0.3 else 1,
    }


@pytest.mark.parametrize("seed", range(4))
def test_random_element_arrays_agree_with_json_loads(seed: int) -> None:
    """Arrays of objects, and arrays mixing objects with numbers, strings or arrays (in every layout of
    commas and spaces): the objects come out exactly as ``json.loads`` reads them, anything else fails."""
    rng = random.Random(seed)
    for _ in range(60):
        mixed = rng.random() < 0.5
        annotations = [_random_element(rng, depth=int(mixed)) for _ in range(rng.randint(1, 6))]
        separators = rng.choice([(",", ":"), (", ", ": "), (",", ": ")])
        text = json.dumps({"images": [], "annotations": annotations}, separators=separators)
        if rng.random() < 0.3:
            text = json.dumps({"images": [], "annotations": annotations}, indent=rng.choice([0, 1]))
        chunk_size = rng.choice([1, 2, 3, 5, 8, 64])
        if all(isinstance(a, dict) for a in annotations):
            _, elements, _ = _collect(text, chunk_size)
            assert [json.loads(raw) for raw in elements["annotations"]] == annotations
        else:
            with pytest.raises(JSONStructureError, match=r"not (objects|an object)"):
                _collect(text, chunk_size)


def test_parse_values_reads_what_json_loads_reads() -> None:
    assert parse_values(b'{"a": [1, 2.5]}, "x", null') == [{"a": [1, 2.5]}, "x", None]
    big, nan = parse_values(b"123456789012345678901234, NaN")  # orjson refuses NaN; json reads both
    assert big == 123456789012345678901234 and math.isnan(nan)
    assert parse_values(b'"\\ud800", Infinity') == ["\ud800", math.inf]
    assert parse_values(b"") == []
    for bad in (b"{", b"1 2", b"{'a': 1}", b"[" * 100_000):
        with pytest.raises(ValueError):
            parse_values(bad)


def _structural_reference(data: bytes) -> list[int]:
    """Brackets, and commas unless a non-space byte other than ``}`` stands before them and, after them
    (past one space), a non-space byte other than ``{``; beyond the data: spaces."""
    padded = b" " + data + b"  "
    found = []
    for i, byte in enumerate(data):
        if byte in b"{}[]":
            found.append(i)
        elif byte == ord(","):
            before, after = padded[i], padded[i + 2]
            if after == ord(" "):
                after = padded[i + 3]
            if not (before > ord(" ") and before != ord("}") and after > ord(" ") and after != ord("{")):
                found.append(i)
    return found


@pytest.mark.parametrize("seed", range(3))
def test_structural_positions_match_the_rule_across_numpy_blocks(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        data = bytes(rng.choice(b'{}[],, 1"a\n\t') for _ in range(rng.randint(0, 40)))
        expected = _structural_reference(data)
        arr = np.frombuffer(data, dtype=np.uint8)
        for block in (1, 2, 5, 64):
            assert _structural_positions(arr, block).tolist() == expected, (data, block)
