"""Files LoRA Loom writes: whole or not at all, and one cache folder for what it derives.

Every file the package writes (checkpoints, LoRAs, caches, training states) goes through `atomic_write`: a
reader never sees half a file, and a loaded base that re-reads W0 from a file of the same name keeps reading
the old one (a rename replaces the directory entry, not the mapped inode).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

# The process umask, read once: reading it means setting it, and toggling it on every write would briefly give
# files other threads create (a host's server, say) no umask at all.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """`write(temporary)` to a new file in `path`'s folder, flushed to disk, then renamed over `path`.

    The file gets the permissions a plain `open()` would give (0o666 less the umask; safetensors and
    mkstemp make 0o600). On any failure the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(descriptor)
    temporary = Path(name)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8", newline="\n"))


def cache_root() -> Path:
    """Where derived files go: $LORA_LOOM_CACHE, else $XDG_CACHE_HOME/lora_loom, else ~/.cache/lora_loom."""
    override = os.environ.get("LORA_LOOM_CACHE")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lora_loom"


def cache_dir() -> Path:
    """`cache_root()`, created if needed."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root
