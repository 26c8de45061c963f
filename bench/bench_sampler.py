"""Sampler benchmark: our Sampler with and without a LoRA, against diffusers + PEFT, in one process, as ratios.

Full-size SD1.5 architecture with random weights (no trained weights offline), float32 on the CPU,
2 threads; 256×256, 10 euler steps (normal schedule), cfg 7, batch 1. Measured, warm, as medians:

1. ours with a kohya rank-16 LoRA ÷ ours without (the LoRA is patched into the weights in place,
   so a step should cost exactly what a step of the base costs); the first call of a LoRA handle
   (which patches) is reported on its own, with the patch time inside it;
2. ours ÷ diffusers' ``StableDiffusionPipeline`` on the same components and settings, and diffusers
   with the LoRA unfused under PEFT (``load_lora_weights`` + ``set_adapters``) ÷ diffusers without;
3. switching between two LoRA branches (A: attention LoRA at 1.0/1.0, B: all-targets LoRA at 0.8/0.5):
   ours ``handle.activate()`` against diffusers' ``set_adapters`` (unfused) and
   ``unfuse_lora`` + ``set_adapters`` + ``fuse_lora`` (fused), and whether each branch's images stay
   bitwise the same however the branches alternate.

Plus one correctness check: our image against diffusers' for the same settings, no LoRA.
Writes the section "## Sampler (bench/bench_sampler.py)" of docs/benchmarks.md (other sections are
kept) and prints one final JSON line with every figure.

Run: ``python bench/bench_sampler.py`` (about a quarter of an hour on 2 cores; the checkpoint and LoRA
files are the ones bench/bench_patch.py caches in bench/.cache/, created here if missing).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# The shared helpers live in common.py, next to this file (the script's folder is sys.path[0] when
# run as `python bench/bench_sampler.py`; inserted here too for runpy / imports from elsewhere).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_loom.lora_core.formats import load_lora  # noqa: E402
from lora_loom.sd15.base import SDBase, load_base  # noqa: E402
from lora_loom.sd15.models import load_single_file  # noqa: E402
from lora_loom.sd15.sampling import diffusers_pipeline, make_scheduler, sample  # noqa: E402
from lora_loom.sd15.tokenizer import load_clip_tokenizer  # noqa: E402

from common import (  # noqa: E402
    CHECKPOINT,
    CONTENTION_LIMIT,
    DOC,
    REPO_ROOT,
    START,
    engine_revision,
    gib,
    involuntary_switches,
    lora_path,
    machine_description,
    met,
    peak_rss,
    prepare_files,
    progress,
    quiet_libraries,
    rss_anon,
    settle_memory,
    timed,
    write_doc,
    yes,
)

SECTION_HEADING = "## Sampler (bench/bench_sampler.py)"

PROMPT = "a photograph of an astronaut riding a horse on the moon"
SEED = 1234
STEPS = 10
CFG = 7.0
WIDTH = HEIGHT = 256
SAMPLER, SCHEDULE = "euler", "normal"


@dataclass(frozen=True)
class Branch:
    key: str  # "A" / "B"
    scope: str  # which cached LoRA file (bench_patch's scopes)
    strength_unet: float
    strength_text_encoder: float

    @property
    def adapter(self) -> str:  # diffusers adapter name
        return f"branch_{self.key}"

    def label(self) -> str:
        return f"{self.key}: {self.scope} LoRA at {self.strength_unet:.1f}/{self.strength_text_encoder:.1f}"


BRANCHES = (Branch("A", "attention", 1.0, 1.0), Branch("B", "all", 0.8, 0.5))
COMPONENTS = ["unet", "text_encoder"]

# Goals.
GOAL_LORA_OVER_BASE = 1.01  # ours with a LoRA ÷ ours without, per sample (in-place patch: free per step)
GOAL_OURS_OVER_DIFFUSERS = 1.0  # ours ÷ diffusers' pipeline, no LoRA
GOAL_MAX_ABS_VS_DIFFUSERS = 1e-3  # our image vs diffusers', no LoRA
ISSUE_PEFT_OVERHEAD = (0.03, 0.29)  # the issue: unfused PEFT LoRA costs +3…29 % per step here
MAX_RETRIES = 2  # a timed sample taken under CPU contention is taken again, at most this often


# ---------------------------------------------------------------------------------------------------------
# One timed sample
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One timed sample."""

    seconds: float  # the whole call
    step_s: list[float]  # intervals between consecutive step ends (steps 2..N)
    before_first_step_end_s: float  # text encoding, set-up, step 1
    after_last_step_s: float  # VAE decode and image conversion
    switches_per_s: float  # involuntary context switches / s (CPU contention)
    patch_s: float = 0.0  # ours: time inside engine.apply (handle.activate) during the call
    weights_written: int = 0  # ours: weights that activate wrote during the call


def _run(call: Callable[[Callable[[], None]], Any]) -> tuple[Any, Run]:
    """Time `call(on_step_end)`; `on_step_end()` must be called at the end of every step."""
    marks: list[float] = []
    switches, start = involuntary_switches(), time.perf_counter()
    value = call(lambda: marks.append(time.perf_counter()))
    end = time.perf_counter()
    if len(marks) != STEPS:
        raise RuntimeError(f"expected {STEPS} step callbacks, got {len(marks)}")
    run = Run(
        seconds=end - start,
        step_s=[b - a for a, b in zip(marks[:-1], marks[1:], strict=True)],
        before_first_step_end_s=marks[0] - start,
        after_last_step_s=end - marks[-1],
        switches_per_s=(involuntary_switches() - switches) / (end - start),
    )
    return value, run


@contextmanager
def apply_calls(handle: SDBase) -> Iterator[list[tuple[float, int]]]:
    """Record (seconds, weights written) of every engine.apply (what handle.activate runs) in the block."""
    engine = handle.model.engine
    original = engine.apply
    calls: list[tuple[float, int]] = []

    def recording_apply(*args, **kwargs):
        start = time.perf_counter()
        stats = original(*args, **kwargs)
        calls.append((time.perf_counter() - start, stats.weights_written))
        return stats

    engine.apply = recording_apply  # instance attribute shadows the method for the block only
    try:
        yield calls
    finally:
        del engine.apply


def sample_ours(handle: SDBase) -> tuple[torch.Tensor, Run]:
    """Our public Sampler path; returns (image [1, H, W, 3] in 0..1, Run)."""

    def call(on_step_end):
        return sample(
            handle,
            PROMPT,
            seed=SEED,
            steps=STEPS,
            cfg=CFG,
            sampler_name=SAMPLER,
            scheduler=SCHEDULE,
            width=WIDTH,
            height=HEIGHT,
            progress=lambda _done, _total: on_step_end(),
        ).images

    with apply_calls(handle) as calls:
        image, run = _run(call)
    run.patch_s = sum(seconds for seconds, _ in calls)
    run.weights_written = sum(written for _, written in calls)
    return image, run


class Diffusers:
    """diffusers' StableDiffusionPipeline on a second load of the same checkpoint (same components)."""

    def __init__(self, scheduler_config: dict) -> None:
        components, _ = load_single_file(CHECKPOINT)
        scheduler = make_scheduler(SAMPLER, SCHEDULE, scheduler_config)
        self.pipe = diffusers_pipeline(components, load_clip_tokenizer(), scheduler)
        self.loaded = False
        self.fused = False

    def sample(self) -> tuple[torch.Tensor, Run]:
        def call(on_step_end):
            def callback(_pipe, _step, _timestep, callback_kwargs):
                on_step_end()
                return callback_kwargs

            return self.pipe(
                prompt=PROMPT,
                num_inference_steps=STEPS,
                guidance_scale=CFG,
                width=WIDTH,
                height=HEIGHT,
                generator=torch.Generator("cpu").manual_seed(SEED),
                output_type="np",
                callback_on_step_end=callback,
            ).images

        images, run = _run(call)
        return torch.from_numpy(images), run

    def load(self) -> float:
        """Load both branches' LoRAs as (unfused) PEFT adapters; returns the seconds it took."""
        start = time.perf_counter()
        for branch in BRANCHES:
            self.pipe.load_lora_weights(str(lora_path(branch.scope)), adapter_name=branch.adapter)
        self.loaded = True
        return time.perf_counter() - start

    def unload(self) -> None:
        if not self.loaded:
            return
        if self.fused:
            self.unfuse()
        self.pipe.unload_lora_weights()
        self.loaded = False

    def use(self, branch: Branch) -> None:
        """Make `branch` the only active adapter, at its strengths."""
        weights = [{"unet": branch.strength_unet, "text_encoder": branch.strength_text_encoder}]
        self.pipe.set_adapters([branch.adapter], adapter_weights=weights)

    def fuse(self, branch: Branch) -> None:
        self.pipe.fuse_lora(components=COMPONENTS, adapter_names=[branch.adapter])
        self.fused = True

    def unfuse(self) -> None:
        self.pipe.unfuse_lora(components=COMPONENTS)
        self.fused = False

    def fused_switch(self, branch: Branch) -> None:
        """The fused way to change branch: unfuse the current one, re-weight, fuse the other."""
        self.unfuse()
        self.use(branch)
        self.fuse(branch)

    def close(self) -> None:
        del self.pipe
        settle_memory()


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Results:
    series: dict[str, list[Run]] = field(default_factory=dict)  # timed samples (warm), by series name
    first_calls: dict[str, Run] = field(default_factory=dict)  # single shots
    switch_s: dict[str, list[float]] = field(default_factory=dict)  # direct switch timings
    checks: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    discarded: dict[str, list[Run]] = field(default_factory=dict)  # taken under contention, re-run

    def add(self, name: str, run: Run) -> None:
        self.series.setdefault(name, []).append(run)
        if run.switches_per_s > CONTENTION_LIMIT:
            progress(f"WARNING: {name} ran under CPU contention ({run.switches_per_s:.0f} switches/s)")

    def measure(
        self, name: str, setup: Callable[[], Any], fn: Callable[[], tuple[torch.Tensor, Run]]
    ) -> tuple[torch.Tensor, Run]:
        """One timed sample of series `name`: untimed `setup()` and a garbage collection, then `fn()`.

        A sample taken under CPU contention is discarded and taken again (at most MAX_RETRIES times;
        after that it is kept, and flagged)."""
        for attempt in range(MAX_RETRIES + 1):
            setup()
            gc.collect()
            image, run = fn()
            if run.switches_per_s <= CONTENTION_LIMIT or attempt == MAX_RETRIES:
                break
            progress(f"  {name}: {run.switches_per_s:.0f} involuntary switches/s (contention), taking it again")
            self.discarded.setdefault(name, []).append(run)
        self.add(name, run)
        return image, run

    def sample_s(self, name: str) -> float:
        return statistics.median(run.seconds for run in self.series[name])

    def step_s(self, name: str) -> float:
        """Median of every step interval of every timed sample of the series (pooled)."""
        return statistics.median(s for run in self.series[name] for s in run.step_s)

    def spread(self, name: str) -> float:
        """(max - min) / median of the sample times: how noisy the series was."""
        times = [run.seconds for run in self.series[name]]
        return (max(times) - min(times)) / statistics.median(times)

    def switch(self, name: str) -> float:
        return statistics.median(self.switch_s[name])

    def contended(self) -> list[str]:
        runs = [(name, run) for name, runs in self.series.items() for run in runs]
        runs += list(self.first_calls.items())
        return sorted({name for name, run in runs if run.switches_per_s > CONTENTION_LIMIT})

    def worst_contention(self) -> float:
        rates = [run.switches_per_s for runs in self.series.values() for run in runs]
        return max(rates + [run.switches_per_s for run in self.first_calls.values()], default=0.0)


def describe(run: Run) -> str:
    patch = f", patch {run.patch_s:.3f}s ({run.weights_written} weights)" if run.weights_written else ""
    return (
        f"{run.seconds:.2f}s (step {statistics.median(run.step_s):.3f}s, decode {run.after_last_step_s:.2f}s"
        f"{patch}, {run.switches_per_s:.0f} csw/s)"
    )


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------


def bench(repeats: int, switch_repeats: int) -> Results:
    res = Results()
    progress("loading the checkpoint for ours (load_base) ...")
    base, res.extras["ours_load_base_s"] = timed(lambda: load_base(CHECKPOINT, dtype="fp32", device="cpu"))
    handles = {"base": base}
    for branch in BRANCHES:
        lora, seconds = timed(lambda branch=branch: load_lora(lora_path(branch.scope)))
        res.extras[f"ours_load_lora_{branch.key}secs"] = seconds
        handles[branch.key] = base.with_lora(lora, branch.strength_unet, branch.strength_text_encoder)
    progress("loading the checkpoint again for diffusers ...")
    diffusers, res.extras["diffusers_model_load_s"] = timed(lambda: Diffusers(base.model.scheduler_config))
    progress(f"models loaded; RssAnon {gib(rss_anon())}")

    firsts: dict[str, torch.Tensor] = {}  # the first image of every series
    identical: dict[str, list[bool]] = {}  # later images of a branch vs its first

    def keep(name: str, image: torch.Tensor, series: str) -> None:
        if series not in firsts:
            firsts[series] = image
        else:
            identical.setdefault(series, []).append(torch.equal(image, firsts[series]))

    try:
        # -- round 0: warm-up, first calls, correctness --------------------------------------------------
        progress("round 0 (warm-up): ours base ...")
        image, run = sample_ours(handles["base"])
        res.first_calls["ours.base"] = run
        keep("ours.base", image, "ours.base")
        progress(f"  ours base: {describe(run)}")
        progress("round 0 (warm-up): diffusers base ...")
        image, run = diffusers.sample()
        res.first_calls["diffusers.base"] = run
        keep("diffusers.base", image, "diffusers.base")
        progress(f"  diffusers base: {describe(run)}")
        difference = max_abs(firsts["ours.base"], firsts["diffusers.base"])
        res.checks["ours_vs_diffusers_max_abs"] = difference
        res.checks["ours_vs_diffusers_bitwise"] = torch.equal(firsts["ours.base"], firsts["diffusers.base"])
        res.checks["image_std"] = firsts["ours.base"].std().item()
        progress(f"  ours vs diffusers (no LoRA): max |diff| {difference:.2e}")
        for branch in BRANCHES:
            # The first call of a LoRA handle: sample() itself patches the weights (activate).
            progress(f"round 0: ours first call of branch {branch.label()} ...")
            image, run = sample_ours(handles[branch.key])
            res.first_calls[f"ours.{branch.key}"] = run
            keep(f"ours.{branch.key}", image, f"ours.{branch.key}")
            progress(f"  ours {branch.key} first call: {describe(run)}")
        progress("round 0: diffusers load_lora_weights (both adapters) ...")
        res.extras["diffusers_first_load_both_s"] = diffusers.load()
        for branch in BRANCHES:
            diffusers.use(branch)
            image, run = diffusers.sample()
            res.first_calls[f"diffusers.{branch.key}"] = run
            keep(f"diffusers.{branch.key}", image, f"diffusers.{branch.key}")
            progress(f"  diffusers {branch.key} (unfused PEFT) first: {describe(run)}")
        diffusers.unload()

        # -- timed rounds: every series once per round, interleaved (drift hits all alike) ----------------
        # Ours steady: the handle is activated (untimed) first, so the timed sample() is a second-or-later
        # call of an active handle whose own activate() finds nothing to write. Ours alternating: the
        # other branch is activated (untimed) first, so the timed sample() call switches branch itself.
        diffusers.load()  # diffusers: both LoRAs loaded as PEFT adapters; `use` activates one, unfused
        for round_ in range(1, repeats + 1):
            for key in ("base", *(b.key for b in BRANCHES)):
                image, run = res.measure(
                    f"ours.{key}", handles[key].activate, lambda key=key: sample_ours(handles[key])
                )
                if run.weights_written:
                    raise RuntimeError(f"ours {key}: activate wrote {run.weights_written} weights in a warm call")
                keep(f"ours.{key}", image, f"ours.{key}")
                progress(f"round {round_}/{repeats}: ours {key}: {describe(run)}")
            for branch, other in zip(BRANCHES, reversed(BRANCHES), strict=True):
                image, run = res.measure(
                    f"ours.{branch.key}.alternating",
                    handles[other.key].activate,
                    lambda branch=branch: sample_ours(handles[branch.key]),
                )
                if not run.weights_written:
                    raise RuntimeError(f"ours {branch.key} alternating: sample() did not switch the weights")
                keep(f"ours.{branch.key}.alternating", image, f"ours.{branch.key}")
                progress(f"round {round_}/{repeats}: ours {branch.key} alternating: {describe(run)}")
            for branch in BRANCHES:
                image, run = res.measure(
                    f"diffusers.{branch.key}", lambda branch=branch: diffusers.use(branch), diffusers.sample
                )
                keep(f"diffusers.{branch.key}", image, f"diffusers.{branch.key}")
                progress(f"round {round_}/{repeats}: diffusers {branch.key} (unfused PEFT): {describe(run)}")
            # diffusers without LoRA: the adapters unloaded (untimed), plain modules as before any load.
            image, run = res.measure("diffusers.base", diffusers.unload, diffusers.sample)
            keep("diffusers.base", image, "diffusers.base")
            progress(f"round {round_}/{repeats}: diffusers base: {describe(run)}")
            res.extras.setdefault("diffusers_load_both_s", []).append(diffusers.load())  # untimed set-up
        diffusers.unload()

        # -- direct switch timings ----------------------------------------------------------------------
        progress("switching: ours handle.activate() A <-> B ...")
        switch_ours(res, handles, switch_repeats)
        progress("switching: diffusers set_adapters (unfused) and unfuse/set_adapters/fuse ...")
        switch_diffusers(res, diffusers, switch_repeats)
        progress(
            "switching (median s): "
            + ", ".join(f"{name} {statistics.median(times):.4f}" for name, times in res.switch_s.items())
        )
        base.activate()
    finally:
        diffusers.close()

    res.checks["branch_images_bitwise_identical"] = {series: all(flags) for series, flags in identical.items()}
    res.checks["branch_images_compared"] = {series: len(flags) for series, flags in identical.items()}
    for branch in BRANCHES:  # the LoRA changes the image, and ours agrees with diffusers' unfused PEFT
        first = firsts[f"ours.{branch.key}"]
        res.checks[f"lora_{branch.key}_changes_image_max_abs"] = max_abs(first, firsts["ours.base"])
        res.checks[f"ours_vs_diffusers_peft_{branch.key}_max_abs"] = max_abs(first, firsts[f"diffusers.{branch.key}"])
    return res


def switch_ours(res: Results, handles: dict[str, SDBase], repeats: int) -> None:
    a, b = (handles[branch.key] for branch in BRANCHES)
    a.activate()
    b.activate()  # warm-up
    for _ in range(repeats):
        for target, name in ((a, "ours.to_A"), (b, "ours.to_B")):
            _, seconds = timed(target.activate)
            res.switch_s.setdefault(name, []).append(seconds)
    for _ in range(repeats):  # the no-op every sample() call of an active handle pays
        _, seconds = timed(b.activate)
        res.switch_s.setdefault("ours.noop", []).append(seconds)


def switch_diffusers(res: Results, diffusers: Diffusers, repeats: int) -> None:
    a, b = BRANCHES
    diffusers.load()
    diffusers.use(a)
    diffusers.use(b)  # warm-up
    for _ in range(repeats):
        for branch in (a, b):
            _, seconds = timed(lambda branch=branch: diffusers.use(branch))
            res.switch_s.setdefault(f"diffusers.set_adapters.to_{branch.key}", []).append(seconds)
    diffusers.use(a)
    diffusers.fuse(a)
    diffusers.fused_switch(b)  # warm-up
    for _ in range(repeats):
        for branch in (a, b):
            _, seconds = timed(lambda branch=branch: diffusers.fused_switch(branch))
            res.switch_s.setdefault(f"diffusers.fused.to_{branch.key}", []).append(seconds)
    diffusers.unload()


# ---------------------------------------------------------------------------------------------------------
# Figures, goals, report
# ---------------------------------------------------------------------------------------------------------


def figures(res: Results) -> dict[str, Any]:
    f: dict[str, Any] = {"sample_s": {}, "step_s": {}, "spread": {}}
    for name in res.series:
        f["sample_s"][name] = res.sample_s(name)
        f["step_s"][name] = res.step_s(name)
        f["spread"][name] = res.spread(name)
    ratios: dict[str, float] = {}
    for branch in BRANCHES:
        k = branch.key
        ratios[f"ours_{k}_over_ours_base"] = res.sample_s(f"ours.{k}") / res.sample_s("ours.base")
        ratios[f"ours_{k}_over_ours_base_per_step"] = res.step_s(f"ours.{k}") / res.step_s("ours.base")
        ratios[f"diffusers_peft_{k}_over_diffusers_base"] = res.sample_s(f"diffusers.{k}") / res.sample_s(
            "diffusers.base"
        )
        ratios[f"diffusers_peft_{k}_over_diffusers_base_per_step"] = res.step_s(f"diffusers.{k}") / res.step_s(
            "diffusers.base"
        )
        ratios[f"ours_{k}_over_diffusers_peft_{k}"] = res.sample_s(f"ours.{k}") / res.sample_s(f"diffusers.{k}")
    ratios["ours_base_over_diffusers_base"] = res.sample_s("ours.base") / res.sample_s("diffusers.base")
    ratios["ours_base_over_diffusers_base_per_step"] = res.step_s("ours.base") / res.step_s("diffusers.base")
    f["ratios"] = ratios

    switches: dict[str, dict[str, float]] = {}
    for branch in BRANCHES:
        k = branch.key
        ours = res.switch(f"ours.to_{k}")
        unfused = res.switch(f"diffusers.set_adapters.to_{k}")
        fused = res.switch(f"diffusers.fused.to_{k}")
        alternating = res.sample_s(f"ours.{k}.alternating")
        switches[k] = {
            "ours_activate_s": ours,
            "ours_in_sample_patch_s": statistics.median(r.patch_s for r in res.series[f"ours.{k}.alternating"]),
            "ours_alternating_sample_s": alternating,
            "ours_alternating_minus_steady_s": alternating - res.sample_s(f"ours.{k}"),
            "diffusers_set_adapters_s": unfused,
            "diffusers_unfuse_set_fuse_s": fused,
            "ours_over_diffusers_set_adapters": ours / unfused,
            "ours_over_diffusers_fused": ours / fused,
            # A branch change plus one sample of the branch, end to end.
            "ours_switch_plus_sample_s": ours + res.sample_s(f"ours.{k}"),
            "diffusers_unfused_switch_plus_sample_s": unfused + res.sample_s(f"diffusers.{k}"),
        }
        switches[k]["ours_over_diffusers_unfused_switch_plus_sample"] = (
            switches[k]["ours_switch_plus_sample_s"] / switches[k]["diffusers_unfused_switch_plus_sample_s"]
        )
    switches["noop_activate_s"] = res.switch("ours.noop")
    f["switch"] = switches

    firsts = {}
    for branch in BRANCHES:
        run = res.first_calls[f"ours.{branch.key}"]
        firsts[branch.key] = {
            "sample_s": run.seconds,
            "patch_s": run.patch_s,
            "weights_written": run.weights_written,
            "over_steady": run.seconds / res.sample_s(f"ours.{branch.key}"),
        }
    f["ours_first_call"] = firsts
    return f


def evaluate_goals(res: Results, f: dict[str, Any]) -> dict[str, dict[str, Any]]:
    ratios = f["ratios"]
    goals: dict[str, dict[str, Any]] = {}
    for branch in BRANCHES:
        value = ratios[f"ours_{branch.key}_over_ours_base"]
        goals[f"ours_lora_{branch.key}_over_base_le_1.01"] = {
            "value": value,
            "limit": GOAL_LORA_OVER_BASE,
            "met": value <= GOAL_LORA_OVER_BASE,
            "per_step": ratios[f"ours_{branch.key}_over_ours_base_per_step"],  # context, not the criterion
        }
    value = ratios["ours_base_over_diffusers_base"]
    goals["ours_over_diffusers_le_1.0"] = {
        "value": value,
        "limit": GOAL_OURS_OVER_DIFFUSERS,
        "met": value <= GOAL_OURS_OVER_DIFFUSERS,
        "per_step": ratios["ours_base_over_diffusers_base_per_step"],
    }
    value = res.checks["ours_vs_diffusers_max_abs"]
    goals["image_vs_diffusers_max_abs_le_1e-3"] = {
        "value": value,
        "limit": GOAL_MAX_ABS_VS_DIFFUSERS,
        "met": value <= GOAL_MAX_ABS_VS_DIFFUSERS,
    }
    identical = res.checks["branch_images_bitwise_identical"]
    ours_identical = all(flag for series, flag in identical.items() if series.startswith("ours."))
    goals["branch_images_bitwise_identical"] = {"value": ours_identical, "limit": True, "met": ours_identical}
    return goals


def _pct(ratio: float) -> str:
    return f"{100 * (ratio - 1):+.1f} %"


def render_section(res: Results, f: dict[str, Any], goals: dict[str, Any], extras: dict[str, Any]) -> str:
    a, b = BRANCHES
    s, steps, spread, ratios = f["sample_s"], f["step_s"], f["spread"], f["ratios"]
    lines = [
        SECTION_HEADING,
        "",
        "_Generated by `python bench/bench_sampler.py`; this section is replaced on every run._",
        "",
        f"Machine: {extras['machine']}. Code at git {extras['revision']}. Run on {extras['date']}, "
        f"total {extras['total_s']:.0f} s, peak RSS {gib(extras['peak_rss_bytes'])}.",
        "",
        f"Full-size SD1.5 architecture with random weights (seed 0), float32 on the CPU, "
        f"{extras['threads']} threads; {WIDTH}×{HEIGHT}, {STEPS} steps, {SAMPLER} ({SCHEDULE} schedule), "
        f"cfg {CFG:g}, batch 1, seed {SEED}, one prompt. Everything runs in one process, warm: after a "
        f"warm-up round, {extras['repeats']} timed rounds each sample every series once, interleaved (so "
        "drift hits all alike); figures are medians. Ours: `load_base` → `handle.with_lora(load_lora(file), "
        "su, ste)` → `sampling.sample` (the timed call is a second-or-later call of an active handle: the "
        "handle is activated, untimed, first). diffusers: `StableDiffusionPipeline` on a second "
        "`load_single_file` of the same checkpoint, our CLIP tokenizer, the same euler scheduler, "
        '`output_type="np"`; LoRAs via `load_lora_weights` + `set_adapters`, not fused (PEFT). '
        f"Branches: {a.label()}; {b.label()} (kohya rank 16, alpha 8). Per step = median of all intervals "
        f"between consecutive step ends (steps 2–{STEPS}) of the timed samples; spread = (max − min) / median "
        "of the sample times.",
        "",
        "### Sampling",
        "",
        "| series | sample (s) | spread | per step (s) | vs ours base (sample / step) | "
        "vs diffusers base (sample / step) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = [("ours, no LoRA", "ours.base")]
    rows += [(f"ours, LoRA {br.key} ({br.scope})", f"ours.{br.key}") for br in BRANCHES]
    rows += [(f"ours, LoRA {br.key}, alternating (switch inside)", f"ours.{br.key}.alternating") for br in BRANCHES]
    rows += [("diffusers, no LoRA", "diffusers.base")]
    rows += [(f"diffusers + PEFT unfused, LoRA {br.key} ({br.scope})", f"diffusers.{br.key}") for br in BRANCHES]
    for label, name in rows:
        vs_ours = f"{s[name] / s['ours.base']:.3f} / {steps[name] / steps['ours.base']:.3f}"
        vs_diffusers = f"{s[name] / s['diffusers.base']:.3f} / {steps[name] / steps['diffusers.base']:.3f}"
        lines.append(
            f"| {label} | {s[name]:.2f} | {100 * spread[name]:.1f} % | {steps[name]:.3f} | {vs_ours} | {vs_diffusers} |"
        )
    decode = statistics.median(r.after_last_step_s for r in res.series["ours.base"])
    lines += [
        "",
        f"A sample is {STEPS} U-Net steps (batch 2 with CFG) plus text encoding and the VAE decode "
        f"(≈ {decode:.1f} s of ours' {s['ours.base']:.1f} s).",
        "",
        "First call of a LoRA handle (single shots; `sample()` patches the weights itself): "
        + "; ".join(
            f"{br.key}: {f['ours_first_call'][br.key]['sample_s']:.2f} s, of which the patch (activate) "
            f"{f['ours_first_call'][br.key]['patch_s']:.3f} s ({f['ours_first_call'][br.key]['weights_written']} "
            f"weights), {f['ours_first_call'][br.key]['over_steady']:.3f}× the warm sample"
            for br in BRANCHES
        )
        + f". A warm call's `activate()` that finds nothing to write costs {_ms(f['switch']['noop_activate_s'])}.",
        "",
        "diffusers with the LoRA unfused (PEFT) against diffusers without, per step: "
        + "; ".join(
            f"{br.scope} {_pct(ratios[f'diffusers_peft_{br.key}_over_diffusers_base_per_step'])} "
            f"(per sample {_pct(ratios[f'diffusers_peft_{br.key}_over_diffusers_base'])})"
            for br in BRANCHES
        )
        + f" — the issue gave +{100 * ISSUE_PEFT_OVERHEAD[0]:.0f}…{100 * ISSUE_PEFT_OVERHEAD[1]:.0f} % per step. "
        "Ours with the same LoRA against diffusers + PEFT: "
        + "; ".join(f"{br.scope} {ratios[f'ours_{br.key}_over_diffusers_peft_{br.key}']:.3f}×" for br in BRANCHES)
        + ".",
    ]
    contended = res.contended()
    if res.discarded:
        retaken = ", ".join(f"{name} ×{len(runs)}" for name, runs in res.discarded.items())
        lines += [
            "",
            f"Timed samples taken under CPU contention (more than {CONTENTION_LIMIT:.0f} involuntary context "
            f"switches/s) were discarded and taken again: {retaken}.",
        ]
    if contended:
        lines += [
            "",
            f"**Warning: taken under CPU contention** (more than {CONTENTION_LIMIT:.0f} involuntary context "
            f"switches/s) — {', '.join(contended)}. Rerun for clean figures.",
        ]
    else:
        lines += [
            "",
            f"No CPU contention detected (at most {res.worst_contention():.0f} involuntary context switches/s "
            f"during a sample; limit {CONTENTION_LIMIT:.0f}).",
        ]

    sw = f["switch"]
    lines += [
        "",
        "### Switching branches",
        "",
        f"Direct timings, median of {extras['switch_repeats']} per direction. Ours: `handle.activate()` of the "
        "other branch (writes the weights whose patch differs, from W0 re-read from the checkpoint). diffusers: "
        "both LoRAs loaded as adapters; unfused = `set_adapters([other], weights)`; fused = `unfuse_lora()` + "
        "`set_adapters` + `fuse_lora(adapter_names=[other])`.",
        "",
        "| switch to | ours activate (s) | diffusers set_adapters, unfused (s) | ours / set_adapters | "
        "diffusers unfuse + set + fuse (s) | ours / fused switch | ours switch + sample ÷ diffusers "
        "unfused switch + sample |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for br in BRANCHES:
        x = sw[br.key]
        lines.append(
            f"| {br.key} ({br.scope}) | {x['ours_activate_s']:.3f} | {_ms(x['diffusers_set_adapters_s'])} | "
            f"{x['ours_over_diffusers_set_adapters']:.1f} | {x['diffusers_unfuse_set_fuse_s']:.3f} | "
            f"{x['ours_over_diffusers_fused']:.3f} | {x['ours_over_diffusers_unfused_switch_plus_sample']:.3f} |"
        )
    lines += [
        "",
        "Ours sampling with the branches alternating (in every timed round, A then B right after the steady "
        "samples, no activation before: each `sample()` call switches itself): "
        + "; ".join(
            f"{br.key} {sw[br.key]['ours_alternating_sample_s']:.2f} s per sample (per step "
            f"{steps[f'ours.{br.key}.alternating']:.3f} s), of which activate "
            f"{sw[br.key]['ours_in_sample_patch_s']:.3f} s; alternating − steady "
            f"{sw[br.key]['ours_alternating_minus_steady_s']:+.2f} s against a sample spread of "
            f"{spread[f'ours.{br.key}'] * s[f'ours.{br.key}']:.2f} s"
            for br in BRANCHES
        )
        + ".",
        "",
        "### Checks",
        "",
        f"- Our image vs diffusers' (no LoRA, same settings): max abs difference "
        f"{res.checks['ours_vs_diffusers_max_abs']:.2e} (bitwise equal: "
        f"{yes(res.checks['ours_vs_diffusers_bitwise'])}); image std {res.checks['image_std']:.3f}.",
        "- Every later image of a series bitwise equal to its first: "
        + ", ".join(
            f"{series} {yes(flag)} ({res.checks['branch_images_compared'][series]})"
            for series, flag in res.checks["branch_images_bitwise_identical"].items()
        )
        + ". (`ours.A` / `ours.B` include the images sampled while alternating; a series' first image is "
        "from round 0: ours' LoRA branches from their first call, which patched.)",
        "- The LoRA changes the image (max abs vs no LoRA): "
        + ", ".join(f"{br.key} {res.checks[f'lora_{br.key}_changes_image_max_abs']:.3f}" for br in BRANCHES)
        + "; ours (patched) vs diffusers + PEFT (unfused), max abs: "
        + ", ".join(f"{br.key} {res.checks[f'ours_vs_diffusers_peft_{br.key}_max_abs']:.2e}" for br in BRANCHES)
        + ".",
        "",
        "### Goals",
        "",
        "Judged on the median sample times; the per-step ratio is given for context. The timed samples of "
        f"one series vary by up to {100 * max(spread.values()):.0f} % (spread above), so a ratio within about "
        "1 % of its limit can fall either way on a rerun.",
        "",
        "| goal | result |",
        "|---|---|",
    ]
    labels = {
        f"ours_lora_{a.key}_over_base_le_1.01": f"ours with LoRA {a.key} ({a.scope}) ÷ without ≤ 1.01",
        f"ours_lora_{b.key}_over_base_le_1.01": f"ours with LoRA {b.key} ({b.scope}) ÷ without ≤ 1.01",
        "ours_over_diffusers_le_1.0": "ours ÷ diffusers' pipeline (no LoRA) ≤ 1.0",
        "image_vs_diffusers_max_abs_le_1e-3": "our image vs diffusers', max abs ≤ 1e-3",
        "branch_images_bitwise_identical": "each branch's images bitwise identical however branches alternate",
    }
    for key, label in labels.items():
        goal = goals[key]
        value = goal["value"]
        text = f"{value:.2e}" if key.startswith("image") else (f"{value:.3f}" if not isinstance(value, bool) else "")
        if "per_step" in goal:
            text += f"; per step {goal['per_step']:.3f}"
        lines.append(f"| {label} | {met(goal['met'])}{f' ({text})' if text else ''} |")
    return "\n".join(lines) + "\n"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def json_figures(res: Results, f: dict[str, Any], goals: dict[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(
        {
            "bench": "sampler",
            **extras,
            "settings": {
                "width": WIDTH,
                "height": HEIGHT,
                "steps": STEPS,
                "cfg": CFG,
                "sampler": SAMPLER,
                "schedule": SCHEDULE,
                "seed": SEED,
                "prompt": PROMPT,
                "branches": [asdict(branch) for branch in BRANCHES],
            },
            **f,
            "goals": goals,
            "checks": res.checks,
            "contended": res.contended(),
            "worst_contention_switches_per_s": res.worst_contention(),
            "first_calls": {name: asdict(run) for name, run in res.first_calls.items()},
            "samples": {name: [asdict(run) for run in runs] for name, runs in res.series.items()},
            "discarded_under_contention": {name: [asdict(run) for run in runs] for name, runs in res.discarded.items()},
            "switch_samples_s": res.switch_s,
            "issue_peft_overhead_per_step": list(ISSUE_PEFT_OVERHEAD),
        }
    )


def results_from_json(path: Path) -> tuple[Results, dict[str, Any]]:
    """The Results and extras of an earlier run, from its JSON line (the last line of `path` that is one)."""
    line = next(line for line in reversed(path.read_text().splitlines()) if line.startswith("{"))
    data = json.loads(line)
    if data.get("bench") != "sampler":
        raise ValueError(f"{path}: the last JSON line is not this benchmark's")
    res = Results(
        series={name: [Run(**run) for run in runs] for name, runs in data["samples"].items()},
        first_calls={name: Run(**run) for name, run in data["first_calls"].items()},
        switch_s=data["switch_samples_s"],
        checks=data["checks"],
        discarded={name: [Run(**run) for run in runs] for name, runs in data["discarded_under_contention"].items()},
    )
    keys = list(data)
    extras = {key: data[key] for key in keys[keys.index("bench") + 1 : keys.index("settings")]}  # see json_figures
    return res, extras


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=4, help="timed rounds (>= 3), after one warm-up round")
    parser.add_argument("--switch-repeats", type=int, default=7, help="direct switch timings per direction")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="LOG",
        help="measure nothing: re-derive the figures and the doc section from an earlier run's JSON line",
    )
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    if args.from_json is not None:
        res, extras = results_from_json(args.from_json)
        f = figures(res)
        goals = evaluate_goals(res, f)
        if not args.no_doc:
            write_doc(render_section(res, f, goals, extras), SECTION_HEADING)
            progress(f"wrote {DOC.relative_to(REPO_ROOT)} from {args.from_json}")
        print(json.dumps(json_figures(res, f, goals, extras), sort_keys=False), flush=True)
        return 0

    torch.set_num_threads(2)
    quiet_libraries()
    progress(f"start: {machine_description()}")
    revision = engine_revision()
    progress(f"code at git {revision}")
    prepare_files()

    res = bench(args.repeats, args.switch_repeats)
    f = figures(res)
    goals = evaluate_goals(res, f)
    extras = {
        "machine": machine_description(),
        "revision": revision,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "repeats": args.repeats,
        "switch_repeats": args.switch_repeats,
        "threads": torch.get_num_threads(),
        "total_s": time.perf_counter() - START,
        "peak_rss_bytes": peak_rss(),
        **res.extras,
    }
    for key, goal in goals.items():
        progress(f"goal {key}: {'met' if goal['met'] else 'NOT met'} ({goal['value']})")
    if not args.no_doc:
        write_doc(render_section(res, f, goals, extras), SECTION_HEADING)
        progress(f"wrote {DOC.relative_to(REPO_ROOT)}")
    print(json.dumps(json_figures(res, f, goals, extras), sort_keys=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
