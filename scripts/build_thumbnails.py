"""Write the template browser's thumbnails: `workflows/<name>.jpg` beside each shipped workflow.

    python scripts/build_thumbnails.py [names ...]

ComfyUI's editor lists a pack's `workflows/*.json` under its templates and shows `<name>.jpg` beside each. Each
workflow runs headlessly as shipped (on the built-in base and LoRAs, in an empty models folder) and its largest
saved picture becomes the thumbnail: what the workflow makes, not a mock-up. Run it again after the built-in base
or a shipped workflow changes.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
THUMBNAIL_SIZE = 512  # the editor shows them at about 300 px


def thumbnail(picture: Image.Image) -> Image.Image:
    """The picture on a square canvas, scaled up crisply (nearest) or down smoothly to THUMBNAIL_SIZE."""
    picture = picture.convert("RGB")
    side = max(picture.size)
    canvas = Image.new("RGB", (side, side), (24, 24, 24))
    canvas.paste(picture, ((side - picture.width) // 2, (side - picture.height) // 2))
    scaling = Image.Resampling.NEAREST if side < THUMBNAIL_SIZE else Image.Resampling.LANCZOS
    return canvas.resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), scaling)


def main(argv: list[str] | None = None) -> int:
    from lora_loom.runner import cli

    names = (argv if argv is not None else sys.argv[1:]) or sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    with tempfile.TemporaryDirectory() as folder:
        models = Path(folder) / "models"
        for name in names:
            out = Path(folder) / "out" / name
            argv_run = [str(WORKFLOWS / f"{name}.json"), "--models-dir", str(models), "--output-dir", str(out)]
            if cli.main([*argv_run, "--no-progress", "--input-dir", str(Path(folder) / "input")]) != 0:
                raise SystemExit(f"workflows/{name}.json failed")
            pictures = [Image.open(p) for p in out.rglob("*.png")]
            if not pictures:
                raise SystemExit(f"workflows/{name}.json saved no picture")
            largest = max(pictures, key=lambda p: p.width * p.height)
            thumbnail(largest).save(WORKFLOWS / f"{name}.jpg", quality=90)
            print(f"wrote workflows/{name}.jpg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
