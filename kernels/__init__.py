"""Multi-scale deformable attention (MSDA): the one public entry point of the kernels package.

Functions (shapes as in :mod:`kernels.reference`):

- :func:`ms_deform_attn` (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
- :func:`ms_deform_attn_from_logits`: the same with attention logits, softmaxed over the L * P points of each
  head (inside the fused kernel, so the weights tensor is never stored).
- :func:`ms_deform_attn_reference`, :func:`ms_deform_attn_from_logits_reference`: the pure-PyTorch
  specification.

Dtype policy: value is float32, float16, bfloat16 or float64; attention weights (or logits) have value's
dtype; sampling locations are float32 (float64 with float64 values); spatial_shapes and level_start_index are
int64; all on value's device. Sampling and sums accumulate in float32 (float64 for float64 values) and the
output is returned in value's dtype. Gradients come back in the dtype of their input (fp16 / bf16 value
gradients are summed in float32 and rounded once).

Implementation choice (``implementation=``):

- ``"auto"`` (default): the fused op (``torch.ops.dino_kernels``, C++ on CPU, CUDA on GPU) when it is
  built for the tensors' device or can be built now (once, cached; see :mod:`kernels.toolchain`), else the
  reference with one warning per device type. Other device types use the reference.
- ``"reference"``: always the reference.
- ``"fused"``: always the fused op; raises :class:`kernels.toolchain.KernelBuildError` when it cannot be had.

``DINO_KERNELS_BUILD=0`` forbids compiling on first use: only an ahead-of-time build
(``python -m kernels.build``) is loaded, otherwise "auto" falls back to the reference.

Importing this package never compiles anything and never touches a GPU. Under ``torch.compile`` "auto"
uses the fused op only if it was loaded before compiling (call once eagerly, or ``kernels.ops.load``).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from kernels import ops, toolchain
from kernels.reference import ms_deform_attn_from_logits_reference, ms_deform_attn_reference
from kernels.toolchain import KernelBuildError
from kernels.validation import check_inputs

__all__ = [
    "KernelBuildError",
    "fused_available",
    "ms_deform_attn",
    "ms_deform_attn_from_logits",
    "ms_deform_attn_from_logits_reference",
    "ms_deform_attn_reference",
]

Implementation = Literal["auto", "reference", "fused"]

# Device types whose fused op could not be had in this process (one warning each, no retries).
_unavailable: dict[str, str] = {}


def fused_available(device: torch.device | str) -> bool:
    """Whether "auto" uses the fused op for tensors on ``device``; loads (and, if allowed, builds) it now."""
    device_type = torch.device(device).type
    if ops.is_loaded(device_type):
        return True
    if torch.compiler.is_compiling() or device_type in _unavailable or device_type not in ("cpu", "cuda"):
        return False
    try:
        ops.load(device_type, build_if_missing=toolchain.build_enabled())
    except KernelBuildError as err:
        _unavailable[device_type] = str(err)
        warnings.warn(
            f"kernels.ms_deform_attn: using the PyTorch reference for {device_type} tensors: {err}",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _use_fused(device: torch.device, implementation: Implementation) -> bool:
    if implementation == "auto":
        return fused_available(device)
    if implementation == "reference":
        return False
    if implementation == "fused":
        ops.load(device.type, build_if_missing=toolchain.build_enabled())
        return True
    raise ValueError(f"implementation must be 'auto', 'reference' or 'fused', got {implementation!r}")


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    implementation: Implementation = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention; semantics of :func:`kernels.reference.ms_deform_attn_reference`.

    Args:
        value: (N, S, M, D), S = sum of H * W over levels.
        spatial_shapes: (L, 2) int64, (H, W) per level.
        level_start_index: (L,) int64, start of each level in S.
        sampling_locations: (N, Lq, M, L, P, 2), (x, y) in [0, 1] (outside reads zeros).
        attention_weights: (N, Lq, M, L, P), normalised over L * P.
        implementation: "auto", "reference" or "fused" (see the module docstring).

    Returns:
        (N, Lq, M * D) in value's dtype.
    """
    check_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        attention_name="attention_weights",
    )  # fmt: skip
    if _use_fused(value.device, implementation):
        return torch.ops.dino_kernels.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return ms_deform_attn_reference(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def ms_deform_attn_from_logits(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_logits: torch.Tensor,
    *,
    implementation: Implementation = "auto",
) -> torch.Tensor:
    """:func:`ms_deform_attn` with the weights' logits: softmax over each head's L * P points, then attention.

    Args:
        attention_logits: (N, Lq, M, L * P) or (N, Lq, M, L, P), value's dtype.
        The others as in :func:`ms_deform_attn`.

    Returns:
        (N, Lq, M * D) in value's dtype.
    """
    if sampling_locations.dim() == 6 and attention_logits.dim() == 4:
        levels, points = sampling_locations.shape[3:5]
        if attention_logits.shape[-1] != levels * points:
            raise ValueError(
                f"attention_logits (N, Lq, M, L * P) needs a last dimension of {levels} * {points}, "
                f"got shape {tuple(attention_logits.shape)}"
            )
        attention_logits = attention_logits.unflatten(-1, (levels, points))
    check_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_logits,
        attention_name="attention_logits",
    )  # fmt: skip
    if _use_fused(value.device, implementation):
        return torch.ops.dino_kernels.ms_deform_attn_from_logits(
            value, spatial_shapes, level_start_index, sampling_locations, attention_logits
        )
    return ms_deform_attn_from_logits_reference(
        value, spatial_shapes, level_start_index, sampling_locations, attention_logits
    )
