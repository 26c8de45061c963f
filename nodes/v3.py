"""ComfyUI V3 node classes (`comfy_api.latest.io`), generated from the schemas in `contract.py`.

The same contract as the V1 classes in `registry.py` (ids, inputs and their order, widget settings, outputs),
so a workflow saved with either runs with the other. Imported only where the host has `comfy_api`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable

from .contract import NODES
from .impl import CHANGE_CHECKS, IMPLEMENTATIONS
from .paths import in_host
from .schema import Input, NodeSchema, grad_mode

NODE_API_VARIABLE = "LORA_LOOM_NODE_API"  # "v1" keeps the V1 classes in a host that has V3


def serve_v3() -> bool:
    """True inside a host with `comfy_api.latest` (unless LORA_LOOM_NODE_API=v1); headless and on older hosts: V1."""
    if os.environ.get(NODE_API_VARIABLE, "").lower() == "v1" or not in_host():
        return False
    try:
        return importlib.util.find_spec("comfy_api.latest") is not None
    except ImportError:  # no comfy_api package at all
        return False


def v3_input(io, item: Input):
    """One contract input as the V3 input object the host serialises to the same `/object_info` entry."""
    common = {"optional": item.optional or None, "tooltip": item.tooltip or None}
    if item.type == "INT":
        return io.Int.Input(
            item.name,
            default=item.default,
            min=item.min,
            max=item.max,
            step=item.step,
            control_after_generate=item.control_after_generate or None,
            **common,
        )
    if item.type == "FLOAT":
        return io.Float.Input(item.name, default=item.default, min=item.min, max=item.max, step=item.step, **common)
    if item.type == "STRING":
        return io.String.Input(item.name, default=item.default, multiline=item.multiline or None, **common)
    if item.type == "BOOLEAN":
        return io.Boolean.Input(item.name, default=item.default, **common)
    if item.type == "COMBO":
        return _list_combo(io)(item.name, options=item.choices(), default=item.default, **common)
    return io.Custom(item.type).Input(item.name, **common)  # a link: SD_BASE, LORA, IMAGE, MODEL, …


@functools.cache
def _list_combo(io) -> type:
    """A V3 combo that the host describes as V1 does, `[options], {default, tooltip}`: the same `/object_info`
    for both APIs (the host validates either spelling)."""

    class ListCombo(io.Combo.Input):
        def get_io_type(self):
            return list(self.options)

        def as_dict(self):
            described = super().as_dict()
            described.pop("options", None)
            described.pop("multiselect", None)
            return described

    return ListCombo


def v3_class(schema: NodeSchema, function: Callable, changed: Callable | None = None) -> type:
    """A V3 `ComfyNode` whose `execute(**inputs)` calls `function`, as the V1 class does."""
    from comfy_api.latest import io

    hidden = {name: getattr(io.Hidden, value.lower()) for name, value in schema.hidden}

    def define_schema(cls):
        return io.Schema(
            node_id=schema.node_id,
            display_name=schema.display_name,
            category=schema.category,
            description=schema.description,
            inputs=[v3_input(io, item) for item in schema.inputs],  # COMBO lists are read anew each time
            outputs=[io.Custom(o.type).Output(display_name=o.name, tooltip=o.tooltip or None) for o in schema.outputs],
            hidden=list(hidden.values()) or None,
            is_output_node=schema.output_node,
        )

    def execute(cls, **inputs):
        for name, which in hidden.items():
            inputs[name] = getattr(cls.hidden, which.name)
        with grad_mode(schema) if schema.needs_grad else contextlib.nullcontext():
            result = function(**inputs)
        if isinstance(result, dict):
            return io.NodeOutput(*result.get("result", ()), ui=result.get("ui"))
        return io.NodeOutput(*result)

    # (No `SCHEMA` attribute as on our V1 classes: in a V3 class the host keeps its own io.Schema under that name.)
    attributes = {"define_schema": classmethod(define_schema), "execute": classmethod(execute)}
    if changed is not None:
        attributes["fingerprint_inputs"] = classmethod(lambda cls, **inputs: changed(**inputs))
    return type(schema.node_id, (io.ComfyNode,), attributes)


def v3_node_list() -> list[type]:
    return [v3_class(s, IMPLEMENTATIONS[s.node_id], CHANGE_CHECKS.get(s.node_id)) for s in NODES]


async def comfy_entrypoint():
    """The host's V3 entry point: our nodes as one `ComfyExtension`."""
    from comfy_api.latest import ComfyExtension

    class LoRALoomExtension(ComfyExtension):
        async def get_node_list(self) -> list[type]:
            return v3_node_list()

    return LoRALoomExtension()
