"""Proving that a JPEG decodes without decoding it: a walk over its markers that libjpeg would accept.

libjpeg (the decoder behind ``torchvision.io.decode_jpeg`` and PIL) fails only on what this walk reads:
markers and segment lengths, the frame, quantisation and Huffman tables, scan parameters, restart
markers and the end of the data. Corrupt entropy-coded bits are never fatal to it: it warns and decodes
a damaged picture (so a draft decode does not catch them either). A file the walk accepts therefore
decodes. The shard stage checks every image this way at about the cost of reading it once (one
regular-expression scan of each scan's entropy-coded data for the marker that ends it) instead of
Huffman-decoding it (~25x the CPU).

The walk accepts the common case only: 8-bit Huffman-coded baseline, extended or progressive frames of 1
or 3 components, every table defined before use, restart markers in sequence and in number, every
component coded, an end-of-image marker. Anything else (arithmetic coding, 12 bits, CMYK, a DNL marker,
anything libjpeg would only warn about) gets ``None``: not proven, so the caller decodes it instead.
tests/test_data_jpeg_structure.py holds the walk to ``decode_jpeg`` on corrupted files.
"""

from __future__ import annotations

import functools
import operator
import re
from dataclasses import dataclass, field

_MARKER = re.compile(rb"\xff[^\x00]")
"""A marker inside entropy-coded data: 0xFF not followed by the stuffing zero (restarts included)."""

_SOF_SEQUENTIAL = (0xC0, 0xC1)
_SOF_PROGRESSIVE = 0xC2
_DHT, _DQT, _DRI, _SOS, _EOI = 0xC4, 0xDB, 0xDD, 0xDA, 0xD9
_RST0, _RST7 = 0xD0, 0xD7
_MAX_DIMENSION = 65500  # libjpeg's JPEG_MAX_DIMENSION
_MAX_BLOCKS_IN_MCU = 10  # libjpeg's D_MAX_BLOCKS_IN_MCU


@dataclass
class _Frame:
    """The SOF segment: size, progressive or not, and per component id its (h, v, quant table)."""

    width: int
    height: int
    progressive: bool
    components: dict[int, tuple[int, int, int]]
    max_h: int = 1
    max_v: int = 1
    coded: set[int] = field(default_factory=set)
    """Sequential: the components a scan has coded. Progressive: those with a first DC scan."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


_KRAFT_WEIGHTS = tuple(1 << (15 - i) for i in range(16))
"""2^(16 - length) for code lengths 1..16: a table's codes fit when its weighted counts stay below 2^16."""


@functools.lru_cache(maxsize=256)  # most files of a dataset share their encoder's tables
def _huffman_tables(body: bytes) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The (DC, AC) table ids a DHT segment defines, if libjpeg builds them all: counts within the
    segment, codes that fit their lengths (libjpeg's "Bogus Huffman table definition" when the running
    code reaches 2^length, i.e. the counts over-subscribe the code space), DC symbols up to 15."""
    dc: list[int] = []
    ac: list[int] = []
    i = 0
    while i < len(body):
        if i + 17 > len(body):
            return None
        table_class, table_id = body[i] >> 4, body[i] & 0x0F
        counts = body[i + 1 : i + 17]
        total = sum(counts)
        if table_class > 1 or table_id > 3 or total > 256 or i + 17 + total > len(body):
            return None
        if sum(map(operator.mul, counts, _KRAFT_WEIGHTS)) >= 1 << 16:
            return None
        symbols = body[i + 17 : i + 17 + total]
        if table_class == 0 and symbols and max(symbols) > 15:
            return None
        (dc if table_class == 0 else ac).append(table_id)
        i += 17 + total
    return tuple(dc), tuple(ac)


@functools.lru_cache(maxsize=256)
def _quant_tables(body: bytes) -> tuple[int, ...] | None:
    """The table ids a DQT segment defines, if its tables fill it exactly."""
    defined = []
    i = 0
    while i < len(body):
        precision, table_id = body[i] >> 4, body[i] & 0x0F
        i += 1 + 64 * (precision + 1)
        if precision > 1 or table_id > 3 or i > len(body):
            return None
        defined.append(table_id)
    return tuple(defined)


def _frame(marker: int, body: bytes) -> _Frame | None:
    if len(body) < 6:
        return None
    precision, height, width, count = body[0], body[1] << 8 | body[2], body[3] << 8 | body[4], body[5]
    if (
        precision != 8
        or not (0 < width <= _MAX_DIMENSION and 0 < height <= _MAX_DIMENSION)
        or count not in (1, 3)
        or len(body) != 6 + 3 * count
    ):
        return None
    components = {}
    for j in range(count):
        component_id, sampling, quant = body[6 + 3 * j : 9 + 3 * j]
        h, v = sampling >> 4, sampling & 0x0F
        if not (1 <= h <= 4 and 1 <= v <= 4) or quant > 3 or component_id in components:
            return None
        components[component_id] = (h, v, quant)
    frame = _Frame(width, height, marker == _SOF_PROGRESSIVE, components)
    frame.max_h = max(h for h, _, _ in components.values())
    frame.max_v = max(v for _, v, _ in components.values())
    # Sampling ratios libjpeg's upsampler cannot do ("Fractional sampling not implemented yet").
    if any(frame.max_h % h or frame.max_v % v for h, v, _ in components.values()):
        return None
    return frame


def _scan_ok(
    frame: _Frame, body: bytes, quant: set[int], dc: set[int], ac: set[int]
) -> tuple[int, ...] | None:
    """Check an SOS header against the frame and the tables so far; returns the scanned component ids
    and records in ``frame.coded`` the components this scan codes (a first DC scan when progressive)."""
    count = body[0] if body else 0
    if not 1 <= count <= 4 or len(body) != 4 + 2 * count:
        return None
    ids = tuple(body[1 + 2 * j] for j in range(count))
    if len(set(ids)) != count or any(c not in frame.components for c in ids):
        return None
    selectors = [(body[2 + 2 * j] >> 4, body[2 + 2 * j] & 0x0F) for j in range(count)]
    start, end, high, low = body[-3], body[-2], body[-1] >> 4, body[-1] & 0x0F
    if any(frame.components[c][2] not in quant for c in ids):
        return None
    if count > 1 and sum(frame.components[c][0] * frame.components[c][1] for c in ids) > _MAX_BLOCKS_IN_MCU:
        return None
    if not frame.progressive:
        if (start, end, high, low) != (0, 63, 0, 0) or frame.coded.intersection(ids):
            return None
        if any(d not in dc or a not in ac for d, a in selectors):
            return None
        frame.coded.update(ids)
        return ids
    if low > 13 or (high and low != high - 1):
        return None
    if start == 0:  # DC scan
        if end != 0 or (high == 0 and any(d not in dc for d, _ in selectors)):
            return None
        if high == 0:
            frame.coded.update(ids)
        elif not frame.coded.issuperset(ids):
            return None
        return ids
    if count != 1 or end < start or end > 63 or selectors[0][1] not in ac or ids[0] not in frame.coded:
        return None
    return ids


def _expected_restarts(frame: _Frame, ids: tuple[int, ...], interval: int) -> int:
    """Restart markers a scan of ``ids`` holds: one per ``interval`` MCUs but after the last."""
    if len(ids) > 1:
        mcus = _ceil_div(frame.width, 8 * frame.max_h) * _ceil_div(frame.height, 8 * frame.max_v)
    else:
        h, v, _ = frame.components[ids[0]]
        mcus = _ceil_div(_ceil_div(frame.width * h, frame.max_h), 8) * _ceil_div(
            _ceil_div(frame.height * v, frame.max_v), 8
        )
    return _ceil_div(mcus, interval) - 1


def _scan_end(data: bytes, start: int, restarts: int) -> int | None:
    """Where the entropy-coded data from ``start`` ends, if it holds exactly ``restarts`` RSTs in order."""
    seen = 0
    while True:
        match = _MARKER.search(data, start)
        if match is None:
            return None  # truncated inside a scan
        marker = data[match.start() + 1]
        if not _RST0 <= marker <= _RST7:
            return match.start() if seen == restarts else None
        if seen == restarts or marker != _RST0 + seen % 8:
            return None
        seen += 1
        start = match.end()


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a JPEG whose structure libjpeg decodes without error, else ``None``.

    ``None`` means "not proven", not "broken": the caller decodes such a file to decide.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    frame: _Frame | None = None
    quant: set[int] = set()
    dc: set[int] = set()
    ac: set[int] = set()
    interval = 0
    pos, size = 2, len(data)
    while True:
        if pos >= size or data[pos] != 0xFF:
            return None
        while pos < size and data[pos] == 0xFF:  # fill bytes
            pos += 1
        marker = data[pos] if pos < size else None
        if marker == _EOI:
            break
        if pos + 2 >= size:
            return None
        length = data[pos + 1] << 8 | data[pos + 2]
        body_start, end = pos + 3, pos + 1 + length
        if length < 2 or end > size:
            return None
        pos = end
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:  # APPn, COM: libjpeg skips them
            continue
        body = data[body_start:end]
        if marker == _DQT:
            tables = _quant_tables(body)
            ok = tables is not None
            quant.update(tables or ())
        elif marker == _DHT:
            huffman = _huffman_tables(body)
            ok = huffman is not None
            if huffman is not None:
                dc.update(huffman[0])
                ac.update(huffman[1])
        elif marker == _DRI:
            ok = len(body) == 2
            interval = body[0] << 8 | body[1] if ok else 0
        elif marker in _SOF_SEQUENTIAL or marker == _SOF_PROGRESSIVE:
            ok = frame is None
            frame = _frame(marker, body) if ok else None
            ok = frame is not None
        elif marker == _SOS:
            ids = _scan_ok(frame, body, quant, dc, ac) if frame is not None else None
            restarts = _expected_restarts(frame, ids, interval) if ids and interval else 0
            scan_end = _scan_end(data, end, restarts) if ids is not None else None
            ok = scan_end is not None
            if scan_end is not None:
                pos = scan_end
        else:
            ok = False  # another SOF type, DAC, DNL, JPGn, ...: not the common case
        if not ok:
            return None
    if frame is None or frame.coded != set(frame.components):
        return None
    return frame.width, frame.height
