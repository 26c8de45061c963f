"""The runner's default node set: LoRA Loom's contract and registry, plus the headless core nodes."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path

from ..nodes.schema import NodeSchema
from .core_nodes import core_node_classes


def default_schemas(classes: Mapping[str, type] | None = None) -> dict[str, NodeSchema]:
    """`contract.NODES` + `contract.CORE_NODES`, plus the `SCHEMA` of any class not in the contract."""
    from ..nodes.contract import CORE_NODES, NODES

    schemas = {schema.node_id: schema for schema in (*NODES, *CORE_NODES)}
    for name, cls in (classes or {}).items():
        schema = getattr(cls, "SCHEMA", None)
        if isinstance(schema, NodeSchema):
            schemas.setdefault(name, schema)
    return schemas


def registered_classes() -> dict[str, type]:
    """`nodes.registry.NODE_CLASS_MAPPINGS`, or {} while that module does not exist yet."""
    package = __package__.rsplit(".", 1)[0]  # "lora_loom" (or whatever name the host imported us under)
    try:
        registry = importlib.import_module(f"{package}.nodes.registry")
    except ModuleNotFoundError as error:
        if error.name == f"{package}.nodes.registry":
            return {}
        raise
    return dict(getattr(registry, "NODE_CLASS_MAPPINGS", {}))


def default_classes(output_dir: str | Path, temp_dir: str | Path) -> dict[str, type]:
    """Registered node classes plus SaveImage/PreviewImage writing to these folders."""
    return {**registered_classes(), **core_node_classes(output_dir, temp_dir)}
