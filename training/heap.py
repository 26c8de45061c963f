"""How the C heap behaves while a LoRA trains on the CPU (glibc only; elsewhere everything here is a no-op).

Two of glibc malloc's defaults cost CPU training time and hide what gradient checkpointing saves (measured on
the full-size SD1.5 U-Net at 256², bench/bench_train.py):

- Temporaries of 32 MiB and more (conv weight reorders of the deep blocks, im2col buffers) are mmap'd afresh and
  unmapped when freed, so every step page-faults them in again; and the heap top is trimmed whenever 64 MiB are
  free there. `training_heap` raises both limits while training, so those buffers reuse the heap: steps ran
  about 15 % (no checkpointing) and 20 % (checkpointing) faster.
- The heap keeps freed space resident for reuse, and the many differently sized temporaries of a step leave it
  fragmented: with checkpointing, live tensors peaked about 160 MiB above the step's start, the process about
  450 MiB, so most of what checkpointing saves never left the RSS. `HeapBound` hands the free space back to the
  OS (`malloc_trim`) where a U-Net block starts whenever the RSS has grown `slack` past its last trimmed value: a
  bound on the free space kept, which costs page faults only when it acts (a few trims a step).

The limits are process-wide; on leaving they are set to the values glibc's own dynamic threshold ends at in a
process that frees large tensors (32 MiB mmap threshold, trim at 64 MiB), and the heap is trimmed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint

MIB = 1024 * 1024
# mallopt parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# While training: temporaries below this come from the heap and stay there (the largest SD1.5 conv weight
# reorder is 118 MiB), and the heap top is handed back only past this much free space.
TRAINING_MMAP_THRESHOLD = 256 * MIB
TRAINING_TRIM_THRESHOLD = 512 * MIB
# Afterwards: where glibc's dynamic threshold ends up (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, trim at twice it).
# Once a threshold is set glibc keeps it fixed, so these stand in for its dynamic behaviour.
RESTORED_MMAP_THRESHOLD = 32 * MIB
RESTORED_TRIM_THRESHOLD = 64 * MIB
# Free heap space allowed to stay resident while checkpointed training runs (smaller: less memory, more page
# faults; at 256² 128 MiB cost 10 % more step time than 192 MiB for 65 MiB less peak).
CHECKPOINTING_SLACK = 192 * MIB


def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc with mallopt and malloc_trim (musl, macOS and Windows: None)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not all(hasattr(libc, symbol) for symbol in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    return libc


def resident_bytes() -> int | None:
    """This process's resident set size (Linux: /proc/self/statm), or None where there is none."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapBound:
    """Trims the heap when the RSS has grown `slack` bytes past its value after the last trim (or its lowest
    value since). Called where U-Net blocks start: checkpointed ones through `checkpointing_func` (forward and
    recomputation), the others through `watch` (forward and backward)."""

    def __init__(self, libc: ctypes.CDLL, slack: int = CHECKPOINTING_SLACK) -> None:
        self.libc, self.slack = libc, slack
        self.floor = resident_bytes() or 0
        self.trims = 0

    def __call__(self) -> None:
        rss = resident_bytes()
        if rss is None:
            return
        if rss > self.floor + self.slack:
            self.libc.malloc_trim(0)
            self.floor = resident_bytes() or rss
            self.trims += 1
        elif rss < self.floor:
            self.floor = rss

    def watch(self, module: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Apply the bound where `module` starts, in forward and in backward (not checkpointed modules)."""

        def before_forward(_module: torch.nn.Module, _args: Any) -> None:
            self()

        def after_forward(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            first = output[0] if isinstance(output, tuple) else output
            if isinstance(first, torch.Tensor) and first.requires_grad:
                first.register_hook(lambda _grad: self())

        return [module.register_forward_pre_hook(before_forward), module.register_forward_hook(after_forward)]

    def checkpointing_func(self) -> Callable[..., Any]:
        """A `gradient_checkpointing_func` for diffusers' `enable_gradient_checkpointing`: its default (PyTorch's
        non-reentrant checkpoint of `module.__call__`), with this bound applied at every block's start."""

        def checkpointed(module: torch.nn.Module, *args: Any) -> Any:
            def bounded(*inputs: Any) -> Any:
                self()
                return module(*inputs)

            return torch.utils.checkpoint.checkpoint(bounded, *args, use_reentrant=False)

        return checkpointed


@contextlib.contextmanager
def training_heap(device: torch.device, checkpointing: bool) -> Iterator[HeapBound | None]:
    """The heap settings for CPU training (see the module's docstring). Yields the `HeapBound` to use for
    checkpointing (None: no bound — not checkpointing, not the CPU, or not glibc)."""
    libc = glibc() if device.type == "cpu" else None
    if libc is None:
        yield None
        return
    libc.malloc_trim(0)  # start without the loader's and the encoder's freed space
    libc.mallopt(_M_MMAP_THRESHOLD, TRAINING_MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, TRAINING_TRIM_THRESHOLD)
    try:
        yield HeapBound(libc) if checkpointing and resident_bytes() is not None else None
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, RESTORED_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, RESTORED_TRIM_THRESHOLD)
        libc.malloc_trim(0)
