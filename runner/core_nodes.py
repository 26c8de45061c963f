"""ComfyUI's SaveImage and PreviewImage, headless, with the host's semantics (ComfyUI `nodes.py`,
`folder_paths.get_save_image_path`): files `<prefix>_00001_.png`, the counter continuing past the files
already there, the prefix may name subfolders (never outside the output folder), `%width%`, `%height%`,
`%year%`... and `%batch_num%` substituted, and the API prompt and the editor workflow embedded as PNG text
chunks `prompt` and `workflow`. Only the runner uses these; inside ComfyUI the host's own nodes run.
"""

from __future__ import annotations

import json
import os
import random
import string
import time
from pathlib import Path

from ..nodes.contract import PREVIEW_IMAGE, SAVE_IMAGE
from ..nodes.schema import NodeSchema, v1_input_types
from ..sd15.images import to_pil


def save_image_path(prefix: str, output_dir: str | Path, width: int = 0, height: int = 0) -> tuple[Path, str, int, str]:
    """(folder, file name prefix, next counter, subfolder) for `prefix` under `output_dir`.

    The counter is one past the highest `<name>_<digits>_...` file in the folder (1 if none), as in ComfyUI.
    """
    if "%" in prefix:
        now = time.localtime()
        for name, value in (
            ("width", str(width)),
            ("height", str(height)),
            ("year", str(now.tm_year)),
            ("month", f"{now.tm_mon:02}"),
            ("day", f"{now.tm_mday:02}"),
            ("hour", f"{now.tm_hour:02}"),
            ("minute", f"{now.tm_min:02}"),
            ("second", f"{now.tm_sec:02}"),
        ):
            prefix = prefix.replace(f"%{name}%", value)
    output_dir = os.path.abspath(output_dir)
    normalized = os.path.normpath(prefix)
    subfolder, name = os.path.dirname(normalized), os.path.basename(normalized)
    folder = os.path.abspath(os.path.join(output_dir, subfolder))
    # Real paths, not text: a symlinked subfolder (or `..` through one) must not lead the file out either.
    real_output = os.path.realpath(output_dir)
    if os.path.commonpath((real_output, os.path.realpath(folder))) != real_output:
        raise ValueError(f"filename_prefix {prefix!r} would save outside the output folder {output_dir}")
    counter = 1
    if os.path.isdir(folder):
        for existing in os.listdir(folder):
            number = _counter_of(existing, name)
            if number is not None:
                counter = max(counter, number + 1)
    else:
        os.makedirs(folder, exist_ok=True)
    return Path(folder), name, counter, subfolder


def _counter_of(filename: str, name: str) -> int | None:
    """The counter of `<name>_<digits>_...` (0 if the digits are not a number), None for other files."""
    head, rest = filename[: len(name) + 1], filename[len(name) + 1 :]
    if os.path.normcase(head[:-1]) != os.path.normcase(name) or head[-1:] != "_":
        return None
    try:
        return int(rest.split("_")[0])
    except ValueError:
        return 0


class SaveImage:
    """Saves IMAGE batches as PNGs in the output folder, prompt and workflow embedded."""

    SCHEMA: NodeSchema = SAVE_IMAGE
    RETURN_TYPES: tuple = ()
    RETURN_NAMES: tuple = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    DESCRIPTION = SAVE_IMAGE.description

    output_dir: str | Path = "output"  # set per runner by `core_node_classes`
    type = "output"
    prefix_append = ""
    compress_level = 4

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        types = v1_input_types(cls.SCHEMA)
        types["hidden"] = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
        return types

    def save_images(self, images, filename_prefix: str = "ComfyUI", prompt=None, extra_pnginfo=None) -> dict:
        from PIL.PngImagePlugin import PngInfo

        filename_prefix += self.prefix_append
        height, width = (int(images[0].shape[0]), int(images[0].shape[1])) if len(images) else (0, 0)
        folder, name, counter, subfolder = save_image_path(filename_prefix, self.output_dir, width, height)
        results = []
        for batch_number, image in enumerate(images):
            metadata = PngInfo()
            if prompt is not None:
                metadata.add_text("prompt", json.dumps(prompt))
            for key, value in (extra_pnginfo or {}).items():
                metadata.add_text(key, json.dumps(value))
            file = f"{name.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            to_pil(image).save(folder / file, pnginfo=metadata, compress_level=self.compress_level)
            results.append({"filename": file, "subfolder": subfolder, "type": self.type})
            counter += 1
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    """Headless preview: the images go to the temp folder (type "temp"), fast compression."""

    SCHEMA = PREVIEW_IMAGE
    DESCRIPTION = PREVIEW_IMAGE.description
    type = "temp"
    compress_level = 1

    def __init__(self):
        self.prefix_append = "_temp_" + "".join(random.choices(string.ascii_lowercase, k=5))


def core_node_classes(output_dir: str | Path, temp_dir: str | Path) -> dict[str, type]:
    """SaveImage/PreviewImage bound to these folders (fresh subclasses: no global state)."""
    save = type("SaveImage", (SaveImage,), {"output_dir": Path(output_dir)})
    preview = type("PreviewImage", (PreviewImage,), {"output_dir": Path(temp_dir)})
    return {"SaveImage": save, "PreviewImage": preview}
