"""What a Ray task of ``run`` executes for one stage: import the stage's entry point and call it.

A module of its own, with nothing heavy imported, so that a fresh Ray worker imports only this and the
stage's own modules (the shard and demo-data stages need no torch).
"""

from __future__ import annotations

import importlib
import traceback
from typing import Any


def run_stage(entry: str, config: Any) -> tuple[int, str]:
    """Call the stage function ``entry`` (``module:function``) on its validated config.

    Returns:
        (exit code, error text): the function's code (None counts as 0), or 1 and the exception's first
        line (its traceback goes to the task's log).
    """
    module, _, function = entry.partition(":")
    try:
        code = getattr(importlib.import_module(module), function)(config)
    except Exception as error:
        traceback.print_exc()
        text = str(error).strip()
        return 1, f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
    return int(code or 0), "" if not code else f"exited with code {code}"
