"""Step progress: ComfyUI's ProgressBar inside the host (its update is also the interrupt point), tqdm headless."""

from __future__ import annotations

from collections.abc import Callable

from .paths import in_host

_headless_bars = True


def show_headless_progress(enabled: bool) -> None:
    """Headless runs: turn the per-node step bars on or off (`run --no-progress`)."""
    global _headless_bars
    _headless_bars = enabled


def step_progress(total: int, description: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """(update(done, total), close()) for a loop of `total` steps."""
    if in_host():
        import comfy.utils  # only inside ComfyUI

        bar = comfy.utils.ProgressBar(total)
        return (lambda done, _total: bar.update_absolute(done, total)), (lambda: None)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, leave=False, disable=not _headless_bars)

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    return update, bar.close
