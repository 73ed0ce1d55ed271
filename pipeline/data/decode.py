"""Decoding image bytes for training and evaluation.

JPEG goes through libjpeg-turbo in ``torchvision.io.decode_jpeg`` straight into a tensor (the fastest
candidate measured here with the training transform, see benchmarks/RESULTS.md "Data"); other formats
through PIL. torchvision 0.29 marks its image I/O deprecated in favour of TorchCodec, which is not in
this environment; the warning is silenced here and PIL is the drop-in fallback when it goes.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg


def decode_rgb(data: bytes) -> torch.Tensor:
    """Decode image bytes to an RGB ``(3, H, W)`` uint8 tensor; the bytes say whether they are a JPEG
    (a file's name may not: a PNG saved as ``.jpg``)."""
    if data.startswith(b"\xff\xd8"):
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*TorchVision are deprecated", DeprecationWarning)
            return decode_jpeg(buffer, mode=ImageReadMode.RGB)
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
