"""Loading a workflow file and converting the editor's UI format to the API prompt the backend runs.

API format (what ComfyUI's `/prompt` takes): `{id: {"class_type", "inputs": {name: value | [src_id, slot]}}}`.
UI format (what the editor saves): schema 0.4 (`links` as arrays) or schema 1 (`links` as objects).

The conversion follows the editor's `graphToPrompt` (ComfyUI_frontend `src/utils/executionUtil.ts`) and
its link resolution (`ExecutableNodeDTO.resolveInput/resolveOutput`):
- widget values are positional in `widgets_values`, in the schema's widget order (required, then optional);
  a seed-like INT (`control_after_generate`, or named seed/noise_seed) stores one extra value (the control
  mode), a COMBO with `control_after_generate` two (mode and filter); those are never sent to the backend;
- an input slot with a link overrides the widget of the same name (a "converted" widget);
- muted nodes (mode 2) are not sent, and inputs linked to them are dropped (a widget keeps its own value);
- bypassed nodes (mode 4) are not sent; a consumer is wired to the bypassed node's input of matching type;
- virtual nodes: `Reroute` passes its input through, `PrimitiveNode` is replaced by its value, notes vanish.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..nodes.schema import Input, NodeSchema
from .errors import Problem, WorkflowError
from .slot_types import ANY, compatible, type_name

MODE_NEVER = 2  # muted
MODE_BYPASS = 4
REROUTE = "Reroute"
PRIMITIVE = "PrimitiveNode"
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
VIRTUAL_TYPES = frozenset({REROUTE, PRIMITIVE}) | NOTE_TYPES
SEED_NAMES = ("seed", "noise_seed")  # the editor adds a control widget to INTs with these names

Key = tuple[str, str]  # (node id, input name)


@dataclass
class Workflow:
    """A loaded workflow: the API prompt to run plus what the conversion learned on the way."""

    prompt: dict[str, dict[str, Any]]
    ui: dict[str, Any] | None = None  # the editor's workflow, embedded in saved PNGs
    source: str = "<workflow>"
    format: str = "api"  # "api", "ui-0.4" or "ui-1"
    problems: list[Problem] = field(default_factory=list)  # found while converting (e.g. dangling links)
    warnings: list[str] = field(default_factory=list)
    hints: dict[Key, str] = field(default_factory=dict)  # why an input has no value (muted/bypassed source)
    widget_slots: dict[Key, int | str] = field(default_factory=dict)  # index (or key) in the UI widgets_values

    @property
    def extra_pnginfo(self) -> dict[str, Any] | None:
        return {"workflow": self.ui} if self.ui is not None else None


def load_workflow(path: str | Path, schemas: Mapping[str, NodeSchema]) -> Workflow:
    """Reads a workflow JSON file (UI or API format), or a PNG saved by ComfyUI / SaveImage."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise WorkflowError(f"{path}: no such file") from None
    except OSError as error:
        raise WorkflowError(f"{path}: cannot read: {error.strerror or error}") from None
    if raw.startswith(b"\x89PNG"):
        return _load_png(path, schemas)
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise WorkflowError(f"{path}: not a text file (expected a workflow .json)") from None
    except json.JSONDecodeError as error:
        raise WorkflowError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    return parse_workflow(data, schemas, source=str(path))


def _load_png(path: Path, schemas: Mapping[str, NodeSchema]) -> Workflow:
    from PIL import Image

    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or {})
    for key in ("workflow", "prompt"):
        if key in text:
            try:
                data = json.loads(text[key])
            except json.JSONDecodeError as error:
                raise WorkflowError(f"{path}: the PNG's '{key}' text is not valid JSON: {error.msg}") from None
            return parse_workflow(data, schemas, source=str(path))
    raise WorkflowError(f"{path}: this PNG carries no ComfyUI workflow (no 'workflow' or 'prompt' text chunk)")


def parse_workflow(data: Any, schemas: Mapping[str, NodeSchema], source: str = "<workflow>") -> Workflow:
    """Accepts the UI format, the API format, or a `/prompt` request body `{"prompt": ..., "extra_data": ...}`."""
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        workflow = ui_to_api(data, schemas)
        workflow.source = source
        return workflow
    if isinstance(data, dict) and is_api_prompt(data.get("prompt")):
        extra = data.get("extra_data") if isinstance(data.get("extra_data"), dict) else {}
        pnginfo = extra.get("extra_pnginfo") if isinstance(extra.get("extra_pnginfo"), dict) else {}
        ui = pnginfo.get("workflow") if isinstance(pnginfo.get("workflow"), dict) else None
        return _api_workflow(data["prompt"], ui, source)
    if is_api_prompt(data):
        return _api_workflow(data, None, source)
    raise WorkflowError(
        f"{source}: not a ComfyUI workflow: expected the editor's format (an object with 'nodes' and 'links') "
        'or the API format ({"<node id>": {"class_type": ..., "inputs": {...}}, ...})'
    )


def is_api_prompt(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and bool(data)
        and all(isinstance(node, dict) for node in data.values())
        and any("class_type" in node or "inputs" in node for node in data.values())
    )


def _api_workflow(data: dict, ui: dict | None, source: str) -> Workflow:
    prompt: dict[str, dict[str, Any]] = {}
    problems = []
    for node_id, node in data.items():
        node = copy.deepcopy(node)
        if not isinstance(node.get("class_type"), str):
            problems.append(Problem("the node has no 'class_type'", node_id=str(node_id)))
        if not isinstance(node.get("inputs", {}), dict):
            problems.append(Problem("'inputs' is not an object", str(node_id), str(node.get("class_type", ""))))
            node["inputs"] = {}
        node.setdefault("inputs", {})
        prompt[str(node_id)] = node
    return Workflow(prompt=prompt, ui=ui, source=source, format="api", problems=problems)


# ---------------------------------------------------------------------------------------------- UI → API


def control_values(item: Input) -> int:
    """How many extra widget values the editor stores after this widget (its control_after_generate)."""
    if item.type == "INT" and (item.control_after_generate or item.name in SEED_NAMES):
        return 1  # the control mode: fixed | increment | decrement | randomize
    if item.type == "COMBO" and item.control_after_generate:
        return 2  # the control mode and the filter list
    return 0


@dataclass(frozen=True)
class _Link:
    origin: str
    slot: int
    type: Any


@dataclass(frozen=True)
class _Resolved:
    origin: str | None = None  # a real node output ...
    slot: int = 0
    has_value: bool = False  # ... or a primitive's value
    value: Any = None
    reason: str = ""  # neither: why (muted / bypassed / nothing connected)


def ui_to_api(ui: dict[str, Any], schemas: Mapping[str, NodeSchema]) -> Workflow:
    """Converts an editor workflow (schema 0.4 or 1) to the API prompt, as the editor does when queueing."""
    ui = copy.deepcopy(ui)
    version = ui.get("version")
    workflow = Workflow(prompt={}, ui=ui, format=f"ui-{version}" if version is not None else "ui")
    problems = workflow.problems

    nodes: dict[str, dict] = {}
    for index, node in enumerate(ui.get("nodes") or []):
        if not isinstance(node, dict) or "id" not in node:
            problems.append(Problem(f"entry {index} of 'nodes' is not a node (no 'id')"))
            continue
        nodes[str(node["id"])] = node

    links: dict[Any, _Link] = {}
    for entry in ui.get("links") or []:
        link = _parse_link(entry)
        if link is None:
            if entry is not None:
                problems.append(Problem(f"malformed link {json.dumps(entry)[:80]}"))
            continue
        link_id, parsed = link
        links[link_id] = parsed

    subgraph_ids = {
        str(s.get("id"))
        for s in ((ui.get("definitions") or {}).get("subgraphs") or [])
        if isinstance(s, dict) and s.get("id") is not None
    }
    resolver = _Resolver(nodes, links, problems)

    for node_id, node in nodes.items():
        class_type = node.get("type")
        if not isinstance(class_type, str):
            problems.append(Problem("the node has no 'type'", node_id=node_id))
            continue
        mode = node.get("mode", 0)
        if class_type in VIRTUAL_TYPES or mode in (MODE_NEVER, MODE_BYPASS):
            continue
        if class_type in subgraph_ids:
            problems.append(
                Problem(
                    "subgraphs are not supported by the headless runner; convert the subgraph back to nodes "
                    "in the editor and save again",
                    node_id,
                    class_type,
                )
            )
            continue
        schema = schemas.get(class_type)
        inputs: dict[str, Any] = {}
        if schema is not None:
            _widget_inputs(node_id, node, schema, inputs, workflow)
        # Links override widget values; in the editor every widget may also have an input slot.
        for slot, ui_input in enumerate(node.get("inputs") or []):
            if not isinstance(ui_input, dict) or ui_input.get("link") is None:
                continue
            name = (ui_input.get("widget") or {}).get("name") or ui_input.get("name")
            resolved = resolver.resolve_input(node_id, slot, ui_input.get("type"))
            if resolved.origin is not None:
                inputs[name] = [resolved.origin, resolved.slot]
            elif resolved.has_value:
                inputs[name] = _wrap(resolved.value)
            elif ui_input.get("widget") and name in inputs:
                pass  # the editor keeps the widget's own value when the link resolves to nothing
            else:
                inputs.pop(name, None)
                if resolved.reason:
                    workflow.hints[(node_id, name)] = resolved.reason
        title = node.get("title") or (schema.display_name if schema is not None else class_type)
        workflow.prompt[node_id] = {"inputs": inputs, "class_type": class_type, "_meta": {"title": title}}
    return workflow


def _parse_link(entry: Any) -> tuple[Any, _Link] | None:
    try:
        if isinstance(entry, dict):  # schema 1
            return entry["id"], _Link(str(entry["origin_id"]), int(entry["origin_slot"]), entry.get("type"))
        if isinstance(entry, list) and len(entry) >= 5:  # schema 0.4: [id, from, from_slot, to, to_slot, type]
            return entry[0], _Link(str(entry[1]), int(entry[2]), entry[5] if len(entry) > 5 else None)
    except (KeyError, TypeError, ValueError):
        return None
    return None


def _wrap(value: Any) -> Any:
    # Lists mean links in the API format; the editor wraps list values, the backend unwraps them.
    return {"__value__": value} if isinstance(value, list) else value


def _widget_inputs(node_id: str, node: dict, schema: NodeSchema, inputs: dict[str, Any], workflow: Workflow) -> None:
    values = node.get("widgets_values")
    if values is None:
        values = []
    if isinstance(values, dict):  # some editors save widgets by name
        for item in schema.widgets:
            if item.name in values:
                inputs[item.name] = _wrap(values[item.name])
                workflow.widget_slots[(node_id, item.name)] = item.name
            elif item.default is not None:
                inputs[item.name] = item.default
        return
    if not isinstance(values, list):
        workflow.problems.append(Problem("'widgets_values' is neither a list nor an object", node_id, schema.node_id))
        return
    position = 0
    for item in schema.widgets:
        if position < len(values):
            inputs[item.name] = _wrap(values[position])
            workflow.widget_slots[(node_id, item.name)] = position
        elif item.default is not None:
            inputs[item.name] = item.default  # the editor fills a widget with no saved value from its default
        position += 1 + control_values(item)
    if position != len(values) and values:
        workflow.warnings.append(
            f"node {node_id} ({schema.node_id}): {len(values)} widget values saved, {position} expected by the "
            "node's inputs; the workflow may come from another version of the node"
        )


class _Resolver:
    """Follows a link back through reroutes, primitives and bypassed nodes, like the editor."""

    def __init__(self, nodes: dict[str, dict], links: dict[Any, _Link], problems: list[Problem]):
        self.nodes = nodes
        self.links = links
        self.problems = problems

    def resolve_input(self, node_id: str, slot: int, want: Any, visited: set | None = None) -> _Resolved:
        visited = set() if visited is None else visited
        if (node_id, "in", slot) in visited:
            return _Resolved(reason="circular reroute or bypass")
        visited.add((node_id, "in", slot))
        node = self.nodes[node_id]
        ui_inputs = node.get("inputs") or []
        if slot >= len(ui_inputs) or not isinstance(ui_inputs[slot], dict):
            return _Resolved(reason="nothing connected")
        ui_input = ui_inputs[slot]
        link_id = ui_input.get("link")
        if link_id is None:
            return _Resolved(reason="nothing connected")
        link = self.links.get(link_id)
        if link is None:
            self.problems.append(
                Problem(f"uses link {link_id}, which is not in the workflow's links", node_id, node.get("type", ""))
            )
            return _Resolved(reason=f"link {link_id} is missing")
        return self.resolve_output(link.origin, link.slot, want if want is not None else ui_input.get("type"), visited)

    def resolve_output(self, node_id: str, slot: int, want: Any, visited: set) -> _Resolved:
        node = self.nodes.get(node_id)
        if node is None:
            return _Resolved(origin=node_id, slot=slot)  # validation reports the missing node
        if (node_id, "out", slot) in visited:
            return _Resolved(reason="circular reroute or bypass")
        visited.add((node_id, "out", slot))
        class_type = node.get("type", "")
        label = f"node {node_id} ({class_type})"
        if node.get("mode", 0) == MODE_BYPASS:
            index = _bypass_input(node, slot, want)
            if index < 0:
                return _Resolved(reason=f"its source, {label}, is bypassed and has no input of type {type_name(want)}")
            resolved = self.resolve_input(node_id, index, want, visited)
            if resolved.origin is None and not resolved.has_value:
                return _Resolved(reason=f"its source, {label}, is bypassed and its matching input has no source")
            return resolved
        if class_type == PRIMITIVE:
            values = node.get("widgets_values")
            if isinstance(values, list) and values:
                return _Resolved(has_value=True, value=values[0])
            return _Resolved(reason=f"its source, primitive {label}, has no value")
        if class_type == REROUTE:
            resolved = self.resolve_input(node_id, slot, want, visited)
            if resolved.origin is None and not resolved.has_value:
                return _Resolved(reason=f"its source, reroute {label}, has no input")
            return resolved
        if class_type in NOTE_TYPES:
            return _Resolved(reason=f"its source, {label}, is a note")
        if node.get("mode", 0) == MODE_NEVER:
            return _Resolved(reason=f"its source, {label}, is muted")
        return _Resolved(origin=node_id, slot=slot)


def _bypass_input(node: dict, slot: int, want: Any) -> int:
    """Which input a bypassed node passes to output `slot` (the editor's `#getBypassSlotIndex`)."""
    inputs = [i if isinstance(i, dict) else {} for i in node.get("inputs") or []]
    outputs = node.get("outputs") or []
    want_name = type_name(want)
    if want_name in ("", ANY):
        return slot if len(inputs) > slot else 0
    output_type = outputs[slot].get("type") if slot < len(outputs) and isinstance(outputs[slot], dict) else ""
    if slot < len(inputs):
        same = inputs[slot].get("type")
        if compatible(same, output_type) and compatible(same, want):
            return slot
    for index, item in enumerate(inputs):
        if type_name(item.get("type")) == want_name:
            return index
    for index, item in enumerate(inputs):
        if compatible(item.get("type"), output_type) and compatible(item.get("type"), want):
            return index
    return -1
