"""Step progress: ComfyUI's ProgressBar inside the host (its update is also the interrupt point), tqdm headless."""

from __future__ import annotations

from collections.abc import Callable

from .paths import in_host

_headless_bars = True


def show_headless_progress(enabled: bool) -> None:
    """Headless runs: turn the per-node step bars on or off (`run --no-progress`)."""
    global _headless_bars
    _headless_bars = enabled


def step_progress(total: int, description: str) -> tuple[Callable[..., None], Callable[[], None]]:
    """(update(done, total, picture=None), close()) for a loop of `total` steps; in the host a PIL `picture`
    becomes the node's preview image."""
    if in_host():
        import comfy.utils  # only inside ComfyUI

        bar = comfy.utils.ProgressBar(total)

        def host_update(done: int, _total: int, picture: object = None) -> None:
            bar.update_absolute(done, total, ("PNG", picture, 512) if picture is not None else None)

        return host_update, (lambda: None)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, leave=False, disable=not _headless_bars)

    def update(done: int, _total: int, picture: object = None) -> None:
        bar.update(done - bar.n)

    return update, bar.close
