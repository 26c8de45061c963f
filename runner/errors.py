"""Errors the runner reports: one `Problem` per finding, always naming the node, its type and the input."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One validation finding. `node_id`/`class_type`/`input` are empty where they do not apply."""

    message: str
    node_id: str = ""
    class_type: str = ""
    input: str = ""

    def __str__(self) -> str:
        where = []
        if self.node_id:
            where.append(f"node {self.node_id}" + (f" ({self.class_type})" if self.class_type else ""))
        if self.input:
            where.append(f"input '{self.input}'")
        return (", ".join(where) + ": " if where else "") + self.message


class WorkflowError(Exception):
    """The file cannot be read as a workflow at all (missing, invalid JSON, not a ComfyUI workflow)."""


class ValidationFailed(Exception):
    """The prompt failed validation; nothing was executed."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class NodeExecutionError(Exception):
    """A node raised while executing. The original exception is `__cause__`."""

    def __init__(self, node_id: str, class_type: str, error: BaseException):
        self.node_id = node_id
        self.class_type = class_type
        self.error = error
        super().__init__(f"node {node_id} ({class_type}) failed: {type(error).__name__}: {error}")
