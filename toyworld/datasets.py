"""Built-in training sets drawn from the toy world, so a TrainLoRA workflow runs as shipped with no setup.

A built-in name in TrainLoRA's `dataset_dir` (e.g. "toy-star (built-in)") is written once into the cache as a
plain dataset folder — PNGs with same-name `.txt` captions — and read like a user's folder. Each set teaches a
concept the toy-world base never saw (the shape `star`, the colour `cyan`, or both).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import atomic_write, atomic_write_text, cache_dir
from .scenes import BASE_COLOURS, BASE_SHAPES, caption, render, sample_scene

# name → (main shapes, main colours, images, seed)
BUILT_IN_DATASETS = {
    "toy-star (built-in)": (("star",), BASE_COLOURS, 12, 0),
    "toy-cyan (built-in)": (BASE_SHAPES, ("cyan",), 12, 1),
    "toy-cyan-star (built-in)": (("star",), ("cyan",), 12, 2),  # both at once: the combination
}
_VERSION = 1  # bump when the drawing or the captions change


def built_in_dataset(name: str) -> Path:
    """The folder of a built-in training set (written on first use)."""
    shapes, colours, count, seed = BUILT_IN_DATASETS[name]
    folder = cache_dir() / "datasets" / f"{name.split(' ')[0]}-v{_VERSION}"
    if (folder / ".complete").is_file():
        return folder
    for i in range(count):
        rng = np.random.default_rng([seed, 7, i])
        scene = sample_scene(rng, shapes, colours, background_colours=BASE_COLOURS, second_prob=0.0)
        stem = folder / f"{i:03d}"
        atomic_write(stem.with_suffix(".png"), lambda temporary, s=scene: render(s).save(temporary, format="PNG"))
        atomic_write_text(stem.with_suffix(".txt"), caption(scene, rng))
    atomic_write_text(folder / ".complete", "")
    return folder
