"""Proving that image bytes decode, without paying for a full-size decode (the shard stage's check).

The shard stage stores the source bytes unchanged, so it only has to show that a file is an image of the
size its annotation record says. ``probe_image`` does that at three costs: ``structure`` (a JPEG's
markers, tables and scans walked as libjpeg reads them, see ``jpeg_structure``; what the walk cannot
prove, and every other format, is decoded as ``draft`` does), ``draft`` (every scan entropy-decoded, the
inverse DCT at 1/8 scale) and ``full``. PIL only: shard workers never load torch.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from pipeline.data.jpeg_structure import jpeg_size

FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png"}
"""Formats the shards carry, with the WebDataset extension they are stored under."""


class ImageDecodeError(ValueError):
    """Bytes that are not a complete image of a supported format."""


@dataclass(frozen=True)
class ImageProbe:
    """What probing found: the WebDataset extension of the format and the size in pixels."""

    extension: str
    width: int
    height: int


def probe_image(data: bytes, level: str = "structure") -> ImageProbe:
    """Check that ``data`` is a decodable JPEG or PNG; ``level`` is ``structure``, ``draft`` or ``full``.

    Raises:
        ImageDecodeError: unknown format, truncated or corrupt data (the message says which).
    """
    if level == "structure":
        size = jpeg_size(data)
        if size is not None:
            return ImageProbe("jpg", *size)
    with warnings.catch_warnings():
        # PIL reports some corrupt streams only as warnings; make them failures.
        warnings.simplefilter("error")
        try:
            image = Image.open(io.BytesIO(data))
            extension = FORMAT_EXTENSIONS.get(image.format or "")
            if extension is None:
                raise ImageDecodeError(f"unsupported image format {image.format!r}")
            width, height = image.size
            if level != "full" and image.format == "JPEG":
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
        except ImageDecodeError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Warning) as error:
            raise ImageDecodeError(f"{type(error).__name__}: {error}") from None
    return ImageProbe(extension, width, height)
