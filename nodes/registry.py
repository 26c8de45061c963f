"""ComfyUI V1 node classes, generated from the schemas in `contract.py` (one source of truth)."""

from __future__ import annotations

from collections.abc import Callable

from .contract import NODES
from .impl import CHANGE_CHECKS, IMPLEMENTATIONS
from .schema import NodeSchema, grad_mode, host_hidden, v1_input_types


def v1_class(schema: NodeSchema, function: Callable, changed: Callable | None = None) -> type:
    """A classic ComfyUI node class whose `execute(**inputs)` calls `function`."""

    def input_types(cls) -> dict:
        return v1_input_types(schema)

    unasked = [name for name in host_hidden(schema) if name not in dict(schema.hidden)]

    def execute(self, **inputs):
        for name in unasked:  # the host passes every declared hidden input
            inputs.pop(name, None)
        if schema.needs_grad:  # the host runs every node under inference mode; a training node steps out
            with grad_mode(schema):
                return function(**inputs)
        return function(**inputs)

    attributes = {}
    if changed is not None:
        attributes["IS_CHANGED"] = classmethod(lambda cls, **inputs: changed(**inputs))
    return type(
        schema.node_id,
        (),
        {
            **attributes,
            "INPUT_TYPES": classmethod(input_types),
            "RETURN_TYPES": tuple(o.type for o in schema.outputs),
            "RETURN_NAMES": tuple(o.name for o in schema.outputs),
            "OUTPUT_TOOLTIPS": tuple(o.tooltip for o in schema.outputs),
            "FUNCTION": "execute",
            "CATEGORY": schema.category,
            "DESCRIPTION": schema.description,
            "OUTPUT_NODE": schema.output_node,
            "SCHEMA": schema,
            "execute": execute,
        },
    )


NODE_CLASS_MAPPINGS: dict[str, type] = {
    s.node_id: v1_class(s, IMPLEMENTATIONS[s.node_id], CHANGE_CHECKS.get(s.node_id)) for s in NODES
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {s.node_id: s.display_name for s in NODES}
