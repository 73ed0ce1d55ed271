"""Our detector loaded from an official-layout checkpoint gives the official implementation's outputs.

The fixtures hold what the official DINO code (IDEA-Research/DINO, eval mode, its pure-PyTorch deformable
attention) produced from the deterministic weights and images of ``official_fixture.py``.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from official_fixture import CASES, FIXTURE_DIR, fixture_images, official_layout_weights
from scipy.optimize import linear_sum_assignment

from dino_core import build_dino, preset
from dino_core.official import load_official_state_dict


def _model(case: str) -> tuple[torch.nn.Module, dict]:
    payload = json.loads((FIXTURE_DIR / f"{case}.json").read_text())
    ours = CASES[case][0]
    # The official code ran its pure-PyTorch deformable attention: compare like with like.
    cfg = dataclasses.replace(preset(ours["preset"]), msda="reference")
    if "backbone" in ours:
        cfg = dataclasses.replace(
            cfg, backbone=dataclasses.replace(cfg.backbone, name=ours["backbone"], frozen_stages=-1)
        )
    model = build_dino(cfg)
    weights = official_layout_weights([(k, s) for k, s in payload["key_shapes"]])
    load_official_state_dict(model, weights, source=f"fixture {case}")
    return model.eval(), payload


def _match_queries(ours: torch.Tensor, official: torch.Tensor) -> torch.Tensor:
    """Our query index for each official query, matching their anchors (Q, 4) one to one.

    The decoder is equivariant to the order of its queries (the fixture gives every query slot the same
    content vector), and near-tied encoder scores may be ordered differently by fp32 rounding.
    """
    rows, cols = linear_sum_assignment(torch.cdist(official.double(), ours.double(), p=1).numpy())
    return torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]


def assert_same_detections(
    ours: list[tuple[int, float, list[float]]],
    official: list[tuple[int, float, list[float]]],
    score_tol: float,
    box_tol: float,
) -> None:
    """Equal as multisets: every official (label, score, box) has its own match in ours."""
    assert len(ours) == len(official)
    assert [s for _, s, _ in ours] == pytest.approx([s for _, s, _ in official], abs=score_tol)
    unused = list(ours)
    for label, score, box in official:
        found = next(
            (
                i
                for i, (l2, s2, b2) in enumerate(unused)
                if l2 == label
                and abs(s2 - score) <= score_tol
                and max(abs(a - b) for a, b in zip(box, b2)) <= box_tol
            ),
            None,
        )
        assert found is not None, f"official detection {label, score, box} has no match"
        unused.pop(found)


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_raw_outputs_and_detections_match_official(case: str, coco_sample) -> None:
    model, payload = _model(case)
    images, sizes, _ = fixture_images(coco_sample / "images")
    for i, record in enumerate(payload["images"]):
        h, w = sizes[i]
        assert [h, w] == record["size"]
        out = model(images[i : i + 1, :, :h, :w], torch.tensor([[h, w]]))
        anchors = torch.tensor(record["anchors"])
        order = _match_queries(out.encoder.boxes[0], anchors)
        logits, boxes = out.final.logits[0, order], out.final.boxes[0, order]
        # The fixture is rounded to 6 decimals (boxes) and 5 (logits); the rest is fp32 reordering.
        torch.testing.assert_close(out.encoder.boxes[0, order], anchors, atol=2e-5, rtol=0)
        torch.testing.assert_close(boxes, torch.tensor(record["pred_boxes"]), atol=2e-5, rtol=0)
        torch.testing.assert_close(
            logits.max(-1).values, torch.tensor(record["max_logit"]), atol=1e-4, rtol=0
        )
        assert logits.argmax(-1).tolist() == record["argmax"]
        torch.testing.assert_close(logits[::90], torch.tensor(record["logits_of_queries"]), atol=1e-4, rtol=0)
        detections = model.postprocess(out, torch.tensor([record["orig_size"]]))[0]
        expected = record["detections"]
        k = len(expected["scores"])
        mine = list(
            zip(
                detections["labels"][:k].tolist(),
                detections["scores"][:k].tolist(),
                detections["boxes"][:k].tolist(),
            )
        )
        assert_same_detections(
            mine, list(zip(expected["labels"], expected["scores"], expected["boxes"])), 1e-5, 5e-3
        )


def test_checkpoint_of_another_preset_is_refused() -> None:
    payload = json.loads((FIXTURE_DIR / "r50_4scale.json").read_text())
    weights = official_layout_weights([(k, s) for k, s in payload["key_shapes"]])
    with torch.device("meta"):
        five_scale = build_dino(preset("dino_r50_5scale"))
    with pytest.raises(
        ValueError, match=r"does not fit this model preset.*missing keys.*neck\.projections\.4"
    ):
        load_official_state_dict(five_scale, weights, source="checkpoint0011_4scale.pth")
    with torch.device("meta"):
        fewer_classes = build_dino(dataclasses.replace(preset("dino_r50_4scale"), num_classes=80))
    with pytest.raises(ValueError, match=r"shape mismatches.*class_head\.weight"):
        load_official_state_dict(fewer_classes, weights, source="checkpoint0011_4scale.pth")
