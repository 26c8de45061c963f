"""Run the tests that need a real ComfyUI (tests/test_comfy_host.py) in the host's own Python.

    python scripts/host_tests.py --comfyui /path/to/ComfyUI [--python /path/to/ComfyUI/venv/bin/python] [-- pytest args]

Needs a ComfyUI checkout (Comfy-Org/ComfyUI) with its requirements installed in that Python (ComfyUI imports
torchvision: on a CPU-only machine with the CPU wheel of torch 2.13, install the matching pair `torch==2.14.1
torchvision==0.29.1` there), plus this pack's requirements. The script installs this checkout into that Python
(`pip install --no-deps -e .`) if `lora_loom` does not import there, links it into ComfyUI's `custom_nodes/`
(as `lora_loom`, for the tests that start the server) and runs pytest with LORA_LOOM_COMFYUI set. Exit code:
pytest's. Checked with ComfyUI a125cd8 (0.3.64).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_LINK = "lora_loom"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="the ComfyUI checkout")
    parser.add_argument("--python", default=sys.executable, help="the Python ComfyUI runs with")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)
    comfyui = args.comfyui.resolve()
    if not (comfyui / "comfy" / "model_patcher.py").is_file():
        raise SystemExit(f"{comfyui} is not a ComfyUI checkout (no comfy/model_patcher.py)")
    probe = subprocess.run([args.python, "-c", "import lora_loom"], capture_output=True, cwd="/")
    if probe.returncode != 0:
        subprocess.run([args.python, "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)], check=True)
    link = comfyui / "custom_nodes" / PACK_LINK
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    elif link.resolve() != ROOT:
        raise SystemExit(f"{link} exists and is not this checkout")
    env = {**os.environ, "LORA_LOOM_COMFYUI": str(comfyui)}
    command = [args.python, "-m", "pytest", "-q", str(ROOT / "tests" / "test_comfy_host.py"), *args.pytest_args]
    return subprocess.run(command, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
