"""What a training run tells the outside on rank 0: progress lines and ``metrics.jsonl`` records.

The same scalars go to the experiment tracker (``pipeline.tracking``) from the loop.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("pipeline.train")

METRICS_FILE = "metrics.jsonl"


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory on CUDA, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kib * (1 if sys.platform != "darwin" else 1 / 1024) / 2**20


def duration(seconds: float) -> str:
    """``1h02m03s``."""
    seconds = max(round(seconds), 0)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


class Progress:
    """Progress lines and ``metrics.jsonl`` records (rank 0), from the losses read every ``log_every``."""

    def __init__(
        self,
        out: Path,
        total_steps: int,
        images_per_step: int,
        group_names: Sequence[str],
        device: torch.device,
        resume_step: int,
        enabled: bool,
    ) -> None:
        self.path = Path(out) / METRICS_FILE
        self.total, self.images_per_step = total_steps, images_per_step
        self.group_names, self.device, self.enabled = list(group_names), device, enabled
        self.start_step = self.last_step = resume_step
        self.start = self.last = time.perf_counter()
        if enabled:
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        # A killed run may have logged steps past its last checkpoint; the resumed run logs them again.
        if not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (a checkpoint, an evaluation) out of the next rate and ETA."""
        self.last += seconds

    def report(
        self, step: int, epoch: float, losses: dict[str, float], lrs: Sequence[float], extra: dict[str, Any]
    ) -> dict[str, float]:
        """Log the progress line and append the record; returns the scalars for the tracker.

        ``epoch``: epochs done, fractional (2.25: a quarter into the third epoch).
        """
        now = time.perf_counter()
        steps = max(step - self.last_step, 1)
        rate = steps * self.images_per_step / max(now - self.last, 1e-9)
        seconds_per_step = (now - self.last) / steps
        self.last, self.last_step = now, step
        eta = duration(seconds_per_step * max(self.total - step, 0))
        mem = memory_gib(self.device)
        scalars: dict[str, float] = {f"train/{k}": v for k, v in losses.items()}
        scalars.update({f"lr/{name}": lr for name, lr in zip(self.group_names, lrs)})
        scalars.update({"perf/images_per_s": rate, "perf/memory_gib": mem, "train/epoch": epoch})
        scalars.update({k: float(v) for k, v in extra.items()})
        if self.enabled:
            main = " ".join(
                f"{name.removeprefix('loss_')} {losses[name]:.4f}"
                for name in ("loss_class", "loss_bbox", "loss_giou")
                if name in losses
            )
            log.info(
                "step %d/%d epoch %.2f | loss %.4f (%s) | lr %s | %.2f img/s | mem %.2f GiB | ETA %s",
                step,
                self.total,
                epoch,
                losses.get("loss", float("nan")),
                main,
                " ".join(f"{lr:.3g}" for lr in dict.fromkeys(lrs)),
                rate,
                mem,
                eta,
            )
            record = {"step": step, "epoch": epoch, **scalars, "time": time.time()}
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        return scalars
