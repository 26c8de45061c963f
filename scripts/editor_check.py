"""Check LoRA Loom in the real ComfyUI editor: the LoRA inspector and the live training chart.

    python scripts/editor_check.py --comfyui /path/to/ComfyUI [--python /path/to/ComfyUI/venv/bin/python]

Needs a ComfyUI checkout (Comfy-Org/ComfyUI) with its requirements installed (its `comfyui-frontend-package`
comes from PyPI), Debian's `chromium` (or CHROMIUM=/path/to/chrome) and `playwright-core` from npm
(`npm install --no-save playwright-core` here, or `--playwright-core` naming a folder where it is installed).
ComfyUI imports torchvision at start-up: where PyPI's torchvision does not match the installed torch (e.g. the
CPU wheel `torch==2.13.0`), install a matching pair into ComfyUI's environment (`torch==2.14.1
torchvision==0.29.1`). Checked with ComfyUI a125cd8 and its comfyui-frontend-package 1.27.10.
The script

1. links this checkout into ComfyUI's `custom_nodes/` (as `lora_loom`, unless it is already there) and
   writes a small kohya LoRA with training metadata into ComfyUI's `models/loras/`;
2. starts ComfyUI (`main.py --cpu`) on a free port, waits for it;
3. runs `scripts/editor_check.mjs` in headless Chromium: a LoadLoRA node picks that LoRA and the inspector
   must show its rank, alpha, modules and trigger words; then a short copy of `workflows/train_then_apply.json`
   is queued from the editor and the TrainLoRA node's canvas must show the curve of every step;
4. checks the browser console for errors from our files and the server log for tracebacks that name us;
5. writes screenshots to docs/images/editor-*.png and the result to --result (JSON). Exit 0 when all passed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_LINK = "lora_loom"
LORA_NAME = "editor-check-star.safetensors"
TRAIN_STEPS = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_pack(comfyui: Path) -> None:
    link = comfyui / "custom_nodes" / PACK_LINK
    if link.is_symlink() and link.resolve() == ROOT:
        return
    if link.exists():
        raise SystemExit(f"{link} exists and is not a link to {ROOT}")
    link.symlink_to(ROOT, target_is_directory=True)


def write_lora(python: str, comfyui: Path) -> None:
    """A rank-4 kohya LoRA for the toy base with kohya training metadata (what the inspector shows)."""
    code = f"""
import json, sys
sys.path.insert(0, {str(comfyui / "custom_nodes")!r})  # the pack, linked there as lora_loom
from lora_loom.lora_core.synthetic import random_kohya_lora
from lora_loom.lora_core.formats import parse_lora
from lora_loom.lora_core.targets import kohya_targets
from lora_loom.lora_core.writer import save_lora
from lora_loom.sd15.base import load_base
from lora_loom.sd15.builtin import BUILT_IN_TOY
base = load_base(BUILT_IN_TOY, dtype="fp32", device="cpu").model.components
parts = {{"unet": base.unet, "text_encoder": base.text_encoder}}
lora = parse_lora(random_kohya_lora(parts, kohya_targets("attention"), rank=4, alpha=4.0, seed=1), name="editor-check")
tags = {{"12_toy star": {{"star": 12, "red star": 3, "blue background": 4}}}}
save_lora(lora, {str(comfyui / "models" / "loras" / LORA_NAME)!r}, metadata={{
    "ss_tag_frequency": json.dumps(tags), "ss_steps": 300, "ss_resolution": "(64, 64)",
    "ss_optimizer": "torch.optim.adamw.AdamW", "ss_base_model_version": "sd_v1"}})
"""
    # Not from the ComfyUI folder: there its `folder_paths` is importable and the pack would act as in the host.
    subprocess.run([python, "-c", code], check=True, cwd=comfyui / "custom_nodes")


def short_training_workflow(folder: Path) -> Path:
    workflow = json.loads((ROOT / "workflows" / "train_then_apply.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "TrainLoRA":
            node["widgets_values"][4] = TRAIN_STEPS
            node["widgets_values"][21] = f"editor-check-{int(time.time())}"  # a new file: the run really trains
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "editor_check_train.json"
    path.write_text(json.dumps(workflow))
    return path


def tracebacks(log: str) -> list[str]:
    """The traceback blocks in a server log: from "Traceback" to the exception line after the indented frames."""
    blocks, current = [], None
    for line in log.splitlines():
        if line.startswith("Traceback"):
            current = [line]
        elif current is not None:
            current.append(line)
            if not line.startswith((" ", "\t")):
                blocks.append("\n".join(current))
                current = None
    return blocks


def wait_for(url: str, server: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"ComfyUI exited with {server.returncode} before it served {url}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"ComfyUI did not answer {url} within {seconds:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout")
    parser.add_argument("--python", default=None, help="ComfyUI's Python (default: <comfyui>/venv/bin/python)")
    parser.add_argument("--playwright-core", type=Path, help="folder with node_modules/playwright-core")
    parser.add_argument("--shots", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--result", type=Path, default=Path("editor_check_result.json"))
    args = parser.parse_args(argv)
    comfyui = args.comfyui.resolve()
    python = args.python or str(comfyui / "venv" / "bin" / "python")
    install_pack(comfyui)
    (comfyui / "models" / "loras").mkdir(parents=True, exist_ok=True)
    write_lora(python, comfyui)
    workflow = short_training_workflow(comfyui / "user")
    port = free_port()
    log_path = args.result.with_suffix(".server.log")
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port)],
            cwd=comfyui,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(f"http://127.0.0.1:{port}/object_info/LoadLoRA", server)
        env = dict(os.environ)
        if args.playwright_core is not None:
            env["PLAYWRIGHT_CORE"] = str(args.playwright_core.resolve() / "node_modules" / "playwright-core")
        args.shots.mkdir(parents=True, exist_ok=True)
        browser = subprocess.run(
            ["node", str(ROOT / "scripts" / "editor_check.mjs"), f"http://127.0.0.1:{port}/", LORA_NAME,
             str(workflow), str(TRAIN_STEPS), str(args.shots), str(args.result)],
            env=env, timeout=900,
        )  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    server_log = log_path.read_text()
    ours = [block for block in tracebacks(server_log) if PACK_LINK in block]
    result = json.loads(args.result.read_text()) if args.result.is_file() else {"checks": {}}
    result["server_errors_naming_us"] = ours
    result["server_log"] = str(log_path)
    args.result.write_text(json.dumps(result, indent=2))
    print(f"server log: {log_path}; tracebacks naming the pack: {len(ours)}")
    return 0 if browser.returncode == 0 and not ours else 1


if __name__ == "__main__":
    sys.exit(main())
