"""Headless workflow runner: `python -m lora_loom run WORKFLOW.json` (see `cli.py`).

Load (`workflow.load_workflow`, UI→API conversion), override (`overrides`), validate (`validate`), execute
with an output cache (`execute.Runner`); SaveImage/PreviewImage headless (`core_nodes`).
"""

from .core_nodes import PreviewImage, SaveImage, core_node_classes
from .errors import NodeExecutionError, Problem, ValidationFailed, WorkflowError
from .execute import Runner, RunResult
from .validate import Validation, validate_prompt
from .workflow import Workflow, load_workflow, parse_workflow, ui_to_api

__all__ = [
    "NodeExecutionError",
    "PreviewImage",
    "Problem",
    "RunResult",
    "Runner",
    "SaveImage",
    "ValidationFailed",
    "Validation",
    "Workflow",
    "WorkflowError",
    "core_node_classes",
    "load_workflow",
    "parse_workflow",
    "ui_to_api",
    "validate_prompt",
]
