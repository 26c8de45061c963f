"""The node contract as data: ids, inputs (with widget settings) and outputs, in one place.

Shaped after ComfyUI's V3 schema (`comfy_api.latest.io`): one `NodeSchema` per node. From it we
derive the classic V1 class attributes (`INPUT_TYPES`, `RETURN_TYPES`, ...), the headless runner's
validation and the UI→API workflow conversion, so the three can never disagree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# Input types the editor draws as widgets (values live in the node); all others are links.
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})


@dataclass(frozen=True)
class Input:
    """One node input. `options` (COMBO) may be a callable, evaluated when the list is needed."""

    name: str
    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: Sequence[str] | Callable[[], Sequence[str]] | None = None
    multiline: bool = False
    optional: bool = False
    control_after_generate: bool = False  # seed-like INT: the editor stores one extra widget value
    tooltip: str = ""

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    def choices(self) -> list[str]:
        options = self.options() if callable(self.options) else self.options
        return list(options or [])


@dataclass(frozen=True)
class Output:
    type: str
    name: str
    tooltip: str = ""


@dataclass(frozen=True)
class NodeSchema:
    node_id: str
    display_name: str
    category: str
    description: str
    inputs: tuple[Input, ...]
    outputs: tuple[Output, ...] = ()
    output_node: bool = False
    # The node trains: it runs with autograd on, outside `torch.inference_mode()` (which the host and the
    # runner use for every other node; tensors made there cannot be saved for backward).
    needs_grad: bool = False
    hidden: tuple[tuple[str, str], ...] = ()  # (argument name, host value: "UNIQUE_ID", "PROMPT", ...)

    def input(self, name: str) -> Input:
        for item in self.inputs:
            if item.name == name:
                return item
        raise KeyError(f"{self.node_id} has no input {name!r}")

    @property
    def widgets(self) -> list[Input]:
        """Widget inputs in the order the editor stores their values (required, then optional)."""
        ordered = [i for i in self.inputs if not i.optional] + [i for i in self.inputs if i.optional]
        return [i for i in ordered if i.is_widget]


# The host's V3 schema gives every output node these hidden inputs; the V1 classes declare them too, so both APIs
# describe a node alike. A node that does not ask for them (`NodeSchema.hidden`) never sees them.
OUTPUT_NODE_HIDDEN = (("prompt", "PROMPT"), ("extra_pnginfo", "EXTRA_PNGINFO"))


def host_hidden(schema: NodeSchema) -> dict[str, str]:
    """The hidden inputs the host describes for a node: its own, then (output nodes) the prompt and PNG info."""
    hidden = dict(schema.hidden)
    if schema.output_node:
        for name, value in OUTPUT_NODE_HIDDEN:
            hidden.setdefault(name, value)
    return hidden


def v1_input_types(schema: NodeSchema) -> dict[str, dict[str, tuple]]:
    """ComfyUI's classic `INPUT_TYPES()` dict for a schema."""
    result: dict[str, dict[str, tuple]] = {"required": {}}
    for item in schema.inputs:
        section = result.setdefault("optional" if item.optional else "required", {})
        if item.type == "COMBO":
            options: dict[str, Any] = {"tooltip": item.tooltip} if item.tooltip else {}
            if item.default is not None:
                options["default"] = item.default
            section[item.name] = (item.choices(), options)
            continue
        options = {
            k: v
            for k, v in (("default", item.default), ("min", item.min), ("max", item.max), ("step", item.step))
            if v is not None
        }
        if item.multiline:
            options["multiline"] = True
        if item.control_after_generate:
            options["control_after_generate"] = True
        if item.tooltip:
            options["tooltip"] = item.tooltip
        section[item.name] = (item.type, options)  # always a dict, as the host's V3 nodes describe it
    hidden = host_hidden(schema)
    if hidden:
        result["hidden"] = hidden
    return result


@contextlib.contextmanager
def grad_mode(schema: NodeSchema) -> Iterator[None]:
    """The autograd context a node runs in: autograd on for `needs_grad` nodes, inference mode otherwise."""
    import torch

    if schema.needs_grad:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    else:
        with torch.inference_mode():
            yield
