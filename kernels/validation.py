"""Input checks of the public multi-scale deformable attention functions, run once before dispatch.

Shapes as in :mod:`kernels.reference`. Only metadata is read, except that a level table living on the CPU
(``spatial_shapes`` / ``level_start_index``) is also checked against ``value`` (free there). A table on a
GPU is not read back, which would cost a device synchronisation per call; the CUDA kernel skips a level
that does not fit in ``value`` instead of reading out of bounds.
"""

from __future__ import annotations

import torch

VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def location_dtype(value_dtype: torch.dtype) -> torch.dtype:
    """Sampling locations are fp32, or fp64 with fp64 values."""
    return torch.float64 if value_dtype == torch.float64 else torch.float32


def check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention: torch.Tensor,
    *,
    attention_name: str,
) -> None:
    """Raises ValueError (shapes, devices, level table) or TypeError (dtypes) with the offending values.

    value (N, S, M, D); spatial_shapes (L, 2) int64; level_start_index (L,) int64;
    sampling_locations (N, Lq, M, L, P, 2); attention (N, Lq, M, L, P), named ``attention_name`` in messages.
    """
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, M, D), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be (N, Lq, M, L, P, 2), got shape {tuple(sampling_locations.shape)}"
        )
    n, s, m, _ = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    if spatial_shapes.shape != (levels, 2):
        raise ValueError(
            f"spatial_shapes must be (L, 2) = ({levels}, 2), got shape {tuple(spatial_shapes.shape)}"
        )
    if level_start_index.shape != (levels,):
        raise ValueError(
            f"level_start_index must be (L,) = ({levels},), got shape {tuple(level_start_index.shape)}"
        )
    if sampling_locations.shape[0] != n or sampling_locations.shape[2] != m:
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} does not match value "
            f"{tuple(value.shape)} in N or M"
        )
    if attention.shape != (n, lq, m, levels, points):
        raise ValueError(
            f"{attention_name} must be (N, Lq, M, L, P) = {(n, lq, m, levels, points)}, "
            f"got {tuple(attention.shape)}"
        )
    if value.dtype not in VALUE_DTYPES:
        raise TypeError(f"value must be float32, float16, bfloat16 or float64, got {value.dtype}")
    if sampling_locations.dtype != location_dtype(value.dtype):
        raise TypeError(
            f"sampling_locations must be {location_dtype(value.dtype)} for {value.dtype} values, "
            f"got {sampling_locations.dtype}"
        )
    if attention.dtype != value.dtype:
        raise TypeError(
            f"{attention_name} must have value's dtype {value.dtype}, got {attention.dtype} "
            "(under autocast, softmax returns float32: cast it, or pass logits to ms_deform_attn_from_logits)"
        )
    if spatial_shapes.dtype != torch.int64 or level_start_index.dtype != torch.int64:
        raise TypeError(
            f"spatial_shapes and level_start_index must be int64, got {spatial_shapes.dtype} and "
            f"{level_start_index.dtype}"
        )
    for name, tensor in (
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
        ("sampling_locations", sampling_locations),
        (attention_name, attention),
    ):
        if tensor.device != value.device:
            raise ValueError(
                f"{name} is on {tensor.device} but value is on {value.device}: move it to value's device"
            )
    if spatial_shapes.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_level_table(spatial_shapes, level_start_index, s)


def _check_level_table(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, s: int) -> None:
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"spatial_shapes has an empty level: {shapes}")
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    if level_start_index.tolist() != starts:
        raise ValueError(
            f"level_start_index {level_start_index.tolist()} is not the start of each level: {starts}"
        )
    total = sum(h * w for h, w in shapes)
    if total != s:
        raise ValueError(f"value has S = {s} positions but spatial_shapes {shapes} sums to {total}")
