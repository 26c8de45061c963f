"""Built-in models: the bases LoadBase offers, the LoRAs LoadLoRA offers, and their files (kept import-light)."""

from __future__ import annotations

from pathlib import Path

BUILT_IN_TOY = "toy-world-sd15 (built-in)"
BUILT_IN_TINY = "tiny-sd15 (built-in)"
# The toy-world base trained by the project (toyworld/train.py, docs/toy-world.md), shipped as one
# single-file LDM checkpoint in float16.
TOY_WORLD_CHECKPOINT = Path(__file__).resolve().parent / "toy-world-sd15.safetensors"
# LoRAs for the toy-world base the project trained (bench/bench_quality.py, docs/toy-world.md): every kohya file
# in this folder is offered by LoadLoRA as "<stem> (built-in)", loaded like a user's file.
BUILT_IN_LORA_DIR = Path(__file__).resolve().parent / "loras"
BUILT_IN_SUFFIX = " (built-in)"


def built_in_loras() -> dict[str, Path]:
    """LoadLoRA's built-in choices: name → shipped file."""
    if not BUILT_IN_LORA_DIR.is_dir():
        return {}
    return {f"{path.stem}{BUILT_IN_SUFFIX}": path for path in sorted(BUILT_IN_LORA_DIR.glob("*.safetensors"))}
