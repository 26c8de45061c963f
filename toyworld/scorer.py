"""Plain image-analysis scorer for toy-world images (no learned model).

Pipeline: background = median of the border pixels, snapped to the nearest palette colour; foreground =
pixels far from that background; main object = largest connected component; its colour = median of its
interior pixels, snapped to the palette; shape from hole / solidity / bounding-box fill features; position
and size from its bounding box. Tolerates mild blur and noise (tested with Gaussian blur radius 1 and
additive noise sigma 8/255).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from .scenes import COLOURS, SIZE_FRAC, SIZES, Scene

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float64)


@dataclass(frozen=True)
class Prediction:
    background: str
    colour: str | None
    shape: str | None
    size: str | None
    column: str | None
    row: str | None
    features: dict

    @property
    def position(self) -> tuple[str | None, str | None]:
        return (self.column, self.row)


def _to_array(image) -> np.ndarray:
    """HxWx3 float64 in [0, 255]; float input in [0, 1] is rescaled."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] < 3:
        raise ValueError(f"expected HxWx3 image, got shape {a.shape}")
    a = a[..., :3]
    if np.issubdtype(a.dtype, np.floating):
        return np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0
    return a.astype(np.float64)


def _nearest(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def _solidity(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    # Pixel corners, so that a filled rectangle has solidity exactly 1.
    pts = np.concatenate([np.stack([xs + ox, ys + oy], axis=1) for ox in (-0.5, 0.5) for oy in (-0.5, 0.5)])
    try:
        hull_area = ConvexHull(pts).volume
    except QhullError:
        return 1.0
    return float(mask.sum() / hull_area)


def _classify(mask: np.ndarray) -> tuple[str, dict]:
    filled = ndimage.binary_fill_holes(mask)
    area = float(filled.sum())
    hole = float(area - mask.sum()) / area
    ys, xs = np.nonzero(filled)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = area / float(h * w)
    solidity = _solidity(filled)
    box = filled[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    vsym = float((box & box[::-1]).sum() / (box | box[::-1]).sum())  # up-down mirror IoU
    # Star legs: rows in the bottom fifth of the box that hold two separate runs.
    bottom = box[int(round(h * 0.8)) :]
    runs = (np.diff(bottom.astype(np.int8), axis=1) == 1).sum(axis=1) + bottom[:, 0]
    legs = float((runs >= 2).mean()) if len(bottom) else 0.0
    feats = {"hole": hole, "fill": fill, "solidity": solidity, "vsym": vsym, "legs": legs, "aspect": w / h}
    if hole > 0.06:
        shape = "ring"
    elif vsym < 0.8:
        # Triangle vs star: majority of three cues (noise can upset any single one).
        votes = int(solidity > 0.83) + int(vsym < 0.5) + int(legs < 0.3)
        shape = "triangle" if votes >= 2 else "star"
    elif fill > 0.86:
        shape = "square"
    elif fill > 0.68:
        shape = "circle"
    else:
        shape = "cross"
    return shape, feats


def analyse(image) -> Prediction:
    """Estimate background, main-object colour, shape, size and position of a toy-world image."""
    a = _to_array(image)
    H, W = a.shape[:2]
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    background = _nearest(np.median(border, axis=0))
    bg = np.array(COLOURS[background], dtype=np.float64)
    # Threshold at ~half the smallest distance from this background to any other palette colour.
    others = np.sqrt(((_PALETTE - bg) ** 2).sum(axis=1))
    thresh = 0.5 * others[others > 0].min()
    fg = np.sqrt(((a - bg) ** 2).sum(axis=2)) > thresh
    labels, n = ndimage.label(fg)
    if n == 0:
        return Prediction(background, None, None, None, None, None, {})
    sizes = ndimage.sum_labels(fg, labels, index=np.arange(1, n + 1))
    mask = labels == (int(np.argmax(sizes)) + 1)

    interior = ndimage.binary_erosion(mask)
    pix = a[interior] if interior.sum() >= 4 else a[mask]
    colour = _nearest(np.median(pix, axis=0))

    shape, feats = _classify(mask)
    ys, xs = np.nonzero(mask)
    cx = (xs.min() + xs.max() + 1) / 2 / W
    cy = (ys.min() + ys.max() + 1) / 2 / H
    extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / max(H, W)
    column = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    row = "top" if cy < 0.5 else "bottom"
    # A star's box is ~0.9 of its nominal side (and its thin tips thin further under blur).
    nominal = extent / (0.9 if shape == "star" else 1.0)
    size = SIZES[int(nominal > (SIZE_FRAC["small"] + SIZE_FRAC["large"]) / 2)]
    feats.update(cx=cx, cy=cy, extent=extent, area=int(mask.sum()))
    return Prediction(background, colour, shape, size, column, row, feats)


def score(image, scene: Scene) -> dict[str, bool]:
    """Per-attribute correctness of ``image`` against the ground truth ``scene``."""
    p = analyse(image)
    return {
        "background": p.background == scene.background,
        "colour": p.colour == scene.colour,
        "shape": p.shape == scene.shape,
        "size": p.size == scene.size,
        "position": p.position == scene.position,
    }
