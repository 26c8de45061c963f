"""`python -m lora_loom run WORKFLOW.json`: validate a ComfyUI workflow, run it headless, report what it wrote.

Exit codes: 0 done; 1 a node failed while running; 2 the workflow or the command line is invalid (then
nothing ran and nothing was written); 130 interrupted (Ctrl-C; a TrainLoRA run saved its state and resumes
when the same workflow runs again).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path

from .errors import NodeExecutionError, Problem, WorkflowError
from .execute import Runner, RunResult
from .overrides import apply_overrides, parse_override
from .workflow import Workflow, load_workflow

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lora_loom run",
        description="Run a ComfyUI workflow (editor or API format) headless with LoRA Loom's nodes.",
    )
    parser.add_argument("workflow", type=Path, help="workflow .json (editor or API format), or a PNG saved by ComfyUI")
    parser.add_argument("--models-dir", type=Path, default=Path("models"), help="has checkpoints/ and loras/")
    parser.add_argument("--output-dir", type=Path, default=Path("output"), help="where SaveImage writes")
    parser.add_argument(
        "--input-dir", type=Path, default=Path("input"), help="where relative dataset folders (TrainLoRA) are"
    )
    parser.add_argument(
        "--temp-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "lora_loom" / "temp",
        help="where PreviewImage writes",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NODE_ID.INPUT=VALUE",
        help="override a widget value, e.g. --set 3.seed=42 (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error (argparse printed it)
        return exit_.code if isinstance(exit_.code, int) else EXIT_INVALID
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    from ..nodes import paths
    from .defaults import default_classes, default_schemas

    paths.set_models_dir(args.models_dir)  # COMBO choices of model files come from here
    paths.set_input_dir(args.input_dir)
    classes = default_classes(args.output_dir, args.temp_dir)
    schemas = default_schemas(classes)

    try:
        workflow = load_workflow(args.workflow, schemas)
    except WorkflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID

    problems: list[Problem] = list(workflow.problems)
    overrides = []
    for item in args.overrides:
        try:
            overrides.append(parse_override(item))
        except ValueError as error:
            problems.append(Problem(str(error)))
    problems += apply_overrides(workflow, overrides, schemas)

    if args.no_progress:
        from ..nodes.progress import show_headless_progress

        show_headless_progress(False)
    runner = Runner(schemas, classes, progress=not args.no_progress, models_dir=args.models_dir)
    validation = runner.validate(workflow.prompt, workflow.hints)
    problems += validation.problems
    for warning in workflow.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if problems:
        print(f"error: {workflow.source}: {len(problems)} problem(s), nothing was run:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_INVALID

    try:
        result = runner.run(workflow.prompt, extra_pnginfo=workflow.extra_pnginfo, validation=validation)
    except NodeExecutionError as error:
        from ..training.trainer import TrainingInterrupted

        if isinstance(error.error, TrainingInterrupted):  # Ctrl-C during training: the state is saved
            print(f"node {error.node_id} ({error.class_type}): {error.error}", file=sys.stderr)
            return EXIT_INTERRUPTED
        traceback.print_exception(type(error.error), error.error, error.error.__traceback__, file=sys.stderr)
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(summary(result, workflow, args.output_dir, args.temp_dir))
    return EXIT_OK


def summary(result: RunResult, workflow: Workflow, output_dir: Path, temp_dir: Path) -> str:
    """What the run wrote, one line per file, and a count of nodes run."""
    lines = []
    for node_id, ui in result.ui.items():
        class_type = workflow.prompt[node_id]["class_type"]
        for key, value in ui.items():
            if key == "images" and isinstance(value, list):
                for image in value:
                    root = temp_dir if image.get("type") == "temp" else output_dir
                    path = root / image.get("subfolder", "") / image.get("filename", "")
                    kind = "preview" if image.get("type") == "temp" else "saved"
                    lines.append(f"{kind}: {path}  (node {node_id} {class_type})")
            else:
                text = json.dumps(value, default=str)
                lines.append(f"node {node_id} ({class_type}) {key}: {text[:200]}")
    cached = f", {len(result.cached)} cached" if result.cached else ""
    lines.append(f"done: {len(result.executed)} node(s) run{cached} in {result.seconds:.1f} s")
    return "\n".join(lines)
