"""One pass over a large JSON object file: its top-level sections as byte streams, array elements raw.

COCO-format files are one object whose few keys hold huge arrays. Parsing every token in Python (or
lexing the file once per key of interest) is what makes Objects365-size files slow, so this module only
locates structure: per chunk, numpy finds the quotes (and which are escaped), the brackets and commas
outside strings and the nesting depth after each. That is enough to hand out

- the raw bytes of chosen top-level values (``stream_keys``), to be parsed by whoever wants them, and
- the raw bytes of each element of chosen top-level arrays (``element_keys``), without parsing them.

Nothing per element is kept beyond one chunk. Malformed structure (unbalanced brackets, an unterminated
string, a non-object top level, non-object elements of an element array) raises ``JSONStructureError``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

CHUNK = 8 << 20
_OPEN = (ord("{"), ord("["))
_KEY_BEFORE = re.compile(rb'"((?:[^"\\]|\\.)*)"\s*:\s*$', re.DOTALL)
_WHITESPACE = b" \t\r\n"
_DELTA = np.zeros(256, dtype=np.int64)
_DELTA[list(b"{[")] = 1
_DELTA[list(b"}]")] = -1


class JSONStructureError(ValueError):
    """The bytes are not a well-formed JSON object (the message says where and why)."""


@dataclass(frozen=True)
class Piece:
    """A run of raw bytes of the top-level value of ``key`` (a ``stream_keys`` key), in file order."""

    key: str
    data: bytes


SEPARATOR = b"\x1e"
"""Joins raw elements in ``Elements.data``: a control character, so never inside valid JSON."""


@dataclass(frozen=True)
class Elements:
    """``count`` consecutive elements of the top-level array ``key``, raw, joined by ``SEPARATOR``."""

    key: str
    data: bytes
    count: int

    def items(self) -> list[bytes]:
        """The raw bytes of each element."""
        return self.data.split(SEPARATOR)


def _unescaped_quotes(arr: np.ndarray, carry_backslashes: int) -> np.ndarray:
    quotes = np.flatnonzero(arr == 34)
    if not quotes.size:
        return quotes
    before = quotes - 1
    suspect = np.flatnonzero((before >= 0) & (arr[np.maximum(before, 0)] == 92))
    escaped = np.zeros(quotes.size, dtype=bool)
    for k in suspect.tolist():  # rare: quotes preceded by a backslash; count the run
        position, run = int(quotes[k]) - 1, 0
        while position >= 0 and arr[position] == 92:
            run += 1
            position -= 1
        if position < 0:
            run += carry_backslashes
        escaped[k] = run % 2 == 1
    if quotes[0] == 0 and carry_backslashes % 2 == 1:
        escaped[0] = True
    return quotes[~escaped]


def _outside_strings(structural: np.ndarray, quotes: np.ndarray, in_string: bool, size: int) -> np.ndarray:
    """The structural positions that are not inside a string, given the unescaped quote positions.

    Looks up each string's span among the structural positions (strings are far fewer than commas and
    brackets, and seldom hold any), instead of each structural position among the quotes.
    """
    bounds = quotes
    if in_string:  # the chunk starts inside a string that an earlier chunk opened
        bounds = np.concatenate(([-1], bounds))
    if bounds.size % 2:  # the last string goes on into the next chunk
        bounds = np.concatenate((bounds, [size]))
    index = np.searchsorted(structural, bounds)
    first, stop = index[0::2], index[1::2]
    spans = np.flatnonzero(stop > first)
    if not spans.size:
        return structural
    counts = stop[spans] - first[spans]
    offsets = np.repeat(first[spans] - (np.cumsum(counts) - counts), counts)
    keep = np.ones(structural.size, dtype=bool)
    keep[offsets + np.arange(int(counts.sum()))] = False
    return structural[keep]


def _read_ahead(
    handle: BinaryIO, chunk_size: int
) -> Iterator[tuple[bytes, np.ndarray, np.ndarray, np.ndarray]]:
    """The chunks of ``handle`` with their unescaped quotes (as if no backslash run came before the
    chunk) and their brackets and commas, each chunk prepared in a thread while the caller works on the
    previous one: reading, hashing and numpy's passes release the GIL, so the two overlap on two cores."""

    def prepare() -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray] | None:
        chunk = handle.read(chunk_size)
        if not chunk:
            return None
        arr = np.frombuffer(chunk, dtype=np.uint8)
        folded = arr | 0x20  # '[' -> '{', ']' -> '}': one compare each for both bracket kinds
        structural = np.flatnonzero((folded == ord("{")) | (folded == ord("}")) | (arr == ord(",")))
        return chunk, arr, _unescaped_quotes(arr, 0), structural

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="json-read-ahead") as pool:
        ahead = pool.submit(prepare)
        while (prepared := ahead.result()) is not None:
            ahead = pool.submit(prepare)
            yield prepared


def _trailing_backslashes(chunk: bytes) -> int:
    return len(chunk) - len(chunk.rstrip(b"\\"))


def scan(
    handle: BinaryIO, stream_keys: frozenset[str], element_keys: frozenset[str], chunk_size: int = CHUNK
) -> Iterator[Piece | Elements | tuple[str, int]]:
    """Walk the JSON object in ``handle`` once; yields ``Piece``/``Elements`` and ``(key, end)`` when a
    watched top-level value ends. Also yields ``("", bytes_read)`` after each chunk, for progress.

    Raises:
        JSONStructureError: malformed structure.
    """
    in_string = False
    backslashes = 0
    depth = 0
    offset = 0
    seen_root = False
    root_closed = False
    key: str | None = None  # the top-level key whose value is open (depth >= 2), if watched
    tail = b""  # the last bytes before this chunk, for reading keys split across chunks
    element_parts: list[bytes] = []  # bytes of an element that started in an earlier chunk
    element_open = False
    elements_seen = commas_seen = 0
    for chunk, arr, quotes, structural in _read_ahead(handle, chunk_size):
        if in_string and backslashes % 2:  # an odd backslash run from the last chunk escapes a quote
            quotes = _unescaped_quotes(arr, backslashes)
        structural = _outside_strings(structural, quotes, in_string, arr.size)
        chars = arr[structural]
        delta = _DELTA[chars]
        after = depth + np.cumsum(delta, dtype=np.int64)
        before = after - delta
        if after.size and after.min() < 0:
            raise JSONStructureError(
                f"unbalanced closing bracket near byte {offset + int(structural[np.argmax(after < 0)])}"
            )
        # Boundaries of top-level values: opens at depth 1 -> 2, closes at 2 -> 1, root opens/closes.
        boundary = np.flatnonzero(
            ((before == 1) & (delta == 1)) | ((after == 1) & (delta == -1)) | (before == 0) | (after == 0)
        )
        segment_start = 0
        cut_points = [*boundary.tolist(), structural.size]
        for cut in cut_points:
            # Structural characters [segment_start, cut) belong to the current top-level value.
            if key is not None and key in element_keys and (cut > segment_start or element_open):
                seg = slice(segment_start, cut)
                s_pos, s_before, s_after, s_delta = structural[seg], before[seg], after[seg], delta[seg]
                commas_seen += int(np.count_nonzero((s_before == 2) & (s_delta == 0)))
                starts = s_pos[(s_before == 2) & (s_delta == 1)]
                ends = s_pos[(s_after == 2) & (s_delta == -1)]
                if (starts.size and arr[starts].min() != ord("{")) or (
                    ends.size and arr[ends].min() != ord("}")
                ):
                    raise JSONStructureError(
                        f"'{key}' holds an element that is not an object near byte {offset + int(s_pos[0])}"
                    )
                # Complete elements are cut out of the chunk as one run whose separating commas become
                # SEPARATOR: no Python work per element.
                commas = s_pos[(s_before == 2) & (s_delta == 0)]
                parts: list[bytes] = []
                count = 0
                start_list, end_list = starts.tolist(), ends.tolist()
                if element_open and end_list:
                    first_end = end_list.pop(0)
                    parts.append(b"".join(element_parts) + chunk[: first_end + 1])
                    element_parts, element_open = [], False
                    count += 1
                elif element_open:
                    element_parts.append(chunk)  # the element spans this whole chunk
                complete = min(len(start_list), len(end_list))
                if complete:
                    low, high = start_list[0], end_list[complete - 1]
                    run = arr[low : high + 1].copy()
                    run[commas[(commas > low) & (commas < high)] - low] = SEPARATOR[0]
                    parts.append(run.tobytes())
                    count += complete
                if len(start_list) > complete:
                    element_parts, element_open = [chunk[start_list[-1] :]], True
                elements_seen += count
                if count:
                    yield Elements(key, SEPARATOR.join(parts), count)
            if cut == structural.size:
                break
            position = int(structural[cut])
            if before[cut] == 0:
                if seen_root or chars[cut] != ord("{"):
                    raise JSONStructureError(f"the top level must be one object (byte {offset + position})")
                seen_root = True
            elif after[cut] == 0:
                root_closed = True
            elif delta[cut] == 1:  # a top-level value opens
                window = (tail + chunk[:position])[-4096:]
                match = _KEY_BEFORE.search(window)
                name = match.group(1).decode("utf-8", "replace") if match else ""
                key = name if name in stream_keys or name in element_keys else None
                elements_seen = commas_seen = 0
                open_at = offset + position
                if key in stream_keys:
                    stream_start = position
            else:  # a top-level value closes
                if key in stream_keys:
                    yield Piece(key, chunk[stream_start : position + 1])
                if key in element_keys and (
                    commas_seen != max(elements_seen - 1, 0)
                    or (
                        not elements_seen
                        and (
                            offset + position - open_at > 4096
                            or (tail + chunk)[len(tail) + open_at - offset + 1 : len(tail) + position].strip(
                                _WHITESPACE
                            )
                        )
                    )
                ):
                    raise JSONStructureError(f"'{key}' holds elements that are not objects")
                if key is not None:
                    yield (key, offset + position)
                key = None
            segment_start = cut + 1
        if key in stream_keys:
            yield Piece(key, chunk[stream_start:])
            stream_start = 0
        depth = int(after[-1]) if after.size else depth
        if quotes.size % 2 == 1:
            in_string = not in_string
        trailing = _trailing_backslashes(chunk)
        backslashes = (trailing + (backslashes if trailing == len(chunk) else 0)) if in_string else 0
        if root_closed:
            rest = chunk[int(structural[np.flatnonzero(after == 0)[-1]]) + 1 :]
            if rest.strip(_WHITESPACE) or handle.read(1).strip(_WHITESPACE):
                raise JSONStructureError("data after the end of the top-level object")
        tail = (tail + chunk)[-4096:]
        offset += len(chunk)
        yield ("", offset)
    if not seen_root:
        raise JSONStructureError("empty file or no top-level object")
    if in_string or depth != 0 or not root_closed:
        raise JSONStructureError(
            f"the file ends inside {'a string' if in_string else 'an open object or array'} "
            f"(depth {depth}): truncated?"
        )
