"""Command line: `python -m lora_loom demo`."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_loom", description="LoRA Loom headless tools")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="apply, re-weight, stack and restore LoRAs on a built-in tiny base")
    demo.add_argument("--models-dir", type=Path, default=Path("models"), help="ComfyUI-style models folder")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.models_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
