"""The shipped diffusers-style config folders (`configs/`), read without importing diffusers."""

from __future__ import annotations

import json
from pathlib import Path

CONFIGS_ROOT = Path(__file__).resolve().parent / "configs"
CONFIG_NAMES = ("sd15", "tiny-sd15", "toy-world-sd15")


def config_dir(name: str) -> Path:
    """Folder of a shipped diffusers-style config ("sd15", "tiny-sd15" or "toy-world-sd15")."""
    if name not in CONFIG_NAMES:
        raise ValueError(f"unknown SD1.5 config {name!r}; expected one of {CONFIG_NAMES}")
    return CONFIGS_ROOT / name


def load_config_dicts(name: str) -> tuple[dict, dict, dict]:
    """The shipped (unet, vae, text_encoder) config dicts of a config name."""
    folder = config_dir(name)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    text_encoder_config = json.loads((folder / "text_encoder" / "config.json").read_text())
    return unet_config, vae_config, text_encoder_config
