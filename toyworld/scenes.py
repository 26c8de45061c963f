"""Seeded toy scenes: one main object (plus optionally a tiny second one) on a flat background.

Attributes of the main object (the ground truth held in :class:`Scene`):

* shape: circle, square, triangle, cross, ring, star
* colour: red, green, blue, yellow, purple, orange, white, black, cyan (RGB values far apart)
* size: small, large
* position: {left, centre, right} x {top, bottom}
* background: a flat colour from the palette, never equal to the object's colour

HELD-OUT concepts (never produced by the "base" split, reserved for LoRA training):

* shape ``star`` (:data:`HELD_OUT_SHAPES`)
* colour ``cyan`` (:data:`HELD_OUT_COLOURS`)

Every scene of the "held_out" split uses at least one of them on its main object (the background and the
optional second object stay in the base vocabulary). Held-out concepts appear in no part of a base scene.

Rendering is numpy + Pillow only: shapes are drawn aliased at 4x resolution and box-downsampled, which gives
the same anti-aliasing on every edge. Sample ``i`` of ``dataset(n, seed, split)`` depends only on
``(seed, split, i)``, so the same seed gives bitwise-identical images and captions, whatever ``n``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# name -> RGB; pairwise Euclidean distances are all > 100 (see tests).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 25, 35),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (245, 230, 40),
    "purple": (130, 40, 170),
    "orange": (250, 125, 15),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "cyan": (40, 215, 225),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "star")
SIZES: tuple[str, ...] = ("small", "large")
COLUMNS: tuple[str, ...] = ("left", "centre", "right")
ROWS: tuple[str, ...] = ("top", "bottom")
POSITIONS: tuple[tuple[str, str], ...] = tuple((c, r) for r in ROWS for c in COLUMNS)

HELD_OUT_SHAPES: tuple[str, ...] = ("star",)
HELD_OUT_COLOURS: tuple[str, ...] = ("cyan",)
BASE_SHAPES: tuple[str, ...] = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES)
BASE_COLOURS: tuple[str, ...] = tuple(c for c in COLOURS if c not in HELD_OUT_COLOURS)
SPLITS: tuple[str, ...] = ("base", "held_out")

# Geometry as fractions of the image side: object box sides, cell centres, jitter.
SIZE_FRAC = {"small": 0.28, "large": 0.42}
SECOND_FRAC = 0.14
COLUMN_FRAC = {"left": 0.25, "centre": 0.5, "right": 0.75}
ROW_FRAC = {"top": 0.25, "bottom": 0.75}
JITTER_FRAC = 0.03
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image. ``second_*`` are None when there is no second object."""

    shape: str
    colour: str
    size: str
    column: str
    row: str
    background: str
    dx: float = 0.0  # main-object offset from its cell centre, as a fraction of the image side
    dy: float = 0.0
    second_shape: str | None = None
    second_colour: str | None = None
    second_column: str | None = None
    second_row: str | None = None

    @property
    def position(self) -> tuple[str, str]:
        return (self.column, self.row)

    @property
    def has_second(self) -> bool:
        return self.second_shape is not None


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    caption: str
    scene: Scene


# ---------------------------------------------------------------------------------------------- sampling


def _pick(rng: np.random.Generator, items) -> str:
    items = list(items)
    return items[int(rng.integers(len(items)))]


def sample_scene(
    rng: np.random.Generator,
    allowed_shapes=BASE_SHAPES,
    allowed_colours=BASE_COLOURS,
    background_colours=None,
    second_shapes=None,
    second_colours=None,
    second_prob: float = 0.5,
) -> Scene:
    """Draw a random scene. Backgrounds default to ``allowed_colours``; the second object's vocabulary
    defaults to the main object's. The background always differs from both objects' colours."""
    background_colours = tuple(allowed_colours if background_colours is None else background_colours)
    second_shapes = tuple(allowed_shapes if second_shapes is None else second_shapes)
    second_colours = tuple(allowed_colours if second_colours is None else second_colours)
    shape = _pick(rng, allowed_shapes)
    colour = _pick(rng, allowed_colours)
    bgs = [c for c in background_colours if c != colour]
    if not bgs:
        raise ValueError(f"no background colour differs from {colour!r}")
    background = _pick(rng, bgs)
    size = _pick(rng, SIZES)
    column = _pick(rng, COLUMNS)
    row = _pick(rng, ROWS)
    dx, dy = (float(v) for v in rng.uniform(-JITTER_FRAC, JITTER_FRAC, size=2))
    second = {}
    if rng.random() < second_prob:
        s_colours = [c for c in second_colours if c != background]
        if s_colours:
            # Always in the other row: it can never touch the main object.
            second = dict(
                second_shape=_pick(rng, second_shapes),
                second_colour=_pick(rng, s_colours),
                second_column=_pick(rng, COLUMNS),
                second_row=ROWS[1 - ROWS.index(row)],
            )
    return Scene(shape, colour, size, column, row, background, dx, dy, **second)


def _split_scene(rng: np.random.Generator, split: str) -> Scene:
    if split == "base":
        return sample_scene(rng, BASE_SHAPES, BASE_COLOURS)
    if split == "held_out":
        mode = int(rng.integers(3))  # 0: held-out shape, 1: held-out colour, 2: both
        shapes = HELD_OUT_SHAPES if mode in (0, 2) else BASE_SHAPES
        colours = HELD_OUT_COLOURS if mode in (1, 2) else BASE_COLOURS
        base = dict(background_colours=BASE_COLOURS, second_shapes=BASE_SHAPES, second_colours=BASE_COLOURS)
        return sample_scene(rng, shapes, colours, **base)
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS.index(split), int(index)])


def scenes(n: int, seed: int, split: str = "base") -> list[Scene]:
    """The ground truth of ``dataset(n, seed, split)`` without rendering."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [_split_scene(_rng(seed, split, i), split) for i in range(n)]


def dataset(n: int, seed: int, split: str = "base", size: int = 64) -> list[Sample]:
    """``n`` (image, caption, scene) samples; sample i depends only on (seed, split, i)."""
    out = []
    for i in range(n):
        rng = _rng(seed, split, i)
        scene = _split_scene(rng, split)
        out.append(Sample(render(scene, size), caption(scene, rng), scene))
    return out


# ---------------------------------------------------------------------------------------------- rendering


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, d: float, fill, bg) -> None:
    r = d / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "cross":
        w = d / 6
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    elif shape == "ring":
        ri = r * 0.55
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=bg)
    elif shape == "star":
        ri = r * 0.45
        cy += r * (1 - np.cos(np.pi / 5)) / 2  # centre the bounding box (the top tip sticks out further)
        pts = []
        for k in range(10):
            a = -np.pi / 2 + k * np.pi / 5
            rad = r if k % 2 == 0 else ri
            pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image (deterministic)."""
    s = size * SUPERSAMPLE
    bg = COLOURS[scene.background]
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    cx = (COLUMN_FRAC[scene.column] + scene.dx) * s
    cy = (ROW_FRAC[scene.row] + scene.dy) * s
    draw_shape(draw, scene.shape, cx, cy, SIZE_FRAC[scene.size] * s, COLOURS[scene.colour], bg)
    if scene.has_second:
        draw_shape(
            draw,
            scene.second_shape,
            COLUMN_FRAC[scene.second_column] * s,
            ROW_FRAC[scene.second_row] * s,
            SECOND_FRAC * s,
            COLOURS[scene.second_colour],
            bg,
        )
    return img.resize((size, size), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------- captions


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _position_phrase(column: str, row: str, rng: np.random.Generator) -> str:
    if column == "centre":
        return _pick(rng, (f"at the {row}", f"at the {row} centre", f"in the {row} middle", f"{row} centre"))
    return _pick(
        rng,
        (f"at the {row} {column}", f"in the {row} {column}", f"{row} {column}", f"on the {column}, at the {row}"),
    )


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption from a small grammar; always names the colour, shape, background and position. The size is
    named with probability 0.6, the second object (if any) with probability 0.7."""
    words = [scene.colour, scene.shape]
    if rng.random() < 0.6:
        words.insert(0, scene.size)
    obj = " ".join(words)
    pos = _position_phrase(scene.column, scene.row, rng)
    bg = scene.background
    template = int(rng.integers(5))
    if template == 0:
        text = f"{_a(obj)} {pos}, {bg} background"
    elif template == 1:
        text = f"{bg} background with {_a(obj)} {pos}"
    elif template == 2:
        text = f"{obj}, {pos}, on {bg}"
    elif template == 3:
        text = f"{_a(obj)} {pos} on {_a(bg)} background"
    else:
        text = f"{pos}: {_a(obj)} on a plain {bg} background"
    if scene.has_second and rng.random() < 0.7:
        second = f"{scene.second_colour} {scene.second_shape}"
        pos2 = _position_phrase(scene.second_column, scene.second_row, rng)
        text += f", and a tiny {second} {pos2}"
    return text
