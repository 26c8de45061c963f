"""ComfyUI's IMAGE (`[B, H, W, C]` float32 in 0..1) ↔ PIL pictures, by the host's own rule.

Going to PIL truncates `255 · x` clipped to 0..255, as ComfyUI's SaveImage does, so a picture made here is
bitwise the PNG the host (or our headless SaveImage) writes from the same IMAGE.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_pil(image: torch.Tensor | np.ndarray) -> Image.Image:
    """One IMAGE item `[H, W, C]` (float in 0..1, or already uint8) → a PIL picture; one channel → grey."""
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8:
        array = np.clip(255.0 * array.astype(np.float32), 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def to_image_batch(picture: Image.Image) -> torch.Tensor:
    """A PIL picture as an IMAGE batch of one: `[1, H, W, 3]` float32 in 0..1."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]
