"""The stacked set criterion against a per-set, per-image reference, with empty and one-box images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_inputs import random_targets
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from dino_core import build_criterion, build_dino, preset
from dino_core.box_ops import cxcywh_to_xyxy
from dino_core.criterion import SetCriterion
from dino_core.detector import DetectorOutput, Prediction


def _one_set(
    criterion: SetCriterion,
    prediction: Prediction,
    targets: list[dict[str, torch.Tensor]],
    matches: list[tuple[torch.Tensor, torch.Tensor]],
    normaliser: float | torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The textbook loss of one prediction set, image by image."""
    logits, boxes = prediction.logits.float(), prediction.boxes.float()
    onehot = torch.zeros_like(logits)
    bbox = giou = logits.new_zeros(())
    for b, ((query, target), t) in enumerate(zip(matches, targets)):
        for q, j in zip(query.tolist(), target.tolist()):
            onehot[b, q, t["labels"][j]] = 1.0
            bbox = bbox + F.l1_loss(boxes[b, q], t["boxes"][j], reduction="sum")
            giou = giou + generalized_box_iou_loss(
                cxcywh_to_xyxy(boxes[b, q]), cxcywh_to_xyxy(t["boxes"][j]), reduction="sum"
            )
    focal = sigmoid_focal_loss(
        logits, onehot, alpha=criterion.focal_alpha, gamma=criterion.focal_gamma, reduction="sum"
    )
    losses = {"class": focal, "bbox": bbox, "giou": giou}
    return {name: value / normaliser * criterion.weights[name] for name, value in losses.items()}


def _reference(
    criterion: SetCriterion, outputs: DetectorOutput, targets: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    counts = [len(t["labels"]) for t in targets]
    num_boxes = float(max(sum(counts), 1))
    sets = [("", outputs.final)] + [(f"_{i}", p) for i, p in enumerate(outputs.aux)]
    sets += [("_enc", outputs.encoder)] if outputs.encoder is not None else []
    terms = {}
    for suffix, prediction in sets:
        matches = criterion.matcher(prediction.logits, prediction.boxes, targets)
        for name, value in _one_set(criterion, prediction, targets, matches, num_boxes).items():
            terms[f"loss_{name}{suffix}"] = value
    dn = outputs.denoising
    if dn is not None:
        pairs = [tuple(map(torch.as_tensor, dn.queries.positive_pairs(n))) for n in counts]
        for suffix, prediction in [("_dn", dn.final)] + [(f"_dn_{i}", p) for i, p in enumerate(dn.aux)]:
            normaliser = num_boxes * dn.queries.num_groups
            for name, value in _one_set(criterion, prediction, targets, pairs, normaliser).items():
                terms[f"loss_{name}{suffix}"] = value
    terms["loss"] = sum(terms.values())
    return terms


@pytest.mark.parametrize("counts", [[3, 0, 1], [1], [0, 0]], ids=["mixed", "one-box", "no-boxes"])
def test_criterion_equals_the_per_set_reference(counts: list[int]) -> None:
    torch.manual_seed(0)
    cfg = preset("debug")
    model, criterion = build_dino(cfg).train(), build_criterion(cfg)
    targets = random_targets(counts)
    outputs = model(torch.randn(len(counts), 3, 64, 80), torch.tensor([[64, 80]] * len(counts)), targets)
    assert (outputs.denoising is not None) == (sum(counts) > 0)
    got, want = criterion(outputs, targets), _reference(criterion, outputs, targets)
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    if sum(counts) == 0:
        assert all(got[n].item() == 0.0 for n in got if "bbox" in n or "giou" in n)
    params = [p for p in model.parameters() if p.requires_grad]
    # With no boxes the reference leaves the box head out of the graph, the criterion gives it zeros.
    got_grads = torch.autograd.grad(got["loss"], params, retain_graph=True, materialize_grads=True)
    want_grads = torch.autograd.grad(want["loss"], params, materialize_grads=True)
    # The summation order differs: compare at the scale of the model's largest gradient.
    scale = max(b.abs().max().item() for b in want_grads)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
