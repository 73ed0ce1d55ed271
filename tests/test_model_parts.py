"""Box ops, matcher, denoising queries and ATD: exact values and edge cases."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from model_inputs import random_targets
from torchvision.ops import generalized_box_iou

from dino_core.atd import anchor_distances, average_top_k_distance
from dino_core.box_ops import cxcywh_to_xyxy, inverse_sigmoid, xyxy_to_cxcywh
from dino_core.builder import build_dino
from dino_core.config import config_differences, config_from_dict, config_to_dict
from dino_core.denoising import build_denoising_queries, denoising_attn_mask
from dino_core.detector import DetectorOutput, Prediction
from dino_core.matcher import HungarianMatcher
from dino_core.position_encoding import box_sine_encoding
from dino_core.presets import preset


def test_box_round_trips_and_inverse_sigmoid() -> None:
    boxes = torch.rand(50, 4) * 0.5 + 0.1
    torch.testing.assert_close(xyxy_to_cxcywh(cxcywh_to_xyxy(boxes)), boxes)
    assert cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])).tolist() == pytest.approx([0.4, 0.3, 0.6, 0.7])
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(inverse_sigmoid(x.sigmoid()), x, atol=1e-4, rtol=0)
    # Clamped at eps: 0 and 1 map to the finite logit of 1e-3.
    edge = inverse_sigmoid(torch.tensor([0.0, 1.0]))
    assert edge.tolist() == pytest.approx([-6.9068, 6.9068], abs=1e-3)


def test_giou_hand_computed() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [3.0, 0.0, 4.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    # overlap: inter 1, union 7, hull 9 -> 1/7 - 2/9; disjoint: inter 0, union 5, hull 8 -> -3/8; same: 1
    expected = torch.tensor([[1 / 7 - 2 / 9, -3 / 8, 1.0]])
    torch.testing.assert_close(generalized_box_iou(a, b), expected)


def test_matcher_batched_equals_per_image_and_handles_empty() -> None:
    torch.manual_seed(0)
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    logits, boxes = torch.randn(3, 12, 7), torch.rand(3, 12, 4) * 0.5 + 0.1
    targets = random_targets([4, 0, 1])
    batched = matcher(logits, boxes, targets)
    for i, t in enumerate(targets):
        alone = matcher(logits[i : i + 1], boxes[i : i + 1], [t])[0]
        assert torch.equal(batched[i][0], alone[0]) and torch.equal(batched[i][1], alone[1])
    assert batched[1][0].numel() == 0 and batched[1][1].numel() == 0
    assert len(batched[0][0]) == 4 and sorted(batched[0][1].tolist()) == [0, 1, 2, 3]
    assert matcher(logits, boxes, random_targets([0, 0, 0]))[2][0].numel() == 0


def test_matcher_picks_the_obvious_assignment() -> None:
    gt = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.8, 0.7, 0.2, 0.3]])
    boxes = torch.tensor(
        [[[0.5, 0.5, 0.3, 0.3], [0.8, 0.7, 0.2, 0.3], [0.9, 0.1, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]]]
    )
    logits = torch.full((1, 4, 3), -5.0)
    logits[0, 3, 1] = logits[0, 1, 2] = 5.0
    queries, targets = HungarianMatcher(2.0, 5.0, 2.0)(
        logits, boxes, [{"labels": torch.tensor([1, 2]), "boxes": gt}]
    )[0]
    assert dict(zip(targets.tolist(), queries.tolist())) == {0: 3, 1: 1}


def test_matcher_survives_non_finite_predictions() -> None:
    logits = torch.full((1, 5, 7), float("nan"))
    matches = HungarianMatcher(2.0, 5.0, 2.0)(logits, torch.rand(1, 5, 4), random_targets([2]))
    assert len(matches[0][0]) == 2


@pytest.mark.parametrize("contrastive", [True, False])
def test_denoising_queries_structure_and_noise_bounds(contrastive: bool) -> None:
    torch.manual_seed(0)
    targets = random_targets([3, 1, 0])
    embedding = torch.nn.Embedding(8, 16)
    dn = build_denoising_queries(
        targets,
        contrastive=contrastive,
        num_queries=10,
        box_noise=0.4,
        label_noise=0.0,
        num_classes=7,
        label_embedding=embedding,
        num_matching=5,
    )
    assert dn is not None
    assert dn.max_boxes == 3 and dn.num_groups == 3  # 10 // 3
    assert dn.group_size == (6 if contrastive else 3) and dn.num_queries == 3 * dn.group_size
    assert dn.content.shape == (3, dn.num_queries, 16) and dn.anchors.shape == (3, dn.num_queries, 4)
    assert torch.all(dn.content[2] == 0)  # an image without boxes only has padding slots
    for image, target in enumerate(targets):
        n = len(target["labels"])
        half = target["boxes"][:, 2:].repeat(1, 2) / 2
        gt = cxcywh_to_xyxy(target["boxes"])
        for group in range(dn.num_groups):
            start = group * dn.group_size
            positives = cxcywh_to_xyxy(dn.anchors[image, start : start + n].sigmoid())
            moved = (positives - gt).abs() / half
            clipped = (positives <= 1e-3) | (positives >= 1 - 1e-3)
            assert torch.all((moved < 0.4 + 1e-4) | clipped), "positives move by less than lambda_1"
            # label noise 0: the content is the label's embedding
            torch.testing.assert_close(dn.content[image, start : start + n], embedding(target["labels"]))
            if contrastive:
                negatives = cxcywh_to_xyxy(dn.anchors[image, start + 3 : start + 3 + n].sigmoid())
                moved = (negatives - gt).abs() / half
                clipped = (negatives <= 1e-3) | (negatives >= 1 - 1e-3)
                assert torch.all(((moved >= 0.4 - 1e-4) & (moved < 0.8 + 1e-4)) | clipped)
            # padding slots of smaller images stay empty
            assert torch.all(dn.content[image, start + n : start + 3] == 0)


def test_denoising_label_noise_and_no_boxes() -> None:
    torch.manual_seed(0)
    targets = [{"labels": torch.zeros(1000, dtype=torch.long), "boxes": torch.full((1000, 4), 0.5)}]
    embedding = torch.nn.Embedding(101, 4)
    dn = build_denoising_queries(
        targets,
        contrastive=False,
        num_queries=1000,
        box_noise=0.4,
        label_noise=0.5,
        num_classes=100,
        label_embedding=embedding,
        num_matching=10,
    )
    changed = (dn.content[0] != embedding.weight[0]).any(-1).float().mean().item()
    assert 0.2 < changed < 0.3  # half of the 0.5 label noise, minus flips back to class 0
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    assert (
        build_denoising_queries(
            empty,
            contrastive=True,
            num_queries=100,
            box_noise=0.4,
            label_noise=0.5,
            num_classes=3,
            label_embedding=embedding,
            num_matching=10,
        )
        is None
    )


def test_denoising_attention_mask_semantics() -> None:
    mask = denoising_attn_mask(num_denoising=6, group_size=2, num_matching=3, device=torch.device("cpu"))
    assert mask.shape == (9, 9)
    assert mask[6:, :6].all(), "matching queries never see denoising queries"
    assert not mask[6:, 6:].any(), "matching queries see each other"
    assert not mask[:6, 6:].any(), "denoising queries see the matching part"
    group = torch.arange(6) // 2
    assert torch.equal(mask[:6, :6], group[:, None] != group[None, :]), "groups are isolated"


def test_atd_hand_computed() -> None:
    anchors = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    logits = torch.tensor([[[5.0, -5.0], [-5.0, 5.0]]])
    boxes = anchors.clone()
    outputs = DetectorOutput(
        final=Prediction(logits, boxes), aux=[], encoder=None, anchors=anchors, denoising=None
    )
    targets = [
        {"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.2, 0.1, 0.1, 0.1], [0.5, 0.6, 0.2, 0.4]])}
    ]
    distances = anchor_distances(outputs, targets, HungarianMatcher(2.0, 5.0, 2.0))[0]
    # query 0 <- box 1 (0 + 0.1 + 0 + 0.2), query 1 <- box 0 (0.1 + 0 + 0 + 0), in query order
    torch.testing.assert_close(distances, torch.tensor([0.3, 0.1]))
    assert average_top_k_distance(torch.tensor([0.1, 0.3, 0.2]), k=2) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="needs at least 5"):
        average_top_k_distance(torch.tensor([0.1]), k=5)


def test_config_round_trip_and_differences_by_dotted_path() -> None:
    base = preset("dino_r50_4scale")
    assert config_from_dict(config_to_dict(base)) == base
    assert config_differences(base, base, "checkpoint") == []
    other = dataclasses.replace(
        base, num_queries=300, denoising=dataclasses.replace(base.denoising, num_queries=50)
    )
    assert config_differences(other, base, "init") == [
        "model.denoising.num_queries: init 50, config 100",
        "model.num_queries: init 300, config 900",
    ]
    with pytest.raises(ValueError, match=r"model.backbone: unknown keys \['depth'\]"):
        config_from_dict({**config_to_dict(base), "backbone": {"name": "resnet50", "depth": 50}})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_heads": 0}, "model.n_heads must be >= 1"),
        ({"n_heads": -2}, "model.n_heads must be >= 1"),
        ({"backbone": {"name": "resnetv2_50"}}, r"'resnetv2_50' has no stages named \['layer1'"),
    ],
)
def test_invalid_model_configs_fail_naming_the_key(change: dict, message: str) -> None:
    """Refused before or while building, not deep inside (resnetv2's stages would all be frozen)."""
    with pytest.raises(ValueError, match=message):
        build_dino(config_from_dict({**config_to_dict(preset("debug")), **change}))


@pytest.mark.parametrize("coords", [4, 2])
def test_box_sine_encoding_hand_computed(coords: int) -> None:
    boxes = torch.rand(2, 5, coords)
    encoding = box_sine_encoding(boxes, 8, temperature=10000.0)
    assert encoding.shape == (2, 5, 8 * coords)
    freqs = 10000.0 ** (2 * (torch.arange(8) // 2) / 8)
    for slot, coordinate in enumerate([1, 0, 2, 3][:coords]):  # the official order: y, x, w, h
        angles = boxes[..., coordinate, None] * 2 * math.pi / freqs
        expected = torch.where(torch.arange(8) % 2 == 0, angles.sin(), angles.cos())
        torch.testing.assert_close(encoding[..., slot * 8 : (slot + 1) * 8], expected)
