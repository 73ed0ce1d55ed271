"""The debug DINO model trains the same with the fused deformable-attention op as with the reference."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dino_core import build_criterion, build_dino, preset
from kernels import ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _loss_and_grads(implementation: str, device: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cfg = replace(preset("debug"), msda=implementation)
    torch.manual_seed(0)  # same initial weights for both implementations
    model = build_dino(cfg).to(device).train()
    criterion = build_criterion(cfg)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 96, 128, generator=g).to(device)
    image_sizes = torch.tensor([[96, 128], [80, 112]], device=device)
    targets = [
        {
            "labels": torch.tensor([1, 7], device=device),
            "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.4, 0.5]], device=device),
        },
        {
            "labels": torch.tensor([3], device=device),
            "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.4]], device=device),
        },
    ]
    torch.manual_seed(2)  # same denoising noise
    loss = criterion(model(images, image_sizes, targets), targets)["loss"]
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
def test_debug_model_loss_and_gradients_agree(device: str) -> None:
    ops.load(device, build_if_missing=True)
    loss_fused, grads_fused = _loss_and_grads("fused", device)
    loss_ref, grads_ref = _loss_and_grads("reference", device)
    torch.testing.assert_close(loss_fused, loss_ref, rtol=1e-5, atol=0.0)
    assert grads_fused.keys() == grads_ref.keys()
    # Attention feeds every parameter that has a gradient; fp32 differences of 1e-7 per op compound
    # through the layers, so each parameter's gradient is compared as a whole.
    deformable = [name for name in grads_ref if "sampling_offsets" in name or "attention_weights" in name]
    assert deformable, "the debug model has no deformable attention parameters with gradients"
    for name, ref in grads_ref.items():
        error = (grads_fused[name] - ref).norm()
        assert error <= 1e-4 * ref.norm() + 1e-7, (
            f"{name}: |fused - reference| = {error:.3g}, |ref| = {ref.norm():.3g}"
        )
