"""Every shipped workflow runs headlessly, as shipped, for a new user: on the built-in base and LoRAs alone."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_loom.runner import cli
from lora_loom.sd15.builtin import BUILT_IN_TOY

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A new user's models folder: empty (everything the workflows name is built in)."""
    return tmp_path_factory.mktemp("models")


def test_there_are_the_promised_workflows():
    assert {p.stem for p in WORKFLOWS} >= {
        "toy_world_grid",
        "txt2img_one_lora",
        "stacked_loras",
        "fuse_and_save",
        "ab_strength",
        "train_then_apply",
    }


def expected_pngs(workflow: dict) -> dict[str, tuple[int, tuple[int, int] | None]]:
    """{SaveImage prefix: (how many PNGs, size or None)}: a Sampler's batch at its size, or one grid."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    sources = {link[0]: link[1] for link in workflow["links"]}
    expected = {}
    for node in nodes.values():
        if node["type"] != "SaveImage":
            continue
        source = nodes[sources[node["inputs"][0]["link"]]]
        if source["type"] == "Sampler":
            *_, width, height, batch = source["widgets_values"]
            expected[node["widgets_values"][0]] = (batch, (width, height))
        elif source["type"] == "TrainLoRA":  # its loss curve
            expected[node["widgets_values"][0]] = (1, (768, 320))
        else:
            assert source["type"] == "LoomImageGrid"
            expected[node["widgets_values"][0]] = (1, None)
    return expected


@pytest.fixture(scope="module")
def shipped_runs(models_dir, tmp_path_factory):
    """Each shipped workflow run once, as shipped: {stem: (exit code, output folder)}."""
    runs = {}
    for workflow in WORKFLOWS:
        out = tmp_path_factory.mktemp(workflow.stem)
        argv = [str(workflow), "--models-dir", str(models_dir), "--output-dir", str(out), "--no-progress"]
        if workflow.stem == "train_then_apply":
            argv += ["--set", "2.steps=20"]  # as shipped but short: the tests' time budget
        runs[workflow.stem] = (cli.main(argv), out)
    return runs


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_headlessly(workflow, shipped_runs):
    code, out = shipped_runs[workflow.stem]
    assert code == 0
    ui = json.loads(workflow.read_text())
    assert next(n for n in ui["nodes"] if n["type"] == "LoadBase")["widgets_values"][0] == BUILT_IN_TOY
    for prefix, (count, size) in expected_pngs(ui).items():
        images = sorted(out.glob(f"{prefix}_*.png"))
        assert len(images) == count, prefix
        with Image.open(images[0]) as image:
            if size is not None:
                assert image.size == size
            assert json.loads(image.text["workflow"])["nodes"] and json.loads(image.text["prompt"])


def test_grid_workflow_rows_are_the_samplers_images(shipped_runs):
    _, out = shipped_runs["toy_world_grid"]
    grid = np.asarray(Image.open(next(out.glob("toy_world/grid_*.png"))).convert("RGB"))
    first = np.asarray(Image.open(sorted(out.glob("toy_world/row1_*.png"))[0]).convert("RGB"))
    upscale = 3
    tile = first.repeat(upscale, axis=0).repeat(upscale, axis=1)
    # The first row's first tile: right of the label column (220 px), one 4 px gap in.
    assert np.array_equal(grid[4 : 4 + tile.shape[0], 224 : 224 + tile.shape[1]], tile)
    assert grid.shape[0] == 4 + 4 * (tile.shape[0] + 4)  # four rows


def test_ab_strength_zero_equals_the_plain_base_and_one_differs(shipped_runs):
    """The A/B workflow's strength-0 branch is pixel for pixel the base with no LoRA (rendered here by the
    Sampler node on a fresh LoadBase, with the workflow's own settings); the strength-1 branch is not."""
    from lora_loom.nodes import impl
    from lora_loom.sd15.images import to_pil

    _, out = shipped_runs["ab_strength"]
    ui = json.loads(next(p for p in WORKFLOWS if p.stem == "ab_strength").read_text())
    sampler = next(n for n in ui["nodes"] if n["type"] == "Sampler")
    prompt, negative, seed, _control, steps, cfg, sampler_name, schedule, width, height, batch = sampler[
        "widgets_values"
    ]
    plain = impl.sampler(
        impl.load_base(BUILT_IN_TOY)[0],
        prompt,
        negative,
        seed,
        steps,
        cfg,
        sampler_name,
        schedule,
        width,
        height,
        batch,
    )[0]
    for index in range(batch):
        rendered = np.asarray(to_pil(plain[index]))
        zero = np.asarray(Image.open(out / f"loom_ab_strength0_{index + 1:05}_.png").convert("RGB"))
        one = np.asarray(Image.open(out / f"loom_ab_strength1_{index + 1:05}_.png").convert("RGB"))
        assert np.array_equal(zero, rendered), index
        assert np.abs(one.astype(int) - rendered).max() > 8, index  # the LoRA visibly changes every image


def test_every_shipped_workflow_has_its_template_thumbnail():
    """ComfyUI's template browser shows `workflows/<name>.jpg` beside `<name>.json` (scripts/build_thumbnails.py)."""
    from PIL import Image

    folder = Path(__file__).resolve().parents[1] / "workflows"
    names = sorted(p.stem for p in folder.glob("*.json"))
    assert names and sorted(p.stem for p in folder.glob("*.jpg")) == names
    for name in names:
        with Image.open(folder / f"{name}.jpg") as picture:
            assert picture.format == "JPEG" and min(picture.size) >= 256, name
