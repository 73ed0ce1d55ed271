"""The JPEG structure walk (the shard stage's default decode proof) against libjpeg's own verdict.

The claim under test: every file ``jpeg_size`` accepts decodes with ``torchvision.io.decode_jpeg`` (the
training decoder), with the size it reports; files it cannot prove fall back to a decode.
"""

from __future__ import annotations

import io
import random
import struct
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.data.image_check import ImageDecodeError, probe_image
from pipeline.data.jpeg_structure import jpeg_size

SAMPLE = Path(__file__).parent / "data" / "coco_sample" / "images"
SOURCES = sorted(SAMPLE.glob("*.jpg"))


def _decodes(data: bytes) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            return False
    return True


def _encode(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


ENCODINGS = {
    "baseline": {},
    "progressive": {"progressive": True},
    "restart_blocks": {"restart_marker_blocks": 3},
    "progressive_restart_rows": {"progressive": True, "restart_marker_rows": 1},
    "444": {"subsampling": 0},
    "422": {"subsampling": 1},
    "optimized": {"optimize": True},
}


@pytest.fixture(scope="module")
def variants() -> dict[str, bytes]:
    """Small encodings of one sample image: every kind of frame and scan layout the walk accepts."""
    image = Image.open(SOURCES[0]).convert("RGB").resize((77, 53))
    out = {name: _encode(image, **options) for name, options in ENCODINGS.items()}
    out["grey"] = _encode(image.convert("L"))
    out["grey_progressive_restart"] = _encode(image.convert("L"), progressive=True, restart_marker_blocks=2)
    return out


def _segments(data: bytes) -> dict[int, list[int]]:
    """Offsets of each marker's 0xFF up to the first SOS, by marker."""
    found: dict[int, list[int]] = {}
    pos = 2
    while True:
        marker = data[pos + 1]
        found.setdefault(marker, []).append(pos)
        if marker == 0xDA:
            return found
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]


def test_real_images_are_proven_with_their_size() -> None:
    assert len(SOURCES) >= 10
    for path in SOURCES:
        data = path.read_bytes()
        assert jpeg_size(data) == Image.open(path).size, path.name


def test_every_encoder_layout_is_proven(variants: dict[str, bytes]) -> None:
    for name, data in variants.items():
        assert jpeg_size(data) == (77, 53), name
        assert _decodes(data)


def _corrupt(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:  # bit flips anywhere
        for _ in range(rng.choice((1, 3))):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # one flip among the tables and headers
        out[rng.randrange(min(len(out), 700))] ^= 1 << rng.randrange(8)
    elif kind == 2:  # a stray marker
        at = rng.randrange(2, len(out))
        out[at:at] = bytes((0xFF, rng.randrange(256)))
    elif kind == 3:  # truncated
        del out[rng.randrange(2, len(out)) :]
    elif kind == 4:  # truncated, an end-of-image marker appended
        del out[rng.randrange(2, len(out)) :]
        out += b"\xff\xd9"
    else:  # bytes deleted
        at = rng.randrange(len(out))
        del out[at : at + rng.randrange(1, 40)]
    return bytes(out)


def test_no_corrupted_file_is_accepted_that_libjpeg_refuses(variants: dict[str, bytes]) -> None:
    """Seeded corruption corpus: what the walk accepts always decodes; both verdicts occur often."""
    rng = random.Random(0)
    pool = [*variants.values(), SOURCES[1].read_bytes()]
    outcomes = {(True, True): 0, (False, True): 0, (False, False): 0}
    for _ in range(600):
        data = _corrupt(rng.choice(pool), rng)
        accepted, decodes = jpeg_size(data) is not None, _decodes(data)
        assert not accepted or decodes, "the walk accepted a file libjpeg refuses"
        outcomes[accepted, decodes] += 1
    assert outcomes[True, True] >= 150 and outcomes[False, False] >= 100, outcomes


def _edit(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


def test_each_fatal_structure_is_not_proven(variants: dict[str, bytes]) -> None:
    base = variants["baseline"]
    seg = _segments(base)
    dht, dqt, sof, sos = seg[0xC4][0], seg[0xDB][0], seg[0xC0][0], seg[0xDA][0]
    restart = variants["restart_blocks"]
    first_rst = restart.index(b"\xff\xd0", _segments(restart)[0xDA][0])
    progressive = variants["progressive"]
    prog_sos = _segments(progressive)[0xDA][0]
    prog_al = prog_sos + 7 + 2 * progressive[prog_sos + 4]  # Ah/Al byte after the Ns component pairs
    cases = {
        "no end of image": base[:-2],
        "cut inside a scan": base[: len(base) // 2],
        "over-subscribed Huffman table": _edit(base, dht + 5, bytes([3])),  # three 1-bit codes
        "DC symbol over 15": _edit(base, dht + 5 + 16 + 1, bytes([16])),
        "Huffman table id 5": _edit(base, dht + 4, bytes([0x05])),
        "undefined quantisation table": _edit(base, sof + 10 + 2, bytes([3])),
        "scan of an unknown component": _edit(base, sos + 5, bytes([9])),
        "scan with an undefined Huffman table": _edit(base, sos + 6, bytes([0x33])),
        "unknown marker in a scan": base[:-200] + b"\xff\x20" + base[-198:],
        "segment past the end": _edit(base, dqt + 2, b"\xff\xf0"),
        "12-bit precision": _edit(base, sof + 4, bytes([12])),
        "zero height (DNL)": _edit(base, sof + 5, b"\x00\x00"),
        "second frame header": base[:sos] + base[sof : sof + 19] + base[sos:],
        "restart out of order": _edit(restart, first_rst, b"\xff\xd3"),
        "restart missing": restart[:first_rst] + restart[first_rst + 2 :],
        "progressive Al over 13": _edit(progressive, prog_al, b"\x0e"),
        "arithmetic coding": _edit(base, sof + 1, b"\xc9"),
        "CMYK": _encode(Image.new("CMYK", (16, 16))),
    }
    for name, data in cases.items():
        assert jpeg_size(data) is None, name


def test_tolerated_forms_stay_proven(variants: dict[str, bytes]) -> None:
    base = variants["baseline"]
    dqt = _segments(base)[0xDB][0]
    assert jpeg_size(base[:dqt] + b"\xff\xff" + base[dqt:]) == (77, 53)  # fill bytes before a marker
    assert jpeg_size(base + b"\x00" * 7 + b"junk") == (77, 53)  # trailing bytes after end of image


def test_probe_falls_back_to_a_decode() -> None:
    cmyk = _encode(Image.new("CMYK", (16, 12)))
    assert probe_image(cmyk).width == 16 and probe_image(cmyk).extension == "jpg"
    png = io.BytesIO()
    Image.new("RGB", (5, 3)).save(png, "PNG")
    assert (probe_image(png.getvalue()).extension, probe_image(png.getvalue()).height) == ("png", 3)
    truncated = SOURCES[0].read_bytes()[:5000]
    for level in ("structure", "draft", "full"):
        with pytest.raises(ImageDecodeError):
            probe_image(truncated, level)
    with pytest.raises(ImageDecodeError, match="cannot identify"):
        probe_image(b"GIF89a not really")
