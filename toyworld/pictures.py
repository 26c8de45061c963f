"""General procedural pictures for the toy-world VAE: what SD1.5's VAE gets from seeing all kinds of images.

The toy scenes use nine colours and six shapes; a VAE trained on them alone snaps anything else to the nearest
of those (the held-out cyan and star came back as other colours and shapes in a third of round trips). These
pictures cover the space around the scenes instead of the scenes' vocabulary: continuous random colours,
random polygons (convex and radial, with any number of corners and spikes), ellipses, rings, bars, thick
curves, several objects that may overlap, and flat (mostly), gradient, striped, checked or noisy backgrounds. Drawn like
the scenes (aliased at 4× and box-downsampled), so edges look the same. Picture ``i`` of a seed depends only
on ``(seed, i)``.

Only the VAE trains on these (no captions): the U-Net and the text encoder still see base scenes only.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .scenes import COLUMN_FRAC, ROW_FRAC, SECOND_FRAC, SHAPES, SIZE_FRAC, draw_shape

SUPERSAMPLE = 4
# Share of scene-like pictures: the scenes' layout (a flat background, one object at a scene size and place,
# maybe a tiny second one) with any colour and any shape the generator draws (the held-out star too) or a
# random polygon. The rest are free compositions. A small VAE trained mostly on free compositions lost the
# scenes' crispness: their 8×8×4 latents have no room to spare.
SCENE_LIKE_SHARE = 0.6
# Stream of the picture generator in the seed sequence: apart from the scenes' splits (0, 1).
_STREAM = 7


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """Uniform in RGB, with a share of very dark, very light and saturated colours (the corners of the cube)."""
    kind = rng.random()
    if kind < 0.6:
        rgb = rng.integers(0, 256, 3)
    elif kind < 0.8:  # saturated: one or two channels near 0, the others near 255
        rgb = np.where(rng.random(3) < 0.5, rng.integers(0, 60, 3), rng.integers(190, 256, 3))
    else:  # near grey, any lightness
        rgb = np.clip(rng.integers(0, 256) + rng.integers(-20, 21, 3), 0, 255)
    return tuple(int(v) for v in rgb)


def _background(rng: np.random.Generator, s: int) -> Image.Image:
    a, b = np.array(_colour(rng), float), np.array(_colour(rng), float)
    kind = rng.random()
    # Mostly flat, as in the scenes: 8×8×4 latents cannot hold much texture, and a VAE made to try blurs the
    # flat pictures too (a first mix with 55 % textured backgrounds and up to five objects did).
    if kind < 0.7:
        return Image.new("RGB", (s, s), tuple(int(v) for v in a))
    y, x = np.mgrid[0:s, 0:s] / s
    if kind < 0.82:  # linear gradient in a random direction
        angle = rng.uniform(0, 2 * math.pi)
        t = (x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle) + 0.5
    elif kind < 0.88:  # stripes
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.08, 0.4)
        t = ((x * math.cos(angle) + y * math.sin(angle)) / period % 1.0 < 0.5).astype(float)
    elif kind < 0.94:  # checks
        period = rng.uniform(0.1, 0.35)
        t = ((np.floor(x / period) + np.floor(y / period)) % 2).astype(float)
    else:  # smooth value noise: a coarse random grid, bilinearly upscaled
        cells = int(rng.integers(2, 9))
        coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        t = np.asarray(coarse.resize((s, s), Image.Resampling.BILINEAR), float) / 255
    t = np.clip(t, 0, 1)[..., None]
    return Image.fromarray((a * (1 - t) + b * t).round().astype(np.uint8))


def _radial_polygon(rng: np.random.Generator, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    corners = int(rng.integers(3, 13))
    spiky = rng.random() < 0.5  # alternate an inner radius: star-like outlines with any number of spikes
    inner = rng.uniform(0.3, 0.8)
    turn = rng.uniform(0, 2 * math.pi)
    count = corners * (2 if spiky else 1)
    points = []
    for k in range(count):
        radius = r * (inner if spiky and k % 2 else 1.0) * (1 if spiky else rng.uniform(0.7, 1.0))
        angle = turn + 2 * math.pi * k / count
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _object(rng: np.random.Generator, draw: ImageDraw.ImageDraw, s: int, background) -> None:
    r = s * rng.uniform(0.04, 0.3)
    cx, cy = rng.uniform(0.05, 0.95, 2) * s
    fill = _colour(rng)
    kind = rng.random()
    if kind < 0.35:
        draw.polygon(_radial_polygon(rng, cx, cy, r), fill=fill)
    elif kind < 0.55:
        ry = r * rng.uniform(0.4, 1.0)
        draw.ellipse([cx - r, cy - ry, cx + r, cy + ry], fill=fill)
    elif kind < 0.65:  # ring: its hole shows the background colour or another
        hole = r * rng.uniform(0.3, 0.75)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        inside = background if rng.random() < 0.5 else _colour(rng)
        draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=inside)
    elif kind < 0.8:  # rotated bar or rectangle
        w, h = r, r * rng.uniform(0.15, 1.0)
        angle = rng.uniform(0, math.pi)
        c, si = math.cos(angle), math.sin(angle)
        corners = [(-w, -h), (w, -h), (w, h), (-w, h)]
        draw.polygon([(cx + x * c - y * si, cy + x * si + y * c) for x, y in corners], fill=fill)
    else:  # a thick curve: a quadratic Bézier through a random control point
        (x0, y0), (x1, y1), (x2, y2) = (rng.uniform(0, 1, 2) * s for _ in range(3))
        t = np.linspace(0, 1, 24)
        xs = (1 - t) ** 2 * x0 + 2 * (1 - t) * t * x1 + t**2 * x2
        ys = (1 - t) ** 2 * y0 + 2 * (1 - t) * t * y1 + t**2 * y2
        points = list(zip(xs.tolist(), ys.tolist(), strict=True))
        draw.line(points, fill=fill, width=max(1, int(r * 0.35)), joint="curve")


def _distinct_colour(rng: np.random.Generator, other) -> tuple[int, int, int]:
    for _ in range(20):
        colour = _colour(rng)
        if sum((a - b) ** 2 for a, b in zip(colour, other, strict=True)) > 80**2:
            return colour
    return tuple(255 - v for v in other)


def _scene_like(rng: np.random.Generator, s: int) -> Image.Image:
    background = _colour(rng)
    image = Image.new("RGB", (s, s), background)
    draw = ImageDraw.Draw(image)
    row = int(rng.integers(2))
    objects = [(row, rng.uniform(0.8, 1.2) * SIZE_FRAC[("small", "large")[int(rng.integers(2))]])]
    if rng.random() < 0.5:
        objects.append((1 - row, SECOND_FRAC))
    for row_index, side in objects:
        cx = (list(COLUMN_FRAC.values())[int(rng.integers(3))] + rng.uniform(-0.05, 0.05)) * s
        cy = (list(ROW_FRAC.values())[row_index] + rng.uniform(-0.05, 0.05)) * s
        fill = _distinct_colour(rng, background)
        if rng.random() < 0.75:
            draw_shape(draw, SHAPES[int(rng.integers(len(SHAPES)))], cx, cy, side * s, fill, background)
        else:
            draw.polygon(_radial_polygon(rng, cx, cy, side * s / 2), fill=fill)
    return image


def general_picture(seed: int, index: int, size: int = 64) -> Image.Image:
    """Picture ``index`` of ``seed``: scene-like, or a random background with one to four random objects."""
    rng = np.random.default_rng([int(seed), _STREAM, int(index)])
    s = size * SUPERSAMPLE
    if rng.random() < SCENE_LIKE_SHARE:
        return _scene_like(rng, s).resize((size, size), Image.Resampling.BOX)
    image = _background(rng, s)
    background = image.getpixel((0, 0))
    draw = ImageDraw.Draw(image)
    for _ in range(1 + int(rng.choice(4, p=(0.5, 0.3, 0.15, 0.05)))):  # one object in half of them, up to four
        _object(rng, draw, s, background)
    return image.resize((size, size), Image.Resampling.BOX)
