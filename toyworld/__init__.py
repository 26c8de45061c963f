"""Toy world: seeded synthetic scenes (coloured shapes on flat backgrounds) with captions and a scorer.

Meant for training and evaluating a small SD1.5 model / LoRA on a world whose ground truth is known.
``scenes`` generates images + captions; ``scorer`` reads the attributes back from an image without any
learned model. Concepts in ``HELD_OUT_SHAPES`` / ``HELD_OUT_COLOURS`` never occur in the "base" split.
"""

from .scenes import (
    BASE_COLOURS,
    BASE_SHAPES,
    COLOURS,
    HELD_OUT_COLOURS,
    HELD_OUT_SHAPES,
    POSITIONS,
    SHAPES,
    SIZES,
    Sample,
    Scene,
    caption,
    dataset,
    render,
    sample_scene,
    scenes,
)
from .scorer import Prediction, analyse, score

__all__ = [
    "BASE_COLOURS",
    "BASE_SHAPES",
    "COLOURS",
    "HELD_OUT_COLOURS",
    "HELD_OUT_SHAPES",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Prediction",
    "Sample",
    "Scene",
    "analyse",
    "caption",
    "dataset",
    "render",
    "sample_scene",
    "scenes",
    "score",
]
