"""Validating an API prompt against the node schemas before anything runs, collecting every problem.

Follows ComfyUI's `execution.validate_prompt` / `validate_inputs`: unknown node types fail the prompt, the
prompt needs an output node, and the nodes the outputs depend on are checked input by input (required
inputs present, links to existing nodes and output slots of a compatible type, constants converted to the
input's type, min/max, COMBO choices; a class's `VALIDATE_INPUTS` takes over the checks for the inputs it
names). Differences, on purpose: every problem is collected (ComfyUI stops at the first unknown node), a
prompt with any problem runs nothing (ComfyUI runs the outputs that did validate), cycles are reported here
(ComfyUI finds them while executing), and BOOLEAN/INT conversion is strict ("false" is False, 2.5 is no INT).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..nodes.schema import Input, NodeSchema
from .errors import Problem
from .slot_types import ANY, compatible

# Model folder of a COMBO input whose choices are a model listing (for "file X not found in folder Y").
_FOLDER_OF_CHOICES = {"checkpoint_choices": "checkpoints", "lora_choices": "loras"}
_MAX_LISTED = 20  # ComfyUI does not print longer choice lists either


@dataclass
class Validation:
    problems: list[Problem] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # output node ids
    order: list[str] = field(default_factory=list)  # the nodes the outputs need, dependencies first
    prompt: dict[str, dict[str, Any]] = field(default_factory=dict)  # values converted to their input types

    @property
    def ok(self) -> bool:
        return not self.problems


def is_link(value: Any) -> bool:
    return isinstance(value, list)


def validate_prompt(
    prompt: Mapping[str, Mapping[str, Any]],
    schemas: Mapping[str, NodeSchema],
    classes: Mapping[str, type] | None = None,
    *,
    hints: Mapping[tuple[str, str], str] | None = None,
    models_dir: str | Path | None = None,
) -> Validation:
    """Checks `prompt`; `classes` (when given) must implement every node type used.

    `hints` explain absent inputs (from the UI conversion: "its source is muted"); `models_dir` names the
    folder in "model file not found" messages.
    """
    result = Validation(prompt=copy.deepcopy(dict(prompt)))
    hints = hints or {}
    work = result.prompt

    known: dict[str, NodeSchema] = {}
    for node_id, node in work.items():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        if not isinstance(class_type, str):
            result.problems.append(Problem("the node has no 'class_type'", node_id=node_id))
            continue
        schema = schemas.get(class_type)
        if schema is None:
            result.problems.append(Problem(f"unknown node type '{class_type}'", node_id, class_type))
            continue
        if classes is not None and class_type not in classes:
            result.problems.append(
                Problem(f"no implementation is registered for node type '{class_type}'", node_id, class_type)
            )
        if not isinstance(node.get("inputs"), dict):
            node["inputs"] = {}
        known[node_id] = schema
        if schema.output_node:
            result.outputs.append(node_id)

    if not result.outputs:
        result.problems.append(Problem("the workflow has no output node (e.g. SaveImage), so nothing would run"))
        return result

    needed = _needed(result.outputs, work, known)
    for node_id in needed:
        _validate_node(node_id, work, known, classes, hints, models_dir, result.problems)

    order, cycles = _order(result.outputs, work, known)
    for cycle in cycles:
        result.problems.append(cycle)
    result.order = order
    return result


def _needed(outputs: list[str], prompt: dict, known: dict[str, NodeSchema]) -> list[str]:
    seen: dict[str, None] = {}
    stack = list(reversed(outputs))
    while stack:
        node_id = stack.pop()
        if node_id in seen or node_id not in known:
            continue
        seen[node_id] = None
        for value in prompt[node_id]["inputs"].values():
            if is_link(value) and len(value) == 2 and str(value[0]) in prompt:
                stack.append(str(value[0]))
    return list(seen)


def _validate_node(
    node_id: str,
    prompt: dict,
    known: dict[str, NodeSchema],
    classes: Mapping[str, type] | None,
    hints: Mapping[tuple[str, str], str],
    models_dir: str | Path | None,
    problems: list[Problem],
) -> None:
    schema = known[node_id]
    class_type = schema.node_id
    inputs = prompt[node_id]["inputs"]
    cls = classes.get(class_type) if classes is not None else None
    custom = _custom_validation(cls)
    custom_names = set(custom[1]) if custom else set()
    custom_all = bool(custom and custom[2])

    def report(item: Input, message: str) -> None:
        problems.append(Problem(message, node_id, class_type, item.name))

    received_types: dict[str, str] = {}
    ordered = [i for i in schema.inputs if not i.optional] + [i for i in schema.inputs if i.optional]
    for item in ordered:
        if item.name not in inputs:
            if not item.optional:
                hint = hints.get((node_id, item.name))
                report(item, "required input is missing" + (f" ({hint})" if hint else ""))
            continue
        value = inputs[item.name]
        if is_link(value):
            received = _check_link(item, value, prompt, known, report, skip_type="input_types" in custom_names)
            if received is not None:
                received_types[item.name] = received
            continue
        if not item.is_widget:
            report(item, f"expects a link from a {item.type} output, got the value {_short(value)}")
            continue
        if isinstance(value, dict) and "__value__" in value:
            value = value["__value__"]
        try:
            value = convert(item, value)
        except ValueError as error:
            report(item, str(error))
            continue
        inputs[item.name] = value
        if custom_all or item.name in custom_names:
            continue
        message = check_value(item, value, models_dir)
        if message:
            report(item, message)

    if custom is not None:
        _run_custom_validation(custom, inputs, received_types, node_id, class_type, problems)


def _check_link(item: Input, value: list, prompt: dict, known: dict[str, NodeSchema], report, skip_type: bool):
    if len(value) != 2 or not isinstance(value[1], int) or isinstance(value[1], bool):
        report(item, f"bad link {_short(value)}: must be [node_id, output_index]")
        return None
    source, slot = str(value[0]), value[1]
    if source not in prompt:
        report(item, f"linked to node {source}, which is not in the workflow")
        return None
    source_schema = known.get(source)
    if source_schema is None:
        return None  # unknown type: reported on its own
    outputs = source_schema.outputs
    label = f"node {source} ({source_schema.node_id})"
    if not 0 <= slot < len(outputs):
        report(item, f"linked to output {slot} of {label}, which has {len(outputs)} output(s)")
        return None
    output = outputs[slot]
    if not skip_type and not _link_type_ok(output.type, item):
        report(
            item,
            f"type mismatch: linked to output {slot} '{output.name}' of {label}, which gives {output.type}; "
            f"this input takes {item.type}",
        )
    return output.type


def _link_type_ok(output_type: str, item: Input) -> bool:
    if item.is_widget:  # a widget input converted to a link takes exactly its own type
        return output_type in (item.type, ANY)
    return compatible(output_type, item.type)


# -------------------------------------------------------------------------------------------- values


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def parse_text(item: Input, text: str) -> Any:
    """Text (a `--set` value, or a string in a prompt) as a value of the input's type; raises ValueError.

    The one rule for text: INT takes Python literals (`42`, `0x10`) and integral floats (`1e3`), FLOAT any
    float, BOOLEAN true/false/1/0/yes/no/on/off; STRING and COMBO keep the text."""
    if item.type == "INT":
        try:
            return int(text.strip(), 0)
        except ValueError:
            pass
        try:
            number = float(text)  # "1e3", "042"
        except ValueError:
            number = float("nan")
        if not number.is_integer():
            raise ValueError(f"{text!r} is not an integer")
        return int(number)
    if item.type == "FLOAT":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if item.type == "BOOLEAN":
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"{text!r} is not a boolean (use true or false)")
    return text  # STRING, COMBO


_KIND_NAMES = {"INT": "an INT", "FLOAT": "a FLOAT", "BOOLEAN": "a BOOLEAN", "STRING": "a STRING"}


def convert(item: Input, value: Any) -> Any:
    """A constant as the input's type (ComfyUI converts with int()/float()/str()/bool(); we refuse lossy cases).
    Text goes through `parse_text`, the rule the command line's `--set` uses too."""
    kind = item.type
    if isinstance(value, str) and kind in ("INT", "FLOAT", "BOOLEAN"):
        try:
            return parse_text(item, value)
        except ValueError:
            raise ValueError(f"expects {_KIND_NAMES[kind]}, got {_short(value)}") from None
    if kind == "INT":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind == "FLOAT":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind == "BOOLEAN":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif kind == "STRING":
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif kind == "COMBO":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return value
        raise ValueError(f"expects one of the choices, got {_short(value)}")
    else:
        return value
    raise ValueError(f"expects {_KIND_NAMES[kind]}, got {_short(value)}")


def check_value(item: Input, value: Any, models_dir: str | Path | None = None) -> str:
    """The range or choice problem with a converted value, or ""."""
    if item.type in ("INT", "FLOAT"):
        if isinstance(value, float) and math.isnan(value):
            return "value is NaN"
        if item.min is not None and value < item.min:
            return f"value {value} is smaller than the minimum {_number(item.min)}"
        if item.max is not None and value > item.max:
            return f"value {value} is bigger than the maximum {_number(item.max)}"
    if item.type == "COMBO":
        choices = item.choices()
        if value in choices:
            return ""
        folder = model_folder(item)
        if folder is not None:
            where = str(Path(models_dir) / folder) if models_dir is not None else f"the '{folder}' models folder"
            files = [c for c in choices if not c.endswith("(built-in)")]
            if files:
                listed = ", ".join(files[:_MAX_LISTED]) + (", ..." if len(files) > _MAX_LISTED else "")
                there = f"{len(files)} file(s) there: {listed}"
            else:
                there = "it is empty or does not exist"
            return f"model file '{value}' not found in {where} ({there})"
        if len(choices) > _MAX_LISTED:
            return f"'{value}' is not one of the {len(choices)} choices"
        return f"'{value}' is not one of {', '.join(repr(c) for c in choices) or 'no choices'}"
    return ""


def model_folder(item: Input) -> str | None:
    """The model folder ("checkpoints", "loras") a COMBO lists, if its choices are a model listing."""
    options = item.options
    if not callable(options):
        return None
    folder = getattr(options, "model_folder", None)
    if isinstance(folder, str):
        return folder
    return _FOLDER_OF_CHOICES.get(getattr(options, "__name__", ""))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# ----------------------------------------------------------------------------- VALIDATE_INPUTS (V1 classes)


def _custom_validation(cls: type | None):
    function = getattr(cls, "VALIDATE_INPUTS", None) if cls is not None else None
    if function is None:
        return None
    spec = inspect.getfullargspec(function)
    names = [a for a in spec.args if a not in ("self", "cls", "s")] + list(spec.kwonlyargs)
    return function, names, spec.varkw is not None


def _run_custom_validation(custom, inputs, received_types, node_id, class_type, problems) -> None:
    function, names, takes_all = custom
    arguments = {}
    for name, value in inputs.items():
        if takes_all or name in names:
            arguments[name] = None if is_link(value) else value
    if "input_types" in names:
        arguments["input_types"] = received_types
    try:
        outcome = function(**arguments)
    except Exception as error:  # noqa: BLE001 - any failure is a validation failure of this node
        problems.append(Problem(f"VALIDATE_INPUTS raised {type(error).__name__}: {error}", node_id, class_type))
        return
    if outcome is not True:
        detail = f": {outcome}" if outcome is not False and outcome is not None else ""
        problems.append(Problem(f"custom validation failed{detail}", node_id, class_type))


# ------------------------------------------------------------------------------------- order and cycles


def _order(outputs: list[str], prompt: dict, known: dict[str, NodeSchema]) -> tuple[list[str], list[Problem]]:
    """Dependencies first (depth-first from the outputs, inputs in schema order); cycles as problems."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles: list[Problem] = []
    reported: set[frozenset] = set()

    def upstream(node_id: str) -> list[tuple[str, str]]:
        inputs = prompt[node_id]["inputs"]
        found = []
        for item in known[node_id].inputs:
            value = inputs.get(item.name)
            if is_link(value) and len(value) == 2 and str(value[0]) in known:
                found.append((item.name, str(value[0])))
        return found

    for output in outputs:
        if output in state:
            continue
        # Iterative depth-first search; the path holds (node, input name that led here, iterator).
        state[output] = 1
        path: list[tuple[str, Any]] = [(output, iter(upstream(output)))]
        while path:
            node_id, edges = path[-1]
            step = next(edges, None)
            if step is None:
                state[node_id] = 2
                order.append(node_id)
                path.pop()
                continue
            name, source = step
            if state.get(source) == 1:
                members = [n for n, _ in path]
                loop = members[members.index(source) :]
                if frozenset(loop) not in reported:
                    reported.add(frozenset(loop))
                    flow = [*loop[::-1], node_id]  # in the direction data flows
                    chain = " -> ".join(f"{n} ({known[n].node_id})" for n in flow)
                    cycles.append(Problem(f"dependency cycle: {chain}", node_id, known[node_id].node_id, name))
                continue
            if source not in state:
                state[source] = 1
                path.append((source, iter(upstream(source))))
    return order, cycles
