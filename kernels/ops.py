"""The ``dino_kernels`` operators: loading the built libraries and their Python-side registrations.

The C++ libraries (``kernels/csrc``, compiled by :mod:`kernels.toolchain`) define the schemas and the CPU and
CUDA implementations of

- ``dino_kernels::ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
  attention_weights) -> (N, Lq, M * D)``
- ``dino_kernels::ms_deform_attn_from_logits(..., attention_logits)``: the same with the softmax over the
  L * P points of each head applied inside the kernel.
- ``dino_kernels::ms_deform_attn_backward(grad_output, value, spatial_shapes, level_start_index,
  sampling_locations, attention, attention_is_logits) -> (grad_value, grad_sampling_locations,
  grad_attention)``

Once the CPU library (which holds the schemas) is loaded, this module registers the fake kernels
(``torch.library.register_fake``: shapes and dtypes for FakeTensor, ``torch.compile`` and AOT autograd) and
the autograd formulas (``torch.library.register_autograd``) of the two forward ops. Nothing is loaded or
built at import.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kernels import toolchain

_loaded: set[str] = set()


def is_loaded(device_type: str) -> bool:
    """Whether the operators have an implementation for ``device_type`` in this process."""
    return device_type in _loaded


def load(device_type: str, *, build_if_missing: bool) -> None:
    """Loads the library for ``device_type`` ("cpu" or "cuda"), and the CPU library with the schemas first.

    Raises :class:`kernels.toolchain.KernelBuildError` when a library is not built and cannot (or, with
    ``build_if_missing=False``, may not) be built.
    """
    if device_type not in ("cpu", "cuda"):
        raise toolchain.KernelBuildError(
            f"there is no fused multi-scale deformable attention kernel for {device_type!r}"
        )
    if "cpu" not in _loaded:
        _load_library(toolchain.library("cpu", build=build_if_missing))
        _register_python_parts()
        _loaded.add("cpu")
    if device_type == "cuda" and "cuda" not in _loaded:
        _load_library(toolchain.library("cuda", build=build_if_missing))
        _loaded.add("cuda")


def _load_library(path: Path) -> None:
    try:
        torch.ops.load_library(str(path))
    except OSError as err:  # e.g. a CUDA runtime library missing on this machine
        raise toolchain.KernelBuildError(
            f"loading {path} failed: {err} (delete {path.parent} to rebuild it here)"
        ) from err


def _fake_forward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention: torch.Tensor,
) -> torch.Tensor:
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


def _fake_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention: torch.Tensor,
    attention_is_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        value.new_empty(value.shape),
        sampling_locations.new_empty(sampling_locations.shape),
        attention.new_empty(attention.shape),
    )


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _gradients(ctx, grad_output: torch.Tensor, attention_is_logits: bool) -> tuple:
    value, spatial_shapes, level_start_index, sampling_locations, attention = ctx.saved_tensors
    grad_value, grad_locations, grad_attention = torch.ops.dino_kernels.ms_deform_attn_backward(
        grad_output,
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention,
        attention_is_logits,
    )
    needed = ctx.needs_input_grad
    return (
        grad_value if needed[0] else None,
        None,
        None,
        grad_locations if needed[3] else None,
        grad_attention if needed[4] else None,
    )


def _backward_weights(ctx, grad_output: torch.Tensor) -> tuple:
    return _gradients(ctx, grad_output, attention_is_logits=False)


def _backward_logits(ctx, grad_output: torch.Tensor) -> tuple:
    return _gradients(ctx, grad_output, attention_is_logits=True)


def _register_python_parts() -> None:
    torch.library.register_fake("dino_kernels::ms_deform_attn", _fake_forward)
    torch.library.register_fake("dino_kernels::ms_deform_attn_from_logits", _fake_forward)
    torch.library.register_fake("dino_kernels::ms_deform_attn_backward", _fake_backward)
    torch.library.register_autograd(
        "dino_kernels::ms_deform_attn", _backward_weights, setup_context=_setup_context
    )
    torch.library.register_autograd(
        "dino_kernels::ms_deform_attn_from_logits", _backward_logits, setup_context=_setup_context
    )
