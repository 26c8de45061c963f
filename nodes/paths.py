"""Model folders: ComfyUI's `folder_paths` inside the host, a ComfyUI-style models dir headless."""

from __future__ import annotations

import os
from pathlib import Path

from ..sd15 import builtin
from ..sd15.builtin import BUILT_IN_TINY, BUILT_IN_TOY

# The first entry is the editor's default choice.
BUILT_IN_BASES = (BUILT_IN_TOY, BUILT_IN_TINY)
_MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_models_dir = Path(os.environ.get("LORA_LOOM_MODELS_DIR", "models"))
_input_dir = Path(os.environ.get("LORA_LOOM_INPUT_DIR", "input"))


def set_models_dir(path: str | os.PathLike) -> None:
    """Headless runs: where `checkpoints/` and `loras/` live (ComfyUI's layout)."""
    global _models_dir
    _models_dir = Path(path)


def set_input_dir(path: str | os.PathLike) -> None:
    """Headless runs: the input folder relative dataset paths start from (ComfyUI's `input/`)."""
    global _input_dir
    _input_dir = Path(path)


def input_dir() -> Path:
    host = _host_folder_paths()
    return Path(host.get_input_directory()) if host is not None else _input_dir


def _host_folder_paths():
    try:
        import folder_paths  # ComfyUI's own module; exists only inside the host
    except ImportError:
        return None
    return folder_paths


def in_host() -> bool:
    """True when running inside ComfyUI (its `folder_paths` module is importable)."""
    return _host_folder_paths() is not None


def save_path(kind: str, name: str) -> Path:
    """Where a new file of a model kind goes: the kind's first folder in the host, else the models dir."""
    host = _host_folder_paths()
    root = Path(host.get_folder_paths(kind)[0]) if host is not None else _models_dir / kind
    path = (root / name).resolve()
    if root.resolve() not in path.parents:
        raise ValueError(f"{name!r} leaves the {kind} folder")
    return path


def folder_of(kind: str) -> str:
    host = _host_folder_paths()
    return ", ".join(host.get_folder_paths(kind)) if host is not None else str(_models_dir / kind)


def list_models(kind: str) -> list[str]:
    """File names (relative paths) in a model folder kind: "checkpoints" or "loras"."""
    host = _host_folder_paths()
    if host is not None:
        return list(host.get_filename_list(kind))
    root = _models_dir / kind
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and path.suffix in _MODEL_EXTENSIONS:
            found.append(relative)
        elif path.is_dir() and (path / "model_index.json").is_file():
            found.append(relative)  # a diffusers folder
    return found


def model_path(kind: str, name: str) -> Path | None:
    """Full path of a listed model, or None if it does not exist."""
    if kind == "loras" and name in builtin.built_in_loras():
        return builtin.built_in_loras()[name]
    host = _host_folder_paths()
    if host is not None:
        found = host.get_full_path(kind, name)
        return Path(found) if found else None
    path = _models_dir / kind / name
    return path if path.exists() else None


def checkpoint_choices() -> list[str]:
    return list(BUILT_IN_BASES) + list_models("checkpoints")


def lora_choices() -> list[str]:
    return list(builtin.built_in_loras()) + list_models("loras")


def model_roots(kind: str) -> list[Path]:
    """The folders a model kind is listed from: the host's (all of them), else the models dir's; for LoRAs, the
    built-ins' folder too."""
    host = _host_folder_paths()
    roots = [Path(folder) for folder in host.get_folder_paths(kind)] if host is not None else [_models_dir / kind]
    return [builtin.BUILT_IN_LORA_DIR, *roots] if kind == "loras" else roots


def dataset_folder(dataset_dir: str) -> Path:
    """A TrainLoRA dataset: an absolute folder, a built-in set's name, or a folder in the input folder."""
    from ..toyworld.datasets import BUILT_IN_DATASETS, built_in_dataset

    text = dataset_dir.strip()
    if text in BUILT_IN_DATASETS:
        return built_in_dataset(text)
    path = Path(text).expanduser()
    return path if path.is_absolute() else input_dir() / path
