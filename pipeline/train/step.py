"""The pieces of one training step that are plain PyTorch (the benchmark runs them without DeepSpeed).

- :class:`TrainModule`: detector + criterion as one module returning the loss terms (a dict of tensors,
  which ZeRO-3's hooks can follow; see :mod:`pipeline.train.engine`).
- :func:`training_targets`: crowd boxes dropped on the host before the copy to the device (boolean
  indexing on a GPU tensor would wait for the GPU).
- :func:`loss_term_names` / :class:`LossMeter`: loss terms summed on the device and read every
  ``log_every`` steps in one transfer, not per term per step.
- :class:`NonFiniteGuard`: counts skipped steps, stops the run after ``patience`` in a row.

Legend: B images per rank, n boxes of an image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from dino_core.config import DINOConfig
from pipeline.data.collate import Batch


class TrainModule(nn.Module):
    """The detector and its loss as one module (what DeepSpeed wraps); ``.model`` is the detector."""

    def __init__(self, model: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(
        self,
        images: torch.Tensor,
        image_sizes: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
        num_boxes: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Loss terms of a batch.

        images (B, 3, H, W), image_sizes (B, 2) int64 (h, w), targets per image ``labels`` (n,) int64 and
        ``boxes`` (n, 4) cxcywh in [0, 1] (no crowd boxes), num_boxes () -> weighted terms and ``loss``.
        """
        return self.criterion(self.model(images, image_sizes, targets), targets, num_boxes=num_boxes)


def training_targets(batch: Batch) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The batch's targets without crowd boxes (on the batch's device, the host), and their box count."""
    targets = []
    for target in batch.targets:
        keep = ~target["iscrowd"]
        targets.append({"labels": target["labels"][keep], "boxes": target["boxes"][keep]})
    return targets, sum(len(t["labels"]) for t in targets)


def to_device(
    batch: Batch, targets: list[dict[str, torch.Tensor]], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Images (in ``dtype``) and targets on ``device`` (asynchronous from pinned memory); the image sizes
    stay on the host, where the detector reads them as Python ints (on a GPU each read would wait for it)."""
    non_blocking = device.type == "cuda"
    images = batch.images
    if non_blocking:
        images = images.pin_memory()
    images = images.to(device, dtype, non_blocking=non_blocking)
    moved = [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in targets]
    return images, batch.image_sizes, moved


def global_num_boxes(local: int, device: torch.device) -> torch.Tensor:
    """Boxes per rank averaged over ranks, at least 1: the loss normaliser (a device tensor, no host wait).

    A fill kernel rather than a copy of a host scalar, which would wait for the device's queue."""
    count = torch.full((), float(local), device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)


def loss_term_names(model: DINOConfig) -> list[str]:
    """The criterion's terms in a fixed order: ``loss`` first, then per supervised output class/bbox/giou
    (final layer, auxiliary layers, encoder proposals, denoising final and auxiliary layers)."""
    suffixes = [""] + [f"_{i}" for i in range(model.dec_layers - 1)]
    if model.query_selection != "static":
        suffixes.append("_enc")
    if model.denoising.enabled:
        suffixes += ["_dn"] + [f"_dn_{i}" for i in range(model.dec_layers - 1)]
    return ["loss"] + [f"loss_{name}{s}" for s in suffixes for name in ("class", "bbox", "giou")]


def stack_terms(terms: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """The terms as one fp32 vector in ``names`` order (absent ones, e.g. denoising without boxes, as 0).

    Raises:
        KeyError: for a term the names do not know (the criterion changed; extend loss_term_names).
    """
    unknown = sorted(set(terms) - set(names))
    if unknown:
        raise KeyError(f"loss terms {unknown} are not in loss_term_names(); update it")
    loss = terms["loss"]
    zero = loss.new_zeros((), dtype=torch.float32)
    return torch.stack([terms[n].detach().float() if n in terms else zero for n in names])


@dataclass
class LossMeter:
    """Running sum of loss-term vectors on the device; :meth:`read` all-reduces and reads them at once."""

    names: list[str]
    total: torch.Tensor | None = None
    count: int = 0

    def add(self, vector: torch.Tensor) -> None:
        """Add one step's terms (no host synchronisation)."""
        self.total = vector.detach().clone() if self.total is None else self.total + vector.detach()
        self.count += 1

    def read(self) -> dict[str, float]:
        """Mean of each term since the last read, averaged over ranks (collective: all ranks call it);
        resets the sum. Empty when nothing was added on any rank."""
        device = self.total.device if self.total is not None else torch.device("cpu")
        packed = torch.zeros(len(self.names) + 1, dtype=torch.float64, device=device)
        if self.total is not None:
            packed[:-1] = self.total.double()
        packed[-1] = float(self.count)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed)
        values = packed.tolist()
        self.total, self.count = None, 0
        if values[-1] == 0:
            return {}
        return {n: v / values[-1] for n, v in zip(self.names, values[:-1])}

    def state(self) -> dict:
        """The unread sums (JSON-able), for a checkpoint: a resumed run's first reading matches."""
        total = None if self.total is None else self.total.double().cpu().tolist()
        return {"names": self.names, "total": total, "count": self.count}

    def restore(self, state: dict, device: torch.device) -> None:
        """Undo :meth:`state`."""
        if list(state["names"]) != self.names:
            raise ValueError("the checkpoint's loss terms differ from this model's")
        self.count = int(state["count"])
        total = state["total"]
        self.total = None if total is None else torch.tensor(total, dtype=torch.float32, device=device)


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank.

    The one host synchronisation the step needs: ranks must agree to skip a step together (a rank that
    skipped its backward would leave the others waiting in ZeRO's gradient reduction).
    """
    flag = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


class NonFiniteLossError(RuntimeError):
    """Raised after ``train.nan_patience`` consecutive non-finite losses."""


@dataclass
class NonFiniteGuard:
    """Counts micro-batches skipped for a non-finite loss; raises after ``patience`` in a row."""

    patience: int
    skipped: int = 0
    in_row: int = 0
    last: dict[str, float] = field(default_factory=dict)

    def record(self, finite: bool, step: int, terms: dict[str, float] | None, last_checkpoint: str) -> None:
        """Note one micro-batch's outcome; ``terms`` (read only on the failure path) go into the error.

        Raises:
            NonFiniteLossError: naming the step, the loss terms and the last good checkpoint.
        """
        if finite:
            self.in_row = 0
            return
        self.skipped += 1
        self.in_row += 1
        self.last = dict(terms or {})
        if self.in_row >= self.patience:
            bad = ", ".join(f"{k}={_fmt(v)}" for k, v in self.last.items() if not math.isfinite(v)) or "?"
            good = ", ".join(f"{k}={_fmt(v)}" for k, v in self.last.items() if math.isfinite(v)) or "none"
            raise NonFiniteLossError(
                f"{self.in_row} consecutive non-finite losses (train.nan_patience={self.patience}) at "
                f"optimizer step {step}: non-finite terms {bad}; finite terms {good}; {self.skipped} skipped "
                f"in total. Last good checkpoint: {last_checkpoint}. Lower the learning rate or check the "
                "data, then rerun the same command to resume from it"
            )


def _fmt(value: float) -> str:
    return f"{value:.4g}"
