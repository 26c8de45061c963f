"""Built-in bases: names shown in LoadBase, and the shipped toy-world checkpoint (kept import-light)."""

from __future__ import annotations

from pathlib import Path

BUILT_IN_TOY = "toy-world-sd15 (built-in)"
BUILT_IN_TINY = "tiny-sd15 (built-in)"
# The toy-world base trained by the project (toyworld/train.py, docs/toy-world.md), shipped as one
# single-file LDM checkpoint in float16.
TOY_WORLD_CHECKPOINT = Path(__file__).resolve().parent / "toy-world-sd15.safetensors"
