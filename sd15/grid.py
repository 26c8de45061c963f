"""Contact sheets: rows of image batches (e.g. prompt × seed) as one picture, with optional row labels."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .images import to_pil

_BACKGROUND = (24, 24, 24)
_TEXT = (230, 230, 230)


def image_grid(
    rows: Sequence[torch.Tensor | Sequence[np.ndarray | torch.Tensor | None]],
    *,
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    upscale: int = 1,
    gap: int = 4,
    label_width: int = 220,
) -> Image.Image:
    """One image: row i holds the images of ``rows[i]`` (an IMAGE batch ``[B, H, W, 3]`` in 0..1, or uint8
    arrays) left to right. Images are enlarged ``upscale`` times with nearest neighbour (small toy-world
    pictures stay crisp). Rows may have different lengths, and a None leaves its cell empty; all images must
    share one size."""
    tiles = [[None if image is None else to_pil(image) for image in row] for row in rows]
    placed = [tile for row in tiles for tile in row if tile is not None]
    if not placed:
        raise ValueError("image_grid needs at least one image")
    width, height = placed[0].size
    if any(tile.size != (width, height) for tile in placed):
        raise ValueError("image_grid: all images must have the same size")
    width, height = width * upscale, height * upscale
    columns = max(len(row) for row in tiles)
    font = ImageFont.load_default()
    left = label_width if any(row_labels) else 0
    top = 16 if any(column_labels) else 0
    sheet = Image.new(
        "RGB", (left + columns * (width + gap) + gap, top + len(tiles) * (height + gap) + gap), _BACKGROUND
    )
    draw = ImageDraw.Draw(sheet)
    for j, label in enumerate(column_labels[:columns]):
        draw.text((left + gap + j * (width + gap), 2), label, fill=_TEXT, font=font)
    for i, row in enumerate(tiles):
        y = top + gap + i * (height + gap)
        if i < len(row_labels) and row_labels[i]:
            lines = textwrap.wrap(row_labels[i], width=max(8, label_width // 7))
            draw.multiline_text((gap, y + 2), "\n".join(lines), fill=_TEXT, font=font, spacing=2)
        for j, tile in enumerate(row):
            if tile is None:
                continue
            sheet.paste(tile.resize((width, height), Image.Resampling.NEAREST), (left + gap + j * (width + gap), y))
    return sheet
