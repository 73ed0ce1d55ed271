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


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_raw_outputs_and_detections_match_official(case: str, coco_sample) -> None:
    model, payload = _model(case)
    images, sizes, _ = fixture_images(coco_sample / "images")
    for i, record in enumerate(payload["images"]):
        h, w = sizes[i]
        assert [h, w] == record["size"]
        out = model(images[i : i + 1, :, :h, :w], torch.tensor([[h, w]]))
        logits, boxes = out.final.logits[0], out.final.boxes[0]
        # The fixture is rounded to 6 decimals (boxes) and 5 (logits); the rest is fp32 reordering.
        torch.testing.assert_close(boxes, torch.tensor(record["pred_boxes"]), atol=2e-5, rtol=0)
        torch.testing.assert_close(
            logits.max(-1).values, torch.tensor(record["max_logit"]), atol=1e-4, rtol=0
        )
        assert logits.argmax(-1).tolist() == record["argmax"]
        torch.testing.assert_close(
            logits[:5], torch.tensor(record["logits_first_queries"]), atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            out.encoder.boxes[0, :20], torch.tensor(record["interm_boxes_first"]), atol=2e-5, rtol=0
        )
        detections = model.postprocess(out, torch.tensor([record["orig_size"]]))[0]
        expected = record["detections"]
        k = len(expected["scores"])
        torch.testing.assert_close(
            detections["scores"][:k], torch.tensor(expected["scores"]), atol=1e-5, rtol=0
        )
        assert detections["labels"][:k].tolist() == expected["labels"]
        torch.testing.assert_close(
            detections["boxes"][:k], torch.tensor(expected["boxes"]), atol=5e-3, rtol=0
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
