"""A LoRA training set: a folder of images with same-name `.txt` captions, as kohya and most trainers read it.

- Images (png, jpg, webp) at the top of the folder repeat once; kohya's `N_name` subfolders repeat N times
  (other subfolders once). Other files are ignored and reported.
- The caption is `caption_prefix` (the trigger word) in front of the image's own caption; an image without a
  caption gets the prefix alone (reported).
- Each image goes to the aspect-ratio bucket (sides multiples of 64, area ≤ resolution²) closest to its own
  aspect, is scaled to cover it and centre-cropped, as kohya's bucketing does. Batches hold one bucket.
- RGBA / LA / palette images are composited on white, grayscale, 16-bit and CMYK converted to 8-bit RGB — each
  reported, none a crash. Unreadable or truncated images, and images far below `resolution`, are errors that
  name the file.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_EXTENSION = ".txt"
BUCKET_STEP = 64
# An image whose shorter side is below resolution / this would be upscaled into blur, not trained on.
FAR_BELOW = 4
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


class DatasetError(ValueError):
    """The dataset cannot be used (the message names the folder or file)."""


@dataclass(frozen=True)
class Item:
    """One training image."""

    path: Path
    relative: str  # path inside the dataset folder (posix)
    folder: str  # its dataset dir as kohya names it in `ss_tag_frequency` ("10_name", or the folder's own name)
    repeats: int
    caption: str  # the full caption trained on (prefix included)
    digest: str  # sha256 of the file's bytes
    size: tuple[int, int]  # (width, height) as stored
    bucket: tuple[int, int]  # (width, height) trained at


@dataclass
class Dataset:
    root: Path
    resolution: int
    items: list[Item]
    notes: list[str] = field(default_factory=list)
    caption_prefix: str = ""  # the trigger word in front of every caption

    @property
    def num_train_images(self) -> int:
        """Images per epoch, repeats counted (kohya's `ss_num_train_images`)."""
        return sum(item.repeats for item in self.items)

    def key(self) -> str:
        """A digest of what is trained on: each image's bytes, caption, repeats and bucket."""
        digest = hashlib.sha256(str(self.resolution).encode())
        for item in self.items:
            digest.update(repr((item.relative, item.digest, item.caption, item.repeats, item.bucket)).encode())
        return digest.hexdigest()

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_tag_frequency`: per dataset dir, how often each comma-separated caption tag occurs."""
        frequency: dict[str, Counter] = {}
        for item in self.items:
            tags = [tag.strip() for tag in item.caption.split(",") if tag.strip()]
            frequency.setdefault(item.folder, Counter()).update(tags)
        return {folder: dict(counts) for folder, counts in frequency.items()}

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_dataset_dirs`: per dataset dir, its repeats and image count."""
        dirs: dict[str, dict[str, int]] = {}
        for item in self.items:
            entry = dirs.setdefault(item.folder, {"n_repeats": item.repeats, "img_count": 0})
            entry["img_count"] += 1
        return dirs

    def bucket_info(self) -> dict:
        """kohya's `ss_bucket_info`."""
        counts = Counter(item.bucket for item in self.items)
        buckets = {str(i): {"resolution": list(b), "count": n} for i, (b, n) in enumerate(sorted(counts.items()))}
        errors = [abs(w / h - item.bucket[0] / item.bucket[1]) for item in self.items for w, h in [item.size]]
        return {"buckets": buckets, "mean_img_ar_error": float(np.mean(errors)) if errors else 0.0}


def buckets(resolution: int) -> list[tuple[int, int]]:
    """kohya's bucket sizes around `resolution`: sides from resolution/2 to 2·resolution in steps of 64, each
    width with the largest height that keeps the area at most resolution²."""
    area = resolution * resolution
    low = max(BUCKET_STEP, (resolution // 2) // BUCKET_STEP * BUCKET_STEP)
    high = 2 * resolution
    sizes = set()
    for width in range(low, high + 1, BUCKET_STEP):
        height = min(high, (area // width) // BUCKET_STEP * BUCKET_STEP)
        if height >= low:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def nearest_bucket(size: tuple[int, int], sizes: list[tuple[int, int]]) -> tuple[int, int]:
    aspect = math.log(size[0] / size[1])
    return min(sizes, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def _join_caption(prefix: str, caption: str) -> str:
    prefix, caption = prefix.strip(), caption.strip()
    if not prefix or not caption:
        return prefix or caption
    return f"{prefix} {caption}" if prefix.endswith(",") else f"{prefix}, {caption}"


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """8-bit RGB, and what was converted (None if it already was)."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode} composited on white"
    if mode.startswith("I") or mode == "F":
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        grey = np.clip(np.round(array * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB"), f"{mode} ({'16' if peak > 255 else '8'}-bit) to RGB"
    return image.convert("RGB"), f"{mode} to RGB"


def open_image(path: Path, data: bytes | None = None) -> tuple[Image.Image, str | None]:
    """The image (from `data`, its file's bytes, when given) fully decoded as 8-bit RGB, and the conversion
    made if any; DatasetError if unreadable."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.load()  # decode now: a truncated file fails here, not mid-training
            return _to_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DatasetError(f"{path}: not a readable image ({error})") from None


def _listed(root: Path) -> list[tuple[Path, str, int]]:
    """(file, dataset-dir name, repeats) for every file in `root` and its immediate subfolders, sorted."""
    entries = [(path, root.name, 1) for path in sorted(root.iterdir()) if path.is_file()]
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = _REPEAT_FOLDER.match(folder.name)
        repeats = int(match.group(1)) if match else 1
        entries += [(path, folder.name, max(repeats, 1)) for path in sorted(folder.iterdir()) if path.is_file()]
    return entries


def scan_dataset(root: str | Path, *, resolution: int, caption_prefix: str = "") -> Dataset:
    """Read a dataset folder (every image decoded once, so bad files fail before training starts)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    sizes = buckets(resolution)
    items: list[Item] = []
    ignored, uncaptioned, converted, upscaled = [], [], [], []
    for path, folder, repeats in _listed(root):
        relative = path.relative_to(root).as_posix()
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            if path.suffix.lower() != CAPTION_EXTENSION and not path.name.startswith("."):
                ignored.append(relative)
            continue
        data = path.read_bytes()  # read once: decoded for the checks, hashed for the cache keys
        image, conversion = open_image(path, data)
        width, height = image.size
        if min(width, height) * FAR_BELOW < resolution:
            raise DatasetError(
                f"{path}: {width}×{height} is far below resolution {resolution} (it would train on blur): "
                f"use a larger image, or lower resolution to {max(64, min(width, height) // 64 * 64)}"
            )
        if min(width, height) < resolution // 2:
            upscaled.append(relative)
        if conversion:
            converted.append(f"{relative} ({conversion})")
        caption_file = path.with_suffix(CAPTION_EXTENSION)
        if caption_file.is_file():
            own_caption = caption_file.read_text(encoding="utf-8", errors="replace")
        else:
            own_caption = ""
            uncaptioned.append(relative)
        items.append(
            Item(
                path=path,
                relative=relative,
                folder=folder,
                repeats=repeats,
                caption=_join_caption(caption_prefix, own_caption),
                digest=hashlib.sha256(data).hexdigest(),
                size=(width, height),
                bucket=nearest_bucket((width, height), sizes),
            )
        )
    if not items:
        raise DatasetError(f"{root}: no images (png, jpg, webp) in the folder or its subfolders")
    notes = []
    for label, names in (
        ("ignored (not an image)", ignored),
        ("no caption file, trained on the caption prefix alone", uncaptioned),
        ("converted", converted),
        ("upscaled (smaller than half the resolution)", upscaled),
    ):
        if names:
            shown = ", ".join(names[:5]) + (f", … ({len(names)} in all)" if len(names) > 5 else "")
            notes.append(f"{label}: {shown}")
    return Dataset(root, resolution, items, notes, caption_prefix.strip())


def load_pixels(item: Item) -> torch.Tensor:
    """The image at its bucket size as a [3, H, W] float32 tensor in −1…1 (scaled to cover, centre-cropped)."""
    image, _ = open_image(item.path)
    width, height = item.bucket
    scale = max(width / image.width, height / image.height)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.LANCZOS)
    left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def epoch_batches(dataset: Dataset, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches (item indices, repeats expanded), a pure function of (seed, epoch): each bucket's
    images shuffled and cut into batches, then the batches shuffled — so a resumed run needs no data-order
    state beyond its step."""
    generator = torch.Generator().manual_seed(hash_seed(seed, epoch))
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, item in enumerate(dataset.items):
        by_bucket.setdefault(item.bucket, []).extend([index] * item.repeats)
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        order = torch.randperm(len(indices), generator=generator).tolist()
        shuffled = [indices[i] for i in order]
        batches += [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def hash_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)
