"""`--set NODE_ID.INPUT=VALUE`: override a widget input of the converted prompt, the value parsed by the input's type.

The UI workflow (embedded in saved PNGs) gets the same value, so a saved image reloads with the settings that
made it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..nodes.schema import NodeSchema
from .errors import Problem
from .validate import parse_text
from .workflow import Workflow


@dataclass(frozen=True)
class Override:
    node_id: str
    input: str
    text: str

    def __str__(self) -> str:
        return f"{self.node_id}.{self.input}={self.text}"


def parse_override(item: str) -> Override:
    """Parses `NODE_ID.INPUT=VALUE`; raises ValueError with a readable message."""
    target, sep, text = item.partition("=")
    node_id, dot, name = target.strip().rpartition(".")
    if not sep or not dot or not node_id or not name:
        raise ValueError(f"--set {item!r}: expected NODE_ID.INPUT=VALUE, e.g. --set 3.seed=42")
    return Override(node_id, name, text)


def apply_overrides(
    workflow: Workflow, overrides: Iterable[Override], schemas: Mapping[str, NodeSchema]
) -> list[Problem]:
    """Sets each override in `workflow.prompt` (and the UI's widget values); returns the problems found."""
    problems = []
    for override in overrides:
        node = workflow.prompt.get(override.node_id)
        if node is None:
            problems.append(
                Problem(
                    f"--set {override}: the prompt has no node {override.node_id} "
                    "(not in the workflow, or muted/bypassed/virtual)",
                    node_id=override.node_id,
                    input=override.input,
                )
            )
            continue
        class_type = node.get("class_type", "")
        schema = schemas.get(class_type)
        if schema is None:
            continue  # validation reports the unknown node type
        item = next((i for i in schema.inputs if i.name == override.input), None)
        if item is None:
            names = ", ".join(i.name for i in schema.widgets) or "none"
            problems.append(
                Problem(
                    f"--set {override}: no such input (widget inputs: {names})",
                    override.node_id,
                    class_type,
                    override.input,
                )
            )
            continue
        if not item.is_widget:
            problems.append(
                Problem(
                    f"--set {override}: '{item.name}' takes a link ({item.type}), not a value",
                    override.node_id,
                    class_type,
                    override.input,
                )
            )
            continue
        try:
            value = parse_text(item, override.text)
        except ValueError as error:
            problems.append(Problem(f"--set {override}: {error}", override.node_id, class_type, override.input))
            continue
        node.setdefault("inputs", {})[item.name] = value
        _set_ui_value(workflow, override.node_id, item.name, value)
    return problems


def _set_ui_value(workflow: Workflow, node_id: str, name: str, value: Any) -> None:
    slot = workflow.widget_slots.get((node_id, name))
    if workflow.ui is None or slot is None:
        return
    for node in workflow.ui.get("nodes") or []:
        if isinstance(node, dict) and str(node.get("id")) == node_id:
            values = node.get("widgets_values")
            if isinstance(values, (list, dict)):
                values[slot] = value
            return
