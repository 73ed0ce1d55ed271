"""Shared pytest setup: test helpers importable by name, the ``cuda`` marker, paths to test data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
DATA_DIR = TESTS_DIR / "data"
COCO_SAMPLE = DATA_DIR / "coco_sample"

# Helper modules next to the tests (e.g. official_fixture) are imported by name.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``cuda`` where no GPU is present (they run on the GPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def coco_sample() -> Path:
    """The 12-image COCO sample: ``images/*.jpg`` and ``instances.json``."""
    return COCO_SAMPLE
