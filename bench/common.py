"""What the benchmarks share: timing, memory readings, the cached full-size files, report helpers.

Each bench script is about one thing (bench_patch: the patch engine, bench_sampler: sampling, bench_toyworld:
the toy base's quality) and imports its tools from here; none reaches into the engine's private state.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import resource
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lora_loom.files import atomic_write
from lora_loom.lora_core.synthetic import random_kohya_lora
from lora_loom.lora_core.targets import kohya_targets
from lora_loom.sd15.config_files import load_config_dicts
from lora_loom.sd15.models import build_components, build_empty_components, save_single_file
from lora_loom.training.heap import glibc

REPO_ROOT = Path(__file__).resolve().parent.parent


CACHE = REPO_ROOT / "bench" / ".cache"


CHECKPOINT = CACHE / "sd15-random-seed0-fp32.safetensors"


DOC = REPO_ROOT / "docs" / "benchmarks.md"


SCOPES = ("attention", "all")


LORA_RANK = 16


LORA_ALPHA = 8.0


LORA_SEEDS = {"attention": 1, "all": 2}


# Involuntary context switches per second above which a timing is flagged as taken under CPU
# contention (another process on the 2 cores); quiet runs stay well below it.
CONTENTION_LIMIT = 150.0


START = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


def timeit_median(
    fn: Callable[[], Any], repeats: int, setup: Callable[[], Any] | None = None, warmup: int = 1
) -> tuple[float, list[float]]:
    """Median wall time of `fn` over `repeats` calls, each preceded by an untimed `setup`.

    `warmup` untimed setup + fn rounds run first. Returns (median seconds, all timed seconds).
    """
    times = []
    for round_ in range(warmup + repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if round_ >= warmup:
            times.append(elapsed)
    return statistics.median(times), times


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn's result, seconds it took): for single first calls."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def involuntary_switches() -> int:
    """Involuntary context switches of this process, all threads (other work competing for the CPU)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


def proc_status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(f"/proc/self/status has no {field_name}")


_LIBC = glibc()  # None where the C library is not glibc: no malloc_trim


def settle_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS, so RSS readings mean live memory."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def rss_anon() -> int:
    """Anonymous resident memory of this process (bytes), after settling the heap."""
    settle_memory()
    return proc_status_bytes("RssAnon")


def peak_rss() -> int:
    return proc_status_bytes("VmHWM")


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    if torch.equal(value, reference):
        return 0.0
    return ((value.double() - reference.double()).norm() / reference.double().norm()).item()


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def lora_path(scope: str) -> Path:
    return CACHE / f"kohya-{scope}-r{LORA_RANK}-a{LORA_ALPHA:g}-seed{LORA_SEEDS[scope]}.safetensors"


def prepare_files() -> None:
    """Build and save the seed-0 full-size SD1.5 checkpoint and both LoRA files, unless cached."""
    from safetensors.torch import save_file

    CACHE.mkdir(parents=True, exist_ok=True)
    if CHECKPOINT.is_file():
        progress(f"phase 1: reusing {CHECKPOINT.relative_to(REPO_ROOT)} ({gib(CHECKPOINT.stat().st_size)})")
    else:
        progress("phase 1: building full-size sd15 components (seed 0) ...")
        components = build_components("sd15", seed=0)
        progress(f"phase 1: saving {CHECKPOINT.relative_to(REPO_ROOT)} ...")
        atomic_write(CHECKPOINT, lambda p: save_single_file(components, p))
        del components
        settle_memory()
        progress(f"phase 1: checkpoint written ({gib(CHECKPOINT.stat().st_size)})")

    # Only the shapes matter for the random LoRAs: meta-device components cost nothing.
    meta = build_empty_components(*load_config_dicts("sd15"))
    parts = {"unet": meta.unet, "text_encoder": meta.text_encoder}
    for scope in SCOPES:
        path = lora_path(scope)
        if path.is_file():
            continue
        state = random_kohya_lora(parts, kohya_targets(scope), rank=LORA_RANK, alpha=LORA_ALPHA, seed=LORA_SEEDS[scope])
        atomic_write(path, lambda p, state=state: save_file(state, str(p)))
        progress(f"phase 1: wrote {path.relative_to(REPO_ROOT)} ({mib(path.stat().st_size)})")


def engine_revision() -> str:
    """git revision of the checkout, with '+dirty lora_core' if lora_core has uncommitted changes."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        revision = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "lora_core")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return revision + (" +dirty lora_core" if dirty else "")


def machine_description() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import diffusers
    import peft
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"diffusers {diffusers.__version__}, peft {peft.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def secs(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds >= 0.001 else f"{seconds * 1000:.2f} ms"


def yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def met(flag: bool) -> str:
    return "met" if flag else "**not met**"


def write_doc(section: str, heading: str) -> None:
    """Replace (or append) the section under `heading` in docs/benchmarks.md, keeping every other section."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.is_file() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith(("# ", "## "))),
            len(lines),
        )
        after = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + after if after else "")
    DOC.write_text(new)


def quiet_libraries() -> None:
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
