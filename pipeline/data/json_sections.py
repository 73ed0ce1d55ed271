"""One pass over a large JSON object file: its top-level sections as byte streams, array elements raw.

COCO-format files are one object whose few keys hold huge arrays. Parsing every token in Python (or
lexing the file once per key of interest) is what makes Objects365-size files slow, so this module only
locates structure: per chunk, numpy finds the quotes (and which are escaped), the brackets and commas
outside strings and the nesting depth after each. That is enough to hand out

- the raw bytes of chosen top-level values (``stream_keys``), to be parsed by whoever wants them, and
- the raw bytes of each element of chosen top-level arrays (``element_keys``), without parsing them
  (``Elements.values`` parses a chunk's worth at once; orjson lives here).

Nothing per element is kept beyond one chunk. Malformed structure (unbalanced brackets, an unterminated
string, a non-object top level, a raw control character, values other than objects in an element array)
raises ``JSONStructureError``; a stray value between two objects of one chunk stays in an element's raw
bytes, where its parser refuses it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import orjson

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

    def values(self) -> list[Any]:
        """Each element parsed (see ``parse_values``).

        Raises:
            ValueError: an element that is not valid JSON.
        """
        return parse_values(self.data.replace(SEPARATOR, b","))


def parse_values(joined: bytes) -> list[Any]:
    """The comma-separated JSON values in ``joined``, parsed as one array: with orjson (4x the standard
    parser on COCO's polygons), or with ``json`` where orjson refuses what ``json`` accepts (NaN,
    Infinity, lone surrogates). The values are ``json.loads``'s but for integers beyond 64 bits, which
    orjson reads as floats (no valid COCO id is that large: image records with one are refused either way).

    Raises:
        ValueError: ``joined`` is not comma-separated JSON values (the message says where).
    """
    text = b"[" + joined + b"]"
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        try:
            return json.loads(text)
        except RecursionError:
            raise ValueError("nested too deeply") from None


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


def _outside_strings(structural: np.ndarray, quotes: np.ndarray, in_string: bool) -> np.ndarray:
    """The structural positions that are not inside a string, given the unescaped quote positions: those
    with an even number of quotes before them in the chunk (odd when the chunk starts inside a string)."""
    quotes_before = np.searchsorted(quotes, structural)
    return structural[(quotes_before & 1) == int(in_string)]


_STRUCTURE_BLOCK = 1 << 20
"""Bytes per numpy pass in ``_structural_positions``: the temporaries stay small enough to be reused
instead of freshly mapped (and page-faulted) for every operation, 3x faster than whole 8 MiB chunks."""


def _structural_positions(arr: np.ndarray, block: int = _STRUCTURE_BLOCK) -> np.ndarray:
    """Positions in ``arr (n,) uint8`` of brackets and of the commas that may separate elements of an
    array of objects, ascending, strings not yet excluded.

    A comma between two elements of which neither is an object has neither ``}`` (or whitespace) just
    before it nor ``{`` (or whitespace) just after it, or after one space; such commas are most of a COCO
    file's (between a polygon's coordinates, between an object's members) and are left out. That cannot
    hide a malformed element array: a comma beside an object is always kept, so an array that mixes
    objects with other values shows ``scan`` more separating commas than its objects allow, and one
    without objects fails the empty-array check. Neighbours beyond ``arr`` count as spaces.
    """
    size = arr.size
    padded = np.full(size + 3, ord(" "), dtype=np.uint8)
    padded[1 : size + 1] = arr
    found = []
    for lo in range(0, size, block):
        hi = min(size, lo + block)
        before, here = padded[lo:hi], padded[lo + 1 : hi + 1]
        after, after2 = padded[lo + 2 : hi + 2], padded[lo + 3 : hi + 3]
        folded = here | 0x20  # '[' -> '{', ']' -> '}': one compare each for both bracket kinds
        structural = (folded == ord("{")) | (folded == ord("}"))
        # The next byte, or the one after it when the next is a space, is neither an object nor a space.
        after_plain = ((after > ord(" ")) & (after != ord("{"))) | (
            (after == ord(" ")) & (after2 > ord(" ")) & (after2 != ord("{"))
        )
        inside = (before > ord(" ")) & (before != ord("}")) & after_plain
        structural |= (here == ord(",")) & ~inside
        found.append(np.flatnonzero(structural) + lo)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def _read_ahead(
    handle: BinaryIO, chunk_size: int
) -> Iterator[tuple[bytes, np.ndarray, np.ndarray, np.ndarray]]:
    """The chunks of ``handle`` with their unescaped quotes (as if no backslash run came before the
    chunk) and their brackets and the commas that may separate elements, each chunk prepared in a thread
    while the caller works on the previous one: reading, hashing and numpy's passes release the GIL, so
    the two partly overlap on two cores."""

    def prepare() -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray] | None:
        chunk = handle.read(chunk_size)
        if not chunk:
            return None
        arr = np.frombuffer(chunk, dtype=np.uint8)
        return chunk, arr, _unescaped_quotes(arr, 0), _structural_positions(arr)

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
        if root_closed:  # only whitespace may follow the top-level object
            if chunk.strip(_WHITESPACE):
                raise JSONStructureError(f"data after the end of the top-level object (byte {offset})")
            offset += len(chunk)
            yield ("", offset)
            continue
        if SEPARATOR in chunk:  # JSON has no raw control characters; this one joins elements below
            position = offset + chunk.index(SEPARATOR)
            raise JSONStructureError(f"a raw control character (0x1e) at byte {position}")
        if in_string and backslashes % 2:  # an odd backslash run from the last chunk escapes a quote
            quotes = _unescaped_quotes(arr, backslashes)
        structural = _outside_strings(structural, quotes, in_string)
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
        segment_start = segment_byte = 0
        cut_points = [*boundary.tolist(), structural.size]
        for cut in cut_points:
            # Structural characters [segment_start, cut), bytes [segment_byte, segment_end), belong to the
            # current top-level value.
            segment_end = int(structural[cut]) if cut < structural.size else len(chunk)
            if key is not None and key in element_keys:
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
                gap_from = None if element_open else segment_byte
                if element_open and end_list:
                    gap_from = end_list[0] + 1
                    first_end = end_list.pop(0)
                    parts.append(b"".join(element_parts) + chunk[: first_end + 1])
                    element_parts, element_open = [], False
                    count += 1
                elif element_open:
                    element_parts.append(chunk)  # the element spans this whole chunk
                complete = min(len(start_list), len(end_list))
                if complete:
                    low, high = start_list[0], end_list[complete - 1]
                    inner = commas[(commas > low) & (commas < high)]
                    if inner.size != complete - 1:  # a value between two objects
                        raise JSONStructureError(
                            f"'{key}' holds values that are not objects near byte {offset + low}"
                        )
                    run = arr[low : high + 1].copy()
                    run[inner - low] = SEPARATOR[0]
                    parts.append(run.tobytes())
                    count += complete
                if len(start_list) > complete:
                    element_parts, element_open = [chunk[start_list[-1] :]], True
                # Between elements (outside the runs above) only commas and whitespace may stand.
                gaps = (
                    [chunk[gap_from : start_list[0] if start_list else segment_end]]
                    if gap_from is not None
                    else []
                )
                if complete:
                    next_start = start_list[complete] if len(start_list) > complete else segment_end
                    gaps.append(chunk[end_list[complete - 1] + 1 : next_start])
                if any(gap.translate(None, b" \t\r\n,") for gap in gaps):
                    raise JSONStructureError(
                        f"'{key}' holds values that are not objects near byte {offset + segment_byte}"
                    )
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
            segment_start, segment_byte = cut + 1, position + 1
        if key in stream_keys:
            yield Piece(key, chunk[stream_start:])
            stream_start = 0
        depth = int(after[-1]) if after.size else depth
        if quotes.size % 2 == 1:
            in_string = not in_string
        trailing = _trailing_backslashes(chunk)
        backslashes = (trailing + (backslashes if trailing == len(chunk) else 0)) if in_string else 0
        if root_closed:
            # The rest of the file comes in later chunks: the read-ahead thread owns ``handle``.
            end = int(structural[np.flatnonzero(after == 0)[-1]]) + 1
            if chunk[end:].strip(_WHITESPACE):
                raise JSONStructureError(f"data after the end of the top-level object (byte {offset + end})")
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
