"""Headless workflow runner: UI→API conversion, validation, caching, SaveImage, CLI — on small fake nodes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_loom.nodes import paths
from lora_loom.nodes.contract import CORE_NODES, LOAD_LORA
from lora_loom.nodes.schema import Input, NodeSchema, Output, v1_input_types
from lora_loom.runner import cli, defaults
from lora_loom.runner.core_nodes import core_node_classes, save_image_path
from lora_loom.runner.errors import NodeExecutionError, ValidationFailed, WorkflowError
from lora_loom.runner.execute import Runner
from lora_loom.runner.overrides import apply_overrides, parse_override
from lora_loom.runner.validate import validate_prompt
from lora_loom.runner.workflow import control_values, load_workflow, parse_workflow, ui_to_api

# ------------------------------------------------------------------------------------------ fake nodes

CALLS: Counter = Counter()


def _schema(node_id, inputs, outputs=(), output_node=False):
    return NodeSchema(node_id, node_id, "test", "", tuple(inputs), tuple(outputs), output_node)


class _Fake:
    FUNCTION = "execute"
    CATEGORY = "test"
    OUTPUT_NODE = False

    @classmethod
    def INPUT_TYPES(cls):
        return v1_input_types(cls.SCHEMA)

    def execute(self, **kwargs):
        CALLS[type(self).__name__] += 1
        return self.compute(**kwargs)


class MakeNum(_Fake):
    SCHEMA = _schema(
        "MakeNum",
        [
            Input("value", "FLOAT", default=0.0, min=-1000.0, max=1000.0),
            Input("seed", "INT", default=0, min=0, max=2**64 - 1),  # seed-named: one control value follows
            Input("mode", "COMBO", default="add", options=("add", "mul")),
        ],
        [Output("NUM", "num"), Output("FLOAT", "float")],
    )
    RETURN_TYPES = ("NUM", "FLOAT")

    def compute(self, value, seed, mode):
        return (value, value)


class Add(_Fake):
    SCHEMA = _schema(
        "Add",
        [Input("a", "NUM"), Input("b", "NUM", optional=True), Input("bias", "FLOAT", default=0.0, optional=True)],
        [Output("NUM", "sum")],
    )
    RETURN_TYPES = ("NUM",)

    def compute(self, a, b=0.0, bias=0.0):
        return (a + b + bias,)


class ToImage(_Fake):
    SCHEMA = _schema(
        "ToImage",
        [Input("n", "NUM"), Input("width", "INT", default=8, min=1, max=64), Input("height", "INT", default=4)],
        [Output("IMAGE", "image")],
    )
    RETURN_TYPES = ("IMAGE",)

    def compute(self, n, width, height):
        return (torch.full((2, height, width, 3), float(n) / 10),)


class Show(_Fake):
    SCHEMA = _schema("Show", [Input("n", "NUM")], output_node=True)
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    def compute(self, n, prompt=None, extra_pnginfo=None):  # an output node's hidden inputs, as the host's
        assert prompt is not None  # the runner passes what INPUT_TYPES declares
        return {"ui": {"text": [str(n)]}, "result": ()}


class LoadModel(_Fake):
    SCHEMA = _schema("LoadModel", [Input("lora_name", "COMBO", options=paths.lora_choices)], [Output("NUM", "n")])
    RETURN_TYPES = ("NUM",)

    def compute(self, lora_name):
        return (1.0,)


class Boom(_Fake):
    SCHEMA = _schema("Boom", [Input("n", "NUM")], [Output("NUM", "n")])
    RETURN_TYPES = ("NUM",)

    def compute(self, n):
        raise RuntimeError("kaboom")


FAKES = {cls.__name__: cls for cls in (MakeNum, Add, ToImage, Show, LoadModel, Boom)}
SCHEMAS = {name: cls.SCHEMA for name, cls in FAKES.items()} | {s.node_id: s for s in CORE_NODES}
ALL_CLASSES = {**FAKES, **core_node_classes("never-written", "never-written")}  # for validation only


@pytest.fixture(autouse=True)
def _reset_calls():
    CALLS.clear()


def classes(tmp_path: Path) -> dict[str, type]:
    return {**FAKES, **core_node_classes(tmp_path / "out", tmp_path / "temp")}


def runner(tmp_path: Path) -> Runner:
    return Runner(SCHEMAS, classes(tmp_path), progress=False)


# ------------------------------------------------------------------------------- editor workflow builder


def ui_node(node_id, type_, inputs=(), outputs=(), widgets=None, mode=0):
    """inputs: (name, type) or (name, type, True) for a widget's input slot; outputs: (name, type)."""
    return {
        "id": node_id,
        "type": type_,
        "pos": [0, 0],
        "size": [200, 100],
        "flags": {},
        "order": 0,
        "mode": mode,
        "inputs": [
            {"name": i[0], "type": i[1], "link": None, **({"widget": {"name": i[0]}} if len(i) > 2 else {})}
            for i in inputs
        ],
        "outputs": [{"name": name, "type": kind, "links": []} for name, kind in outputs],
        "properties": {"Node name for S&R": type_},
        "widgets_values": list(widgets or []),
    }


def ui_graph(nodes, links, version):
    """links: (link_id, from_id, from_slot, to_id, to_slot, type); fills the nodes' slot link fields."""
    by_id = {n["id"]: n for n in nodes}
    for link_id, source, slot, target, target_slot, _ in links:
        by_id[source]["outputs"][slot]["links"].append(link_id)
        by_id[target]["inputs"][target_slot]["link"] = link_id
    if version == 1:
        return {
            "version": 1,
            "state": {"lastGroupId": 0, "lastNodeId": max(by_id), "lastLinkId": len(links), "lastRerouteId": 0},
            "nodes": nodes,
            "links": [
                {"id": a, "origin_id": b, "origin_slot": c, "target_id": d, "target_slot": e, "type": f}
                for a, b, c, d, e, f in links
            ],
            "groups": [],
            "extra": {},
        }
    return {
        "last_node_id": max(by_id),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": [list(link) for link in links],
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


NUM_OUT = [("num", "NUM"), ("float", "FLOAT")]


def sample_graph(version=0.4):
    """MakeNum(1) → Reroute → Add.a; MakeNum(3) → Add.b; MakeNum(3).float → Add.bias (converted widget);
    Add → bypassed Add → ToImage → SaveImage; a muted MakeNum; a note; a primitive feeding MakeNum(3).seed."""
    nodes = [
        ui_node(1, "MakeNum", [("seed", "INT", True)], NUM_OUT, [1.5, 7, "randomize", "mul"]),
        ui_node(2, "Reroute", [("", "*")], [("", "NUM")]),
        ui_node(3, "MakeNum", [("seed", "INT", True)], NUM_OUT, [2.0, 5, "fixed", "add"]),
        ui_node(4, "Add", [("a", "NUM"), ("b", "NUM"), ("bias", "FLOAT", True)], [("sum", "NUM")], [0.5]),
        ui_node(5, "Add", [("a", "NUM"), ("b", "NUM")], [("sum", "NUM")], [0.0], mode=4),
        ui_node(6, "ToImage", [("n", "NUM")], [("image", "IMAGE")], [16, 8]),
        ui_node(7, "SaveImage", [("images", "IMAGE")], [], ["run/test"]),
        ui_node(8, "MakeNum", [], NUM_OUT, [9.0, 0, "fixed", "add"], mode=2),
        ui_node(9, "Note", [], [], ["a note"]),
        ui_node(10, "PrimitiveNode", [], [("INT", "INT")], [123, "fixed"]),
    ]
    links = [
        (1, 1, 0, 2, 0, "NUM"),
        (2, 2, 0, 4, 0, "NUM"),
        (3, 3, 0, 4, 1, "NUM"),
        (4, 3, 1, 4, 2, "FLOAT"),
        (5, 4, 0, 5, 0, "NUM"),
        (6, 8, 0, 5, 1, "NUM"),
        (7, 5, 0, 6, 0, "NUM"),
        (8, 6, 0, 7, 0, "IMAGE"),
        (9, 10, 0, 3, 0, "INT"),
    ]
    return ui_graph(nodes, links, version)


EXPECTED_PROMPT = {
    "1": {"class_type": "MakeNum", "inputs": {"value": 1.5, "seed": 7, "mode": "mul"}},
    "3": {"class_type": "MakeNum", "inputs": {"value": 2.0, "seed": 123, "mode": "add"}},
    "4": {"class_type": "Add", "inputs": {"bias": ["3", 1], "a": ["1", 0], "b": ["3", 0]}},
    "6": {"class_type": "ToImage", "inputs": {"width": 16, "height": 8, "n": ["4", 0]}},
    "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": "run/test", "images": ["6", 0]}},
}


def without_meta(prompt):
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


# ------------------------------------------------------------------------------------ UI → API conversion


@pytest.mark.parametrize("version", [0.4, 1])
def test_ui_to_api(version):
    workflow = ui_to_api(sample_graph(version), SCHEMAS)
    # Widget order, seed control value dropped, converted widget takes the link, reroute followed, primitive
    # resolved to its value, bypassed Add passes its NUM input through, muted node and note removed.
    assert without_meta(workflow.prompt) == EXPECTED_PROMPT
    assert workflow.prompt["4"]["_meta"] == {"title": "Add"}
    assert not workflow.problems and not workflow.warnings


def test_control_after_generate_values():
    assert control_values(Input("steps", "INT", control_after_generate=True)) == 1
    assert control_values(Input("noise_seed", "INT")) == 1
    assert control_values(Input("seed", "FLOAT")) == 0
    assert control_values(Input("pick", "COMBO", options=("a",), control_after_generate=True)) == 2  # mode + filter


def test_schema_04_and_1_give_the_same_prompt():
    assert ui_to_api(sample_graph(0.4), SCHEMAS).prompt == ui_to_api(sample_graph(1), SCHEMAS).prompt


def test_muted_source_drops_the_link_with_a_hint():
    nodes = [
        ui_node(1, "MakeNum", [], NUM_OUT, [1.0, 0, "fixed", "add"], mode=2),
        ui_node(2, "Add", [("a", "NUM"), ("b", "NUM"), ("bias", "FLOAT", True)], [("sum", "NUM")], [0.25]),
        ui_node(3, "Show", [("n", "NUM")]),
    ]
    links = [(1, 1, 0, 2, 0, "NUM"), (2, 1, 1, 2, 2, "FLOAT"), (3, 2, 0, 3, 0, "NUM")]
    workflow = ui_to_api(ui_graph(nodes, links, 0.4), SCHEMAS)
    assert workflow.prompt["2"]["inputs"] == {"bias": 0.25}  # a widget keeps its own value
    problems = validate_prompt(workflow.prompt, SCHEMAS, FAKES, hints=workflow.hints).problems
    assert [str(p) for p in problems] == [
        "node 2 (Add), input 'a': required input is missing (its source, node 1 (MakeNum), is muted)"
    ]


def test_bypass_prefers_the_same_slot_then_the_type():
    nodes = [
        ui_node(1, "MakeNum", [], NUM_OUT, [1.0, 0, "fixed", "add"]),
        ui_node(2, "MakeNum", [], NUM_OUT, [2.0, 0, "fixed", "add"]),
        ui_node(3, "Add", [("a", "NUM"), ("b", "NUM")], [("sum", "NUM")], [0.0], mode=4),
        ui_node(4, "Add", [("a", "NUM"), ("b", "NUM"), ("bias", "FLOAT", True)], [("sum", "NUM")], [0.0]),
        ui_node(5, "Show", [("n", "NUM")]),
    ]
    links = [(1, 1, 0, 3, 0, "NUM"), (2, 2, 0, 3, 1, "NUM"), (3, 3, 0, 4, 0, "NUM"), (4, 4, 0, 5, 0, "NUM")]
    prompt = ui_to_api(ui_graph(nodes, links, 1), SCHEMAS).prompt
    assert prompt["4"]["inputs"]["a"] == ["1", 0]  # output 0 of the bypassed node ← its input 0
    assert "3" not in prompt


def test_widget_values_by_name_and_missing_values_take_defaults():
    nodes = [ui_node(1, "ToImage", [("n", "NUM")], [("image", "IMAGE")])]
    nodes[0]["widgets_values"] = {"height": 3}
    assert ui_to_api(ui_graph(nodes, [], 0.4), SCHEMAS).prompt["1"]["inputs"] == {"width": 8, "height": 3}
    nodes[0]["widgets_values"] = [12]
    assert ui_to_api(ui_graph(nodes, [], 0.4), SCHEMAS).prompt["1"]["inputs"] == {"width": 12, "height": 4}


def test_dangling_link_id_is_a_problem():
    nodes = [ui_node(1, "Show", [("n", "NUM")])]
    nodes[0]["inputs"][0]["link"] = 99
    workflow = ui_to_api(ui_graph(nodes, [], 0.4), SCHEMAS)
    assert "link 99" in str(workflow.problems[0]) and "node 1 (Show)" in str(workflow.problems[0])


def test_api_format_and_prompt_body(tmp_path):
    api = {"1": {"class_type": "MakeNum", "inputs": {"value": 1}}, "2": {"class_type": "Show", "inputs": {}}}
    assert parse_workflow(api, SCHEMAS).format == "api"
    body = parse_workflow({"prompt": api, "extra_data": {"extra_pnginfo": {"workflow": {"nodes": []}}}}, SCHEMAS)
    assert body.prompt["1"]["inputs"] == {"value": 1} and body.ui == {"nodes": []}


def test_load_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": [1, }')
    with pytest.raises(WorkflowError, match=r"bad\.json: invalid JSON at line 1"):
        load_workflow(bad, SCHEMAS)
    other = tmp_path / "other.json"
    other.write_text('{"hello": "world"}')
    with pytest.raises(WorkflowError, match=r"other\.json: not a ComfyUI workflow"):
        load_workflow(other, SCHEMAS)
    with pytest.raises(WorkflowError, match=r"missing\.json: no such file"):
        load_workflow(tmp_path / "missing.json", SCHEMAS)


# -------------------------------------------------------------------------------------------- validation


def problems_of(prompt, **kwargs):
    return [str(p) for p in validate_prompt(prompt, SCHEMAS, ALL_CLASSES, **kwargs).problems]


def show(source="1"):
    return {"class_type": "Show", "inputs": {"n": [source, 0]}}


def test_valid_prompt_orders_dependencies_first():
    prompt = {
        "9": show("5"),
        "5": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["1", 0]}},
        "1": {"class_type": "MakeNum", "inputs": {"value": "2.5", "seed": 1, "mode": "add"}},
        "2": {"class_type": "MakeNum", "inputs": {"value": 1, "seed": 1.0, "mode": "add"}},
        "3": {"class_type": "Boom", "inputs": {}},  # not needed by any output: not validated, not run
    }
    validation = validate_prompt(prompt, SCHEMAS, FAKES)
    assert validation.ok and validation.outputs == ["9"]
    assert validation.order == ["2", "1", "5", "9"]
    assert validation.prompt["1"]["inputs"]["value"] == 2.5 and validation.prompt["2"]["inputs"]["seed"] == 1


def test_unknown_node_type_and_missing_implementation():
    prompt = {"1": {"class_type": "KSampler", "inputs": {}}, "2": {"class_type": "Show", "inputs": {"n": ["1", 0]}}}
    assert problems_of(prompt) == ["node 1 (KSampler): unknown node type 'KSampler'"]
    prompt = {"1": {"class_type": "MakeNum", "inputs": {}}, "2": show()}
    missing = validate_prompt(prompt, SCHEMAS, {"Show": Show}).problems
    assert str(missing[0]) == "node 1 (MakeNum): no implementation is registered for node type 'MakeNum'"


def test_no_output_node():
    assert problems_of({"1": {"class_type": "MakeNum", "inputs": {}}}) == [
        "the workflow has no output node (e.g. SaveImage), so nothing would run"
    ]


def test_all_input_errors_are_collected():
    prompt = {
        "1": {"class_type": "MakeNum", "inputs": {"value": 5000, "seed": -1, "mode": "div"}},
        "2": {"class_type": "ToImage", "inputs": {"n": ["1", 1], "width": "wide", "height": 4}},
        "3": {"class_type": "Add", "inputs": {"a": ["42", 0], "b": ["1", 7], "bias": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}},
        "5": {"class_type": "Add", "inputs": {"a": 3.0}},
        "6": show("3"),
        "7": show("5"),
        "8": {"class_type": "Show", "inputs": {"n": ["2", 0]}},
    }
    assert problems_of(prompt) == [
        "node 4 (SaveImage), input 'filename_prefix': required input is missing",
        "node 2 (ToImage), input 'n': type mismatch: linked to output 1 'float' of node 1 (MakeNum), "
        "which gives FLOAT; this input takes NUM",
        "node 2 (ToImage), input 'width': expects an INT, got 'wide'",
        "node 1 (MakeNum), input 'value': value 5000.0 is bigger than the maximum 1000",
        "node 1 (MakeNum), input 'seed': value -1 is smaller than the minimum 0",
        "node 1 (MakeNum), input 'mode': 'div' is not one of 'add', 'mul'",
        "node 3 (Add), input 'a': linked to node 42, which is not in the workflow",
        "node 3 (Add), input 'b': linked to output 7 of node 1 (MakeNum), which has 2 output(s)",
        "node 3 (Add), input 'bias': type mismatch: linked to output 0 'num' of node 1 (MakeNum), "
        "which gives NUM; this input takes FLOAT",
        "node 5 (Add), input 'a': expects a link from a NUM output, got the value 3.0",
        "node 8 (Show), input 'n': type mismatch: linked to output 0 'image' of node 2 (ToImage), "
        "which gives IMAGE; this input takes NUM",
    ]


def test_a_node_linked_to_itself_is_a_cycle():
    prompt = {"1": {"class_type": "Add", "inputs": {"a": ["1", 0]}}, "2": show("1")}
    assert problems_of(prompt) == ["node 1 (Add), input 'a': dependency cycle: 1 (Add) -> 1 (Add)"]


def test_cycle():
    prompt = {
        "1": {"class_type": "Add", "inputs": {"a": ["2", 0]}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0]}},
        "3": show("2"),
    }
    assert problems_of(prompt) == ["node 1 (Add), input 'a': dependency cycle: 1 (Add) -> 2 (Add) -> 1 (Add)"]


def test_missing_model_file_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "_models_dir", tmp_path)
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "style.safetensors").write_bytes(b"")
    prompt = {"1": {"class_type": "LoadModel", "inputs": {"lora_name": "gone.safetensors"}}, "2": show()}
    assert problems_of(prompt, models_dir=tmp_path) == [
        f"node 1 (LoadModel), input 'lora_name': model file 'gone.safetensors' not found in {tmp_path / 'loras'} "
        "(1 file(s) there: style.safetensors)"
    ]
    prompt["1"]["inputs"]["lora_name"] = "style.safetensors"
    assert problems_of(prompt) == []


def test_validate_inputs_hook_replaces_builtin_checks():
    class Lenient(MakeNum):
        @classmethod
        def VALIDATE_INPUTS(cls, mode):
            return True if mode == "div" else f"bad mode {mode}"

    prompt = {"1": {"class_type": "MakeNum", "inputs": {"value": 1, "seed": 0, "mode": "div"}}, "2": show()}
    assert validate_prompt(prompt, SCHEMAS, {**FAKES, "MakeNum": Lenient}).ok
    prompt["1"]["inputs"]["mode"] = "pow"
    assert [str(p) for p in validate_prompt(prompt, SCHEMAS, {**FAKES, "MakeNum": Lenient}).problems] == [
        "node 1 (MakeNum): custom validation failed: bad mode pow"
    ]


# -------------------------------------------------------------------------------------- --set overrides


def test_overrides_parse_by_type_and_update_the_ui():
    workflow = ui_to_api(sample_graph(1), SCHEMAS)
    sets = [parse_override(s) for s in ("1.seed=0x10", "1.value=-2.5", "6.width=32", "7.filename_prefix=a=b")]
    assert apply_overrides(workflow, sets, SCHEMAS) == []
    assert workflow.prompt["1"]["inputs"] == {"value": -2.5, "seed": 16, "mode": "mul"}
    assert workflow.prompt["7"]["inputs"]["filename_prefix"] == "a=b"
    ui_node_1 = next(n for n in workflow.ui["nodes"] if n["id"] == 1)
    assert ui_node_1["widgets_values"] == [-2.5, 16, "randomize", "mul"]

    bad = [parse_override(s) for s in ("1.seed=abc", "99.value=1", "4.a=1", "1.nope=1")]
    assert [str(p) for p in apply_overrides(workflow, bad, SCHEMAS)] == [
        "node 1 (MakeNum), input 'seed': --set 1.seed=abc: 'abc' is not an integer",
        "node 99, input 'value': --set 99.value=1: the prompt has no node 99 (not in the workflow, or "
        "muted/bypassed/virtual)",
        "node 4 (Add), input 'a': --set 4.a=1: 'a' takes a link (NUM), not a value",
        "node 1 (MakeNum), input 'nope': --set 1.nope=1: no such input (widget inputs: value, seed, mode)",
    ]
    with pytest.raises(ValueError, match="NODE_ID.INPUT=VALUE"):
        parse_override("seed=3")


# --------------------------------------------------------------------------------------------- execution


def chain(value=1.0, other=2.0):
    return {
        "1": {"class_type": "MakeNum", "inputs": {"value": value, "seed": 0, "mode": "add"}},
        "2": {"class_type": "MakeNum", "inputs": {"value": other, "seed": 0, "mode": "add"}},
        "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "4": show("3"),
    }


def test_cache_reruns_only_the_changed_node_and_its_dependents(tmp_path):
    run = runner(tmp_path)
    first = run.run(chain())
    assert first.executed == ["1", "2", "3", "4"] and first.ui["4"] == {"text": ["3.0"]}
    second = run.run(chain(value=5.0))
    assert second.executed == ["1", "3", "4"] and second.cached == ["2"]
    assert second.ui["4"] == {"text": ["7.0"]}
    third = run.run(chain(value=5.0))
    assert third.executed == [] and third.ui["4"] == {"text": ["7.0"]}
    assert CALLS == Counter({"MakeNum": 3, "Add": 2, "Show": 2})


def test_is_changed_nan_always_reruns(tmp_path):
    class Volatile(MakeNum):
        @classmethod
        def IS_CHANGED(cls, **kwargs):
            return float("nan")

    run = Runner(SCHEMAS, {**classes(tmp_path), "MakeNum": Volatile}, progress=False)
    run.run(chain())
    assert run.run(chain()).executed == ["1", "2", "3", "4"]


def test_run_refuses_invalid_prompts_and_reports_node_failures(tmp_path):
    run = runner(tmp_path)
    with pytest.raises(ValidationFailed, match="unknown node type"):
        run.run({"1": {"class_type": "Nope", "inputs": {}}, "2": show()})
    prompt = {**chain(), "3": {"class_type": "Boom", "inputs": {"n": ["1", 0]}}}
    with pytest.raises(NodeExecutionError, match=r"node 3 \(Boom\) failed: RuntimeError: kaboom"):
        run.run(prompt)


# -------------------------------------------------------------------------------------- SaveImage/Preview


def test_save_image_path_counter_and_subfolders(tmp_path):
    for name in ("img_00007_.png", "img_00002_.png", "img_x_.png", "other_00099_.png", "img2_00050_.png"):
        (tmp_path / name).write_bytes(b"")
    folder, name, counter, subfolder = save_image_path("img", tmp_path)
    assert (folder, name, counter, subfolder) == (tmp_path, "img", 8, "")
    folder, name, counter, subfolder = save_image_path("a/b/img", tmp_path)
    assert folder == tmp_path / "a" / "b" and folder.is_dir() and counter == 1 and subfolder == "a/b"
    with pytest.raises(ValueError, match="outside the output folder"):
        save_image_path("../escape", tmp_path)


def test_save_image_path_refuses_absolute_prefixes_and_symlinks_that_lead_out(tmp_path):
    output, elsewhere = tmp_path / "output", tmp_path / "elsewhere"
    output.mkdir()
    elsewhere.mkdir()
    (output / "link").symlink_to(elsewhere, target_is_directory=True)  # textually inside, really outside
    for prefix in ("link/img", "link/deeper/img", str(elsewhere / "img"), "a/../../elsewhere/img"):
        with pytest.raises(ValueError, match="outside the output folder"):
            save_image_path(prefix, output)
    assert list(elsewhere.iterdir()) == []  # nothing was created there
    (output / "inside").mkdir()
    (output / "alias").symlink_to(output / "inside", target_is_directory=True)  # a link that stays inside is fine
    assert save_image_path("alias/img", output)[2] == 1


def test_save_image_writes_pngs_with_prompt_and_workflow(tmp_path):
    workflow = ui_to_api(sample_graph(0.4), SCHEMAS)
    run = runner(tmp_path)
    result = run.run(workflow.prompt, extra_pnginfo=workflow.extra_pnginfo)
    images = result.ui["7"]["images"]
    assert images == [
        {"filename": "test_00001_.png", "subfolder": "run", "type": "output"},
        {"filename": "test_00002_.png", "subfolder": "run", "type": "output"},
    ]
    with Image.open(tmp_path / "out" / "run" / "test_00002_.png") as png:
        assert png.size == (16, 8) and png.mode == "RGB"
        assert png.getpixel((0, 0)) == (140, 140, 140)  # n = 1.5 + 2 + bias 2 = 5.5: uint8(255 * 0.55)
        assert json.loads(png.text["prompt"]) == workflow.prompt
        assert json.loads(png.text["workflow"]) == workflow.ui
    # A fresh runner (no cache) continues the counter.
    second = runner(tmp_path).run(workflow.prompt)
    assert [i["filename"] for i in second.ui["7"]["images"]] == ["test_00003_.png", "test_00004_.png"]
    with Image.open(tmp_path / "out" / "run" / "test_00003_.png") as png:
        assert "workflow" not in png.text


def test_preview_image_goes_to_temp(tmp_path):
    prompt = {
        "1": {"class_type": "MakeNum", "inputs": {"value": 20.0, "seed": 0, "mode": "add"}},
        "2": {"class_type": "ToImage", "inputs": {"n": ["1", 0], "width": 2, "height": 2}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    images = runner(tmp_path).run(prompt).ui["3"]["images"]
    assert [i["type"] for i in images] == ["temp", "temp"] and images[0]["filename"].startswith("ComfyUI_temp_")
    with Image.open(tmp_path / "temp" / images[0]["filename"]) as png:
        assert png.getpixel((1, 1)) == (255, 255, 255)  # 2.0 clipped


# --------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def fake_cli(monkeypatch, tmp_path):
    """The CLI with the fake nodes registered (their SCHEMA attributes join the default schemas)."""
    monkeypatch.setattr(defaults, "registered_classes", lambda: dict(FAKES))
    monkeypatch.setattr(paths, "_models_dir", paths._models_dir)  # the CLI sets it; restore afterwards

    def main(*args):
        dirs = ["--output-dir", str(tmp_path / "out"), "--temp-dir", str(tmp_path / "temp"), "--no-progress"]
        return cli.main([*map(str, args), *dirs])

    return main


def test_cli_runs_and_summarises(fake_cli, tmp_path, capsys):
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(sample_graph(1)))
    assert fake_cli(path, "--set", "6.width=4", "--models-dir", tmp_path / "models") == 0
    out = capsys.readouterr().out
    assert f"saved: {tmp_path / 'out' / 'run' / 'test_00001_.png'}" in out and "done: 5 node(s) run" in out
    with Image.open(tmp_path / "out" / "run" / "test_00001_.png") as png:
        assert png.size == (4, 8)
        assert json.loads(png.text["prompt"])["6"]["inputs"]["width"] == 4
        saved = json.loads(png.text["workflow"])
        assert next(n for n in saved["nodes"] if n["id"] == 6)["widgets_values"] == [4, 8]
    assert paths._models_dir == tmp_path / "models"


def test_cli_invalid_workflow_writes_nothing(fake_cli, tmp_path, capsys):
    graph = sample_graph(0.4)
    path = tmp_path / "flow.json"
    path.write_text(json.dumps(graph))
    assert fake_cli(path, "--set", "6.width=999", "--set", "1.mode=div") == 2
    err = capsys.readouterr().err
    assert "2 problem(s), nothing was run" in err
    assert "node 6 (ToImage), input 'width': value 999 is bigger than the maximum 64" in err
    assert "node 1 (MakeNum), input 'mode': 'div' is not one of 'add', 'mul'" in err
    assert not (tmp_path / "out").exists() and CALLS == Counter()

    path.write_text("{not json")
    assert fake_cli(path) == 2 and "flow.json: invalid JSON" in capsys.readouterr().err
    assert fake_cli(tmp_path / "nope.json") == 2 and "nope.json: no such file" in capsys.readouterr().err
    path.write_text(json.dumps(graph))
    assert fake_cli(path, "--set", "oops") == 2
    assert "--set 'oops': expected NODE_ID.INPUT=VALUE" in capsys.readouterr().err
    assert fake_cli("--bogus-flag") == 2
    assert not (tmp_path / "out").exists() and CALLS == Counter()


def test_cli_node_failure_exit_code(fake_cli, tmp_path, capsys):
    prompt = {**chain(), "3": {"class_type": "Boom", "inputs": {"n": ["1", 0]}}}
    path = tmp_path / "api.json"
    path.write_text(json.dumps(prompt))
    assert fake_cli(path) == 1
    assert "error: node 3 (Boom) failed: RuntimeError: kaboom" in capsys.readouterr().err


def test_cli_with_the_real_contract_reports_a_missing_lora(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(paths, "_models_dir", paths._models_dir)
    prompt = {
        "1": {"class_type": "LoadLoRA", "inputs": {"lora_name": "gone.safetensors"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    path = tmp_path / "api.json"
    path.write_text(json.dumps(prompt))
    code = cli.main([str(path), "--models-dir", str(tmp_path / "models"), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert (
        f"node 1 (LoadLoRA), input 'lora_name': model file 'gone.safetensors' not found in "
        f"{tmp_path / 'models' / 'loras'} (it is empty or does not exist)" in err
    )
    assert "node 2 (PreviewImage), input 'images': type mismatch" in err
    assert LOAD_LORA.node_id == "LoadLoRA"


@pytest.mark.parametrize(
    ("kind", "text", "value"),
    [("INT", "0x10", 16), ("INT", "1e3", 1000), ("INT", " 42 ", 42), ("FLOAT", "-2.5", -2.5), ("BOOLEAN", "yes", True),
     ("BOOLEAN", "0", False), ("STRING", "a=b", "a=b")],
)  # fmt: skip
def test_text_means_the_same_on_the_command_line_and_in_a_prompt(kind, text, value):
    """One coercion rule: `--set` text and a string constant in an API prompt give the same value."""
    from lora_loom.runner.validate import convert, parse_text

    item = Input("x", kind)
    assert parse_text(item, text) == value
    assert convert(item, text) == value
    assert type(convert(item, text)) is type(value)


def test_text_that_is_not_the_type_is_refused_the_same_way_in_both():
    from lora_loom.runner.validate import convert, parse_text

    for kind, text in (("INT", "1.5"), ("INT", "abc"), ("FLOAT", "x"), ("BOOLEAN", "maybe")):
        with pytest.raises(ValueError):
            parse_text(Input("x", kind), text)
        with pytest.raises(ValueError, match=f"expects an? {kind}"):
            convert(Input("x", kind), text)
