"""Command line: `python -m lora_loom run WORKFLOW.json …` and `python -m lora_loom demo`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    # transformers warns about optional image processors (torchvision) we never use; keep the CLI quiet.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "run":  # the runner parses its own options
        from .runner.cli import main as run_main

        return run_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m lora_loom", description="LoRA Loom headless tools")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run a workflow (UI or API format) headlessly; see `run --help`")
    demo = commands.add_parser("demo", help="apply, re-weight, stack and restore LoRAs on a built-in tiny base")
    demo.add_argument("--models-dir", type=Path, default=Path("models"), help="ComfyUI-style models folder")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.models_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
