"""Every shipped workflow runs headlessly, as shipped, on the built-in base and the demo LoRAs."""

import json
from pathlib import Path

import pytest
from PIL import Image

from lora_loom.demo import write_demo_files
from lora_loom.runner import cli

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """What the README's main command makes: the tiny checkpoint and the demo LoRAs."""
    root = tmp_path_factory.mktemp("models")
    write_demo_files(root)
    return root


def test_there_are_the_promised_workflows():
    assert {p.stem for p in WORKFLOWS} >= {"txt2img_one_lora", "stacked_loras", "fuse_and_save", "ab_strength"}


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_headlessly(workflow, models_dir, tmp_path):
    out = tmp_path / "output"
    code = cli.main([str(workflow), "--models-dir", str(models_dir), "--output-dir", str(out), "--no-progress"])
    assert code == 0
    images = sorted(out.rglob("*.png"))
    savers = [n for n in json.loads(workflow.read_text())["nodes"] if n["type"] == "SaveImage"]
    batch = 2
    assert len(images) == batch * len(savers)
    with Image.open(images[0]) as image:
        assert image.size == (128, 128)
        assert json.loads(image.text["workflow"])["nodes"] and json.loads(image.text["prompt"])


def test_ab_strength_zero_equals_the_plain_base_and_one_differs(models_dir, tmp_path):
    out = tmp_path / "ab"
    workflow = next(p for p in WORKFLOWS if p.stem == "ab_strength")
    assert cli.main([str(workflow), "--models-dir", str(models_dir), "--output-dir", str(out), "--no-progress"]) == 0
    zero = Image.open(out / "loom_ab_strength0_00001_.png").tobytes()
    one = Image.open(out / "loom_ab_strength1_00001_.png").tobytes()
    assert zero != one
    plain = tmp_path / "plain"
    code = cli.main(
        [
            str(workflow),
            "--models-dir",
            str(models_dir),
            "--output-dir",
            str(plain),
            "--no-progress",
            "--set",
            "3.strength_unet=0.5",
            "--set",
            "3.strength_text_encoder=0.5",
        ]
    )
    assert code == 0 and Image.open(plain / "loom_ab_strength0_00001_.png").tobytes() not in (zero, one)
