"""The DeepSpeed engine: process group, ZeRO config, checkpoint files, parameter gathering, fp32 export.

The only module that imports DeepSpeed (an import-linter contract). It is imported lazily
(:func:`_deepspeed`): on a machine without CUDA it first sets ``DS_ACCELERATOR=cpu`` and stops DeepSpeed
from compiling its shared-memory communication op, which training never uses (gloo carries the traffic).

What the rest of the training code sees is :class:`Engine`: forward, backward, step, the accumulation
boundary, setting each group's learning rate, checkpoint save/load, ``gather`` (whole parameters under
ZeRO-3), the full fp32 weights of the live model, and :func:`export_fp32_state_dict` for a written
checkpoint (DeepSpeed's ``zero_to_fp32``).

ZeRO-3 and dino_core: ZeRO-3 gathers a module's own parameters when the module is called and again
before its backward, which it finds through the module's output tensors. dino_core reads a few parameters
outside their module's call (the query-selection content embedding, the sampling-offset projection read by
its attention module, the denoising label embedding) and two modules return dataclasses, whose tensors
ZeRO-3 cannot see. :data:`ZERO3_STEP_RESIDENT` lists those parameters; they are registered as external
parameters of the root module (the :class:`~pipeline.train.step.TrainModule`, which returns a dict of
loss tensors), so they stay gathered from the root's forward to the end of its backward. They are small
(~1.2M values for the Swin-L model). The stage-equivalence test catches a new one.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pipeline.train.config import DeepSpeedConfig, TrainConfig

log = logging.getLogger(__name__)

ZERO3_STEP_RESIDENT = (
    "level_embed",
    "label_enc.",
    "query_selection.tgt_embed.",
    "query_selection.refpoint_embed.",
    ".sampling_offsets.",
)
"""Name patterns (prefix of the detector's parameter names, or ``.x.`` anywhere) of the parameters kept
gathered for the whole step under ZeRO-3 (see the module docstring)."""

GATHER_CHUNK_NUMEL = 50_000_000
"""Parameter values gathered at once under ZeRO-3 when every parameter is read (EMA, full weights)."""

MODEL_PREFIX = "model."
"""The detector's key prefix inside the DeepSpeed module (:class:`~pipeline.train.step.TrainModule`)."""


def _deepspeed() -> ModuleType:
    """Import DeepSpeed for this machine (see the module docstring)."""
    cpu_only = not torch.cuda.is_available()
    if cpu_only:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if cpu_only:
        # Building it takes ~36 s of g++ on a cold cache, and gloo carries the traffic anyway; the
        # backend object that would build it is only created by init_distributed, after this.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed() -> DistInfo:
    """Join (or create) the process group the launcher's environment describes.

    Needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun, the deepspeed launcher, Ray Train, or
    :mod:`pipeline.launch` for a single process). NCCL and one GPU per local rank when CUDA is available,
    else gloo on the CPU. An existing group (Ray Train creates one) is reused.
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not torch.distributed.is_initialized():
        raise RuntimeError(
            f"the process-group environment is incomplete (missing {missing}); start training through "
            "`python -m pipeline pretrain ...` (single process), torchrun, the deepspeed launcher or Ray"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    deepspeed = _deepspeed()
    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False, verbose=False
    )
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


class PrecisionError(ValueError):
    """A precision this device cannot train in."""


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on a GPU that supports it, ``fp16`` on an older GPU, ``fp32`` on the CPU.

    Raises:
        PrecisionError: ``fp16`` on the CPU (DeepSpeed's CPU accelerator has no fp16).
    """
    if requested != "auto":
        if requested == "fp16" and device.type != "cuda":
            raise PrecisionError(
                "deepspeed.precision=fp16 needs a GPU (DeepSpeed has no fp16 on the CPU); use bf16 or fp32"
            )
        if requested == "bf16" and device.type != "cuda":
            log.warning("deepspeed.precision=bf16 on the CPU: slow, for checks only")
        return requested
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def effective_zero_stage(ds: DeepSpeedConfig, world_size: int, precision: str) -> int:
    """The ZeRO stage a run uses: ``ds.zero_stage``, except that stages 1 and 2 on a single rank run as 0.

    One rank has nothing to partition: stages 1 and 2 then run stage 0's update rule (summed in another
    order: a 60-step debug run's losses agree to 3e-5) with per-parameter gradient hooks, flat partition
    copies and a gradient-norm pass of their own added to every step (R50, a 64x96 image, fp32 on the
    CPU, one thread: 1.50 s per step at stage 2, 1.04 s at stage 0, 0.88 s without DeepSpeed; the debug
    stage: 3.9 -> 5.3-5.5 img/s, 1.53 -> 1.23 GiB). Stage 3 and optimizer offload move memory off the
    device, a reason to use them on one GPU too, and DeepSpeed's fp16 needs stage 1 or more: those keep
    the configured stage.
    """
    if world_size == 1 and ds.zero_stage in (1, 2) and not ds.offload_optimizer and precision != "fp16":
        return 0
    return ds.zero_stage


def deepspeed_config(ds: DeepSpeedConfig, train: TrainConfig, precision: str) -> dict[str, Any]:
    """The DeepSpeed config dict (a pure function of the stage config; ``precision`` already resolved).

    bf16 runs under ``torch_autocast`` with fp32 weights: dino_core keeps sampling locations and box
    arithmetic in fp32 under autocast, which bf16 weights would not. fp16 uses DeepSpeed's fp16 weights
    with dynamic loss scaling (autocast fp16 has no loss scaler under ZeRO). The optimizer is always a
    client ``torch.optim.AdamW`` (naming one here would compile FusedAdam).
    """
    zero: dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": ds.overlap_comm}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accumulation,
        "gradient_clipping": train.clip_max_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # The client torch AdamW steps on the CPU when the optimizer state is offloaded.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": ds.fp16_initial_scale_power,
            "loss_scale_window": ds.fp16_loss_scale_window,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    elif precision != "fp32":
        raise ValueError(f"precision must be resolved to bf16, fp16 or fp32, got {precision!r}")
    return config


def _zero3_resident(name: str) -> bool:
    return any(name.startswith(p) if not p.startswith(".") else p in name for p in ZERO3_STEP_RESIDENT)


class Engine:
    """The DeepSpeed engine around a :class:`~pipeline.train.step.TrainModule` (``module.model`` is the
    detector) with a client optimizer whose parameter groups carry their base learning rates."""

    def __init__(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any], precision: str
    ) -> None:
        deepspeed = _deepspeed()
        self.precision = precision
        self.zero_stage = int(config["zero_optimization"]["stage"])
        if self.zero_stage == 3:
            for name, parameter in module.named_parameters():
                if name.startswith(MODEL_PREFIX) and _zero3_resident(name[len(MODEL_PREFIX) :]):
                    deepspeed.zero.register_external_parameter(module, parameter)
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.group_names = [str(group.get("name", i)) for i, group in enumerate(optimizer.param_groups)]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.detector: nn.Module = self.engine.module.model

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype images are given in (fp16 weights need fp16 inputs; autocast casts by itself)."""
        return torch.float16 if self.precision == "fp16" else torch.float32

    def __call__(self, *args: Any) -> Any:
        """The module's forward through DeepSpeed (ZeRO-3 gathers, autocast)."""
        return self.engine(*args)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch (gradient reduction at the accumulation boundary)."""
        self.engine.backward(loss)

    def step(self) -> None:
        """Optimizer step at the accumulation boundary (clipping included), else just counts the batch."""
        self.engine.step()

    def discard_forward(self) -> None:
        """Forget a forward pass whose backward is skipped (a non-finite loss). Under ZeRO-3 the parameters
        it gathered are released and the fetch order starts again; the other stages keep no state."""
        if self.zero_stage != 3:
            return
        coordinator = self.engine.optimizer.parameter_offload.get_param_coordinator()
        coordinator.release_and_reset_all(self.engine.module)
        # The recorded fetch order assumes every forward is followed by its backward; without one the
        # next forward would not match it. DeepSpeed 0.19 has no public call for this: its own
        # invalidation (a trace mismatch) runs the same private method, after which it records anew.
        if not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()
        coordinator.reset_step()

    def at_boundary(self) -> bool:
        """Whether the next :meth:`step` applies the optimizer (the last micro-batch of an accumulation)."""
        return bool(self.engine.is_gradient_accumulation_boundary())

    def set_lr(self, factor: float) -> list[float]:
        """Set every group's lr to ``base * factor``; returns the lrs (in group order)."""
        lrs = [base * factor for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        return lrs

    def overflowed(self) -> bool:
        """fp16: whether the last step was skipped by the loss scaler (gradient overflow)."""
        return bool(getattr(self.optimizer, "overflow", False))

    def loss_scale(self) -> float | None:
        """fp16: the current dynamic loss scale."""
        if self.precision != "fp16":
            return None
        scale = getattr(self.optimizer, "cur_scale", None)
        return None if scale is None else float(scale)

    def gather(self, params: Sequence[nn.Parameter]) -> AbstractContextManager:
        """Under ZeRO-3 a context in which ``params`` hold their full values (read-only); else a no-op.
        Collective: every rank enters it with the same parameters."""
        if self.zero_stage != 3:
            return nullcontext()
        return _deepspeed().zero.GatheredParameters(list(params), modifier_rank=None)

    @property
    def gathers(self) -> bool:
        """Whether :meth:`full_state_dict` is collective (every rank must call it): ZeRO-3 and fp16."""
        return self.zero_stage == 3 or self.precision == "fp16"

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The detector's full fp32 state on the training device (collective under ZeRO-3 and fp16).

        fp16 weights are replaced by the optimizer's fp32 master copies; ZeRO-3 partitions are gathered.
        """
        state: dict[str, torch.Tensor] = {}
        named = list(self.detector.named_parameters())
        if self.precision == "fp16":
            from deepspeed.utils import safe_get_full_fp32_param

            for name, parameter in named:
                full = safe_get_full_fp32_param(parameter) if parameter.requires_grad else None
                if full is None:
                    with self.gather([parameter]):
                        full = parameter.detach()
                state[name] = full.detach().to(torch.float32, copy=True)
        else:
            for chunk in parameter_chunks(named):
                with self.gather([p for _, p in chunk]):
                    for name, parameter in chunk:
                        state[name] = parameter.detach().to(torch.float32, copy=True)
        for name, buffer in self.detector.named_buffers():
            state[name] = (
                buffer.detach().to(torch.float32, copy=True) if buffer.is_floating_point() else buffer
            )
        ordered = self.detector.state_dict(keep_vars=True).keys()
        return {k: state[k] for k in ordered}

    def save(self, root: Path, tag: str) -> None:
        """Write this rank's part of a checkpoint to ``root/tag`` (collective; no ``latest`` file)."""
        self.engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)

    def load(self, root: Path, tag: str) -> None:
        """Restore weights, optimizer state (and the fp16 loss scaler) from ``root/tag`` (collective).

        DeepSpeed's own files are torch pickles written by this run: resume only from a directory this
        pipeline wrote.
        """
        path, _ = self.engine.load_checkpoint(
            str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {root / tag}")


def parameter_chunks(
    named: Sequence[tuple[str, nn.Parameter]], numel: int = GATHER_CHUNK_NUMEL
) -> Iterator[list[tuple[str, nn.Parameter]]]:
    """Consecutive runs of ``named`` holding about ``numel`` values each (whole sizes under ZeRO-3): what
    is gathered at once when every parameter has to be read whole."""
    chunk: list[tuple[str, nn.Parameter]] = []
    size = 0
    for item in named:
        chunk.append(item)
        size += getattr(item[1], "ds_numel", item[1].numel())
        if size >= numel:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def export_fp32_state_dict(root: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The detector's consolidated fp32 weights from a written ZeRO checkpoint (on the CPU), or None for
    ZeRO stage 0, whose live weights are already whole fp32 (take :meth:`Engine.full_state_dict`).

    Reads every rank's files (``deepspeed.utils.zero_to_fp32``); call it on one process.
    """
    if zero_stage == 0:
        return None
    _deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    foreign = sorted(k for k in state if not k.startswith(MODEL_PREFIX))
    if foreign:
        raise RuntimeError(f"the checkpoint {root / tag} holds state outside the detector: {foreign[:5]}")
    return {k[len(MODEL_PREFIX) :]: v.to(torch.float32) for k, v in state.items()}
