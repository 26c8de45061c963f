"""The step loop every trainer here shares (the toy-world base's stages, TrainLoRA): interruptible at step
boundaries, checkpointed to pickle-free state files, resumable to bitwise the same result.

A loop's resumable state is its `parts` (modules, optimizer, LR schedule, EMA: anything with
`state_dict()` / `load_state_dict()`), one `torch.Generator` for every random draw, and the counters
`state = {"step", "elapsed", "checkpoint_every"}`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from .state_files import load_state, save_state


class StopRequests:
    """Ctrl-C / SIGTERM ask the loop to stop at the next step boundary (checkpoint, then return), so an
    interrupted run never saves a half-applied optimizer step."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> StopRequests:
        self._previous = {}
        # Only the main thread may set signal handlers; a host runs nodes on a worker thread and has its own
        # cancel point (its progress hook), so there the loop simply does not catch signals.
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _request(self, signum: int, frame: object) -> None:
        self.requested = True


def run_steps(
    total: int,
    state: dict[str, Any],
    one_step: Callable[[], float],
    checkpoint: Callable[[], None],
    *,
    stop_after: int | None = None,
    description: str = "train",
    log: Callable[[int, float, float], None] | None = None,
    log_every: int = 25,
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> bool:
    """Run `one_step() -> loss` until `state["step"] == total`; checkpoint every `state["checkpoint_every"]`
    steps, at the end, and when stopped early (a signal, `should_stop()`, or `stop_after` steps in this call).
    `log(step, loss, seconds)` every `log_every` steps; `on_step(step, loss)` after every step — if it raises
    (a host's cancel), the finished steps are checkpointed first. Returns True when all `total` steps are done.

    A failing `one_step` is not checkpointed: the last checkpoint stays the last good state."""
    every = state["checkpoint_every"]
    bar = tqdm(total=total, initial=state["step"], desc=description, mininterval=5)
    started = time.perf_counter() - state["elapsed"]
    done_here = 0
    saved_at = state["step"]
    try:
        with StopRequests() as stop:
            while state["step"] < total:
                loss = one_step()
                state["step"] += 1
                state["elapsed"] = time.perf_counter() - started
                done_here += 1
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)  # drawn with the bar, at most every 5 s
                bar.update(1)
                if log is not None and state["step"] % log_every == 0:
                    log(state["step"], loss, state["elapsed"])
                stopping = (
                    stop.requested
                    or (stop_after is not None and done_here >= stop_after)
                    or (should_stop is not None and should_stop())
                )
                if stopping or (every and state["step"] % every == 0) or state["step"] == total:
                    checkpoint()
                    saved_at = state["step"]
                if on_step is not None:
                    try:
                        on_step(state["step"], loss)
                    except BaseException:
                        if saved_at != state["step"]:
                            checkpoint()
                        raise
                if stopping and state["step"] < total:
                    return False
    finally:
        bar.close()
    return True


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    parameters: Iterable[torch.Tensor],
    max_grad_norm: float,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """One update: backward, gradient-norm clipping, optimizer and LR-schedule step (gradients cleared first).
    With a `scaler` (fp16 training) the loss is scaled for backward and the gradients unscaled before clipping;
    a step whose gradients overflowed is skipped by the scaler."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    schedule.step()


def resume(path: str | os.PathLike, parts: Mapping[str, Any], generator: torch.Generator, state: dict) -> bool:
    """Load `parts`, the generator and the counters from the checkpoint at `path`; False if there is none."""
    if not os.path.isfile(path):
        return False
    restore(load_state(path), parts, generator, state)
    return True


def restore(saved: Mapping[str, Any], parts: Mapping[str, Any], generator: torch.Generator, state: dict) -> None:
    """Load `parts`, the generator and the counters from a checkpoint already read with `load_state`."""
    for key, part in parts.items():
        part.load_state_dict(saved[key])
    generator.set_state(saved["generator"])
    state.update(step=saved["step"], elapsed=saved["elapsed"])


def save_checkpoint(path: str | os.PathLike, parts: Mapping[str, Any], generator: torch.Generator, state: dict) -> None:
    saved = {key: part.state_dict() for key, part in parts.items()}
    saved.update(generator=generator.get_state(), step=state["step"], elapsed=state["elapsed"])
    save_state(path, saved)
