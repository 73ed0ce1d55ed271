"""``python -m pipeline predict`` and ``model-info`` through the real CLI."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from official_fixture import FIXTURE_DIR, IMAGES, MAX_SIZE, SHORT_SIDE, official_layout_weights
from PIL import Image
from test_model_official import assert_same_detections

from dino_core.builder import build_dino
from dino_core.config import config_to_dict
from dino_core.presets import preset
from pipeline.checkpoint import ModelCard, save_model
from pipeline.cli import main as cli_main
from pipeline.coco_categories import COCO_CATEGORIES
from pipeline.data.transforms import eval_transform
from pipeline.predict import PredictConfig, predict


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd)


def _cli_here(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess:
    """The same command through the CLI's entry point in this process (no interpreter start-up)."""
    capsys.readouterr()
    code = cli_main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["pipeline", *args], code, out, err)


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory, coco_sample) -> tuple[Path, Path, dict]:
    """An official-layout ``.pth`` (with the release's argparse namespace) and a folder of two images."""
    root = tmp_path_factory.mktemp("official")
    payload = json.loads((FIXTURE_DIR / "r50_4scale.json").read_text())
    checkpoint = root / "checkpoint0011_4scale.pth"
    weights = official_layout_weights([(k, s) for k, s in payload["key_shapes"]])
    torch.save({"model": weights, "args": argparse.Namespace(lr=1e-4), "epoch": 11}, checkpoint)
    images = root / "images"
    images.mkdir()
    for name in IMAGES:
        shutil.copy(coco_sample / "images" / name, images / name)
    return checkpoint, images, payload["predict"]


def test_predict_on_an_official_checkpoint_matches_the_official_code(official_checkpoint, tmp_path) -> None:
    checkpoint, images, expected = official_checkpoint
    output = tmp_path / "detections.json"
    result = _cli(
        "predict",
        "model=dino_r50_4scale",
        # The official code's pure-PyTorch deformable attention; the fused op's agreement with it is
        # tested with the kernels.
        "model.msda=reference",
        f"checkpoint={checkpoint}",
        f"images={images}",
        f"output={output}",
        f"short_side={SHORT_SIDE}",
        f"max_size={MAX_SIZE}",
        "draw=true",
        "device=cpu",
    )
    assert result.returncode == 0, result.stderr
    ours = json.loads(output.read_text())
    # The official code's top 300 per image, less the labels that are no COCO category (0 and the gaps).
    table = {int(c["id"]) for c in COCO_CATEGORIES}
    records = [r for r in expected["records"] if r["category_id"] in table]
    dropped = len(expected["records"]) - len(records)
    assert len(expected["records"]) == 300 * len(IMAGES)
    assert len(ours) == len(records) and f"({dropped} dropped: a label outside" in result.stderr
    for name in IMAGES:
        mine = [(r["category_id"], r["score"], r["bbox"]) for r in ours if r["file_name"] == name]
        official = [(r["category_id"], r["score"], r["bbox"]) for r in records if r["file_name"] == name]
        assert_same_detections(mine, official, score_tol=2e-5, box_tol=0.02)
    assert sorted(p.name for p in (tmp_path / "detections_drawn").iterdir()) == [f"{n}.png" for n in IMAGES]
    # Our eval transform gives the official transform's sizes; pixels differ by at most one level
    # (torchvision's antialiased resize vs PIL's).
    for check in expected["transform_check"]:
        with Image.open(images / check["file_name"]) as image:
            width, height = image.size
        assert (
            list(eval_transform(SHORT_SIDE, MAX_SIZE).output_size(height, width))
            == check["official_transform_size"]
        )
        assert check["max_abs_pixel_difference"] <= 1.1


def test_predict_keeps_the_class_table_decodes_by_content_and_draws_each_file(
    tmp_path: Path, coco_sample: Path
) -> None:
    """Labels outside the class table (here 0: three logits, ids 1 and 2) are dropped and counted; a PNG
    named .jpg decodes; a.jpg and a.png get a drawing each."""
    torch.manual_seed(0)
    cfg = replace(preset("debug"), num_classes=3)
    classes = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    card = ModelCard(model=config_to_dict(cfg), classes=classes)
    save_model(tmp_path / "model", build_dino(cfg).state_dict(), card)
    images = tmp_path / "images"
    images.mkdir()
    with Image.open(coco_sample / "images" / IMAGES[0]) as image:
        image.save(images / "a.png")
        image.save(images / "b.jpg", format="PNG")
    shutil.copy(coco_sample / "images" / IMAGES[0], images / "a.jpg")
    predict_cfg = PredictConfig(
        checkpoint=str(tmp_path / "model"),
        images=str(images),
        output=str(tmp_path / "out.json"),
        draw=True,
        short_side=160,
        max_size=256,
        device="cpu",
    )
    records, dropped = predict(predict_cfg)
    assert {r["category_id"] for r in records} == {1, 2} and dropped > 0
    assert len(records) + dropped == 3 * cfg.num_select
    assert sorted(p.name for p in (tmp_path / "out_drawn").iterdir()) == [
        "a.jpg.png",
        "a.png.png",
        "b.jpg.png",
    ]


def test_predict_refuses_bad_input_before_loading_a_model(official_checkpoint, tmp_path, capsys) -> None:
    checkpoint, images, _ = official_checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(images, broken)
    (broken / "truncated.jpg").write_bytes((images / IMAGES[0]).read_bytes()[:200])
    (broken / "cut.jpg").write_bytes((images / IMAGES[0]).read_bytes()[:3000])  # PIL's verify() passes it
    result = _cli_here(
        capsys,
        "predict",
        "model=dino_r50_4scale",
        f"checkpoint={checkpoint}",
        f"images={broken}",
        f"output={tmp_path}/o.json",
    )
    assert (
        result.returncode != 0
        and "unreadable images" in result.stderr
        and "truncated.jpg" in result.stderr
        and "cut.jpg" in result.stderr
    )
    result = _cli_here(
        capsys, "predict", f"checkpoint={checkpoint}", f"images={images}", f"output={tmp_path}/o.json"
    )
    assert result.returncode != 0 and "name its preset, e.g. model=dino_r50_4scale" in result.stderr
    result = _cli_here(
        capsys,
        "predict",
        "model=dino_r50_5scale",
        f"checkpoint={checkpoint}",
        f"images={images}",
        f"output={tmp_path}/o.json",
    )
    assert result.returncode != 0 and "does not fit this model preset" in result.stderr
    assert not (tmp_path / "o.json").exists()
    # An output that would overwrite an input image, and a device torch does not know: refused up front.
    image = images / IMAGES[0]
    before = image.read_bytes()
    for extra, message in [
        (f"output={image}", "must name a .json file"),
        ("device=gpu", "device=gpu is not a device"),
    ]:
        args = [f"checkpoint={checkpoint}", f"images={images}", f"output={tmp_path}/o.json", extra]
        result = _cli_here(capsys, "predict", "model=dino_r50_4scale", *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert image.read_bytes() == before and not (tmp_path / "o.json").exists()


def test_model_info_reports_every_preset(capsys) -> None:
    from dino_core import PRESETS

    for name in ("dino_r50_4scale", "dino_swinl_4scale", "debug"):
        result = _cli_here(capsys, "model-info", f"model={name}")
        assert result.returncode == 0, result.stderr
        info = json.loads(result.stdout)
        assert info["preset"] == name and info["total_params"] >= info["trainable_params"] > 0
    swinl5 = _cli_here(capsys, "model-info", "model=dino_swinl_5scale")
    assert json.loads(swinl5.stdout)["total_params"] == 217_576_690
    bad = _cli_here(capsys, "model-info", "model.num_levels=9")
    assert bad.returncode != 0 and "model.num_levels must be in [2, 5], got 9" in bad.stderr
    unknown = _cli("model-info", "model=resnet")
    assert unknown.returncode != 0 and "Could not find 'model/resnet'" in unknown.stderr
    assert len(PRESETS) >= 16
