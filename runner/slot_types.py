"""Slot type compatibility: may an output of one type feed an input of another?

Types are strings like ComfyUI's, possibly comma-separated unions ("INT,FLOAT"); "*" (and "" in the editor)
accept anything. Comparison is the editor's (LiteGraph.isValidConnection: case-insensitive, any overlap of
the comma-separated sets); the backend's `validate_node_input` is the same overlap test, case-sensitive.
"""

from __future__ import annotations

from typing import Any

ANY = "*"


def type_name(slot_type: Any) -> str:
    """A UI slot type as a string (workflows may store lists or numbers for legacy custom types)."""
    if isinstance(slot_type, (list, tuple)):
        return "COMBO"
    return "" if slot_type is None else str(slot_type)


def compatible(output_type: Any, input_type: Any) -> bool:
    a, b = type_name(output_type), type_name(input_type)
    if a in ("", ANY) or b in ("", ANY) or a == b:
        return True
    left = {t.strip().lower() for t in a.split(",")}
    right = {t.strip().lower() for t in b.split(",")}
    return ANY in left or ANY in right or bool(left & right)
