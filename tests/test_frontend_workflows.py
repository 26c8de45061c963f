"""Workflows saved by the real ComfyUI frontend (1.27.10) convert to the API prompt the frontend itself made.

The fixtures in tests/data/comfyui/ were written by the real editor in headless Chromium (provenance in its
README.md): the same graph as Export writes it (schema 0.4), as Save stores it (every widget listed as an input
slot, link target slots counted among them), in schema 1, and a second graph with a bypassed node, a native
link reroute, a PrimitiveNode and LoomImageGrid. The reference for each is the frontend's own
`graphToPrompt().output` (Export (API)), not our converter.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_loom.demo import write_demo_files
from lora_loom.runner import cli
from lora_loom.runner.defaults import default_schemas
from lora_loom.runner.workflow import load_workflow, parse_workflow

FIXTURES = Path(__file__).parent / "data" / "comfyui"
VARIANTS = ["json", "userdata.json", "schema1.json"]  # Export, Save, schema 1

# Widgets our nodes gained after the fixtures were recorded (LoRA Loom e3cac96). Loading a saved workflow, the
# frontend gives a widget its file has no value for the widget's default and sends it, so today's editor adds
# these to the recorded prompt; the default is what keeps old workflows drawing what they drew.
ADDED_SINCE_RECORDING = {"LoomImageGrid": {"layout": "batch per row"}}


def frontend_prompt(graph: str) -> dict:
    """The frontend's API prompt, without its `_meta` titles (the backend ignores them)."""
    api = json.loads((FIXTURES / f"{graph}.api.json").read_text())
    return {
        node_id: {
            "class_type": n["class_type"],
            "inputs": {**n["inputs"], **ADDED_SINCE_RECORDING.get(n["class_type"], {})},
        }
        for node_id, n in api.items()
    }


def our_prompt(workflow) -> dict:
    return {node_id: {"class_type": n["class_type"], "inputs": n["inputs"]} for node_id, n in workflow.prompt.items()}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("graph", ["frontend_saved_workflow", "frontend_extras_workflow"])
def test_a_frontend_saved_workflow_gives_the_frontends_own_api_prompt(graph, variant):
    workflow = load_workflow(FIXTURES / f"{graph}.{variant}", default_schemas())
    assert not workflow.problems, workflow.problems
    assert workflow.format == ("ui-1" if variant == "schema1.json" else "ui-0.4")
    assert our_prompt(workflow) == frontend_prompt(graph)


def test_the_frontends_queue_request_body_runs_its_prompt_and_keeps_its_workflow():
    body = json.loads((FIXTURES / "frontend_queue_request.json").read_text())
    workflow = parse_workflow(body, default_schemas())
    assert our_prompt(workflow) == frontend_prompt("frontend_saved_workflow")
    assert workflow.ui == body["extra_data"]["extra_pnginfo"]["workflow"]  # embedded in the PNGs we save


def test_a_frontend_saved_workflow_runs_headlessly_and_its_pngs_load_back(tmp_path):
    models, out = tmp_path / "models", tmp_path / "out"
    write_demo_files(models)  # demo-all.safetensors, which the graph's LoadLoRA names
    source = FIXTURES / "frontend_saved_workflow.json"
    argv = [str(source), "--models-dir", str(models), "--output-dir", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    pngs = sorted(out.glob("frontend_check_*.png"))
    assert [p.name for p in pngs] == ["frontend_check_00001_.png", "frontend_check_00002_.png"]  # batch 2
    first = np.asarray(Image.open(pngs[0]))
    assert first.shape == (64, 64, 3) and first.std() > 1  # a picture, not a blank
    # The PNG carries the frontend's workflow and runs again from the PNG alone, to the same pixels.
    again = load_workflow(pngs[0], default_schemas())
    assert our_prompt(again) == frontend_prompt("frontend_saved_workflow")
    assert (
        cli.main([str(pngs[0]), "--models-dir", str(models), "--output-dir", str(out / "again"), "--no-progress"]) == 0
    )
    assert np.array_equal(np.asarray(Image.open(out / "again" / "frontend_check_00001_.png")), first)
