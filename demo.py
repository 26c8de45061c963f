"""`python -m lora_loom demo`: the engine end to end on a built-in tiny SD1.5-topology base.

Writes a base checkpoint and a kohya LoRA under --models-dir (ComfyUI's layout), loads both through
the same paths user files take, applies / re-weights / stacks / restores, and checks each step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .files import atomic_write
from .lora_core.formats import load_lora
from .lora_core.patcher import PatchEngine, PatchEntry
from .lora_core.synthetic import random_kohya_lora
from .lora_core.targets import kohya_targets
from .lora_core.weight_source import FileWeightSource
from .sd15.models import build_components, load_single_file, save_single_file


def _step(label: str, started: float) -> float:
    print(f"  {label:<44} {1000 * (time.perf_counter() - started):8.1f} ms", flush=True)
    return time.perf_counter()


DEMO_LORAS = {"demo-all.safetensors": ("all", 8, 4.0, 1), "demo-attention.safetensors": ("attention", 4, None, 2)}


def write_demo_files(models_dir: Path) -> Path:
    """The tiny base as a checkpoint and the demo kohya LoRAs the shipped workflows use."""
    checkpoint = models_dir / "checkpoints" / "tiny-sd15.safetensors"
    loras = models_dir / "loras"
    seed_model = build_components("tiny-sd15", seed=0)
    # Atomic: a running host may have these very files memory-mapped (LoadBase re-reads W0 from them).
    atomic_write(checkpoint, lambda temporary: save_single_file(seed_model, temporary))
    parts = {"unet": seed_model.unet, "text_encoder": seed_model.text_encoder}
    for name, (scope, rank, alpha, seed) in DEMO_LORAS.items():
        state = random_kohya_lora(parts, kohya_targets(scope), rank=rank, alpha=alpha, seed=seed)
        atomic_write(loras / name, lambda temporary, state=state: save_file(state, str(temporary)))
    return checkpoint


def run_demo(models_dir: Path) -> dict:
    """Run the demo; returns the figures it printed (and raises if any check fails)."""
    print(f"LoRA Loom demo — files in {models_dir}/", flush=True)
    t = time.perf_counter()
    checkpoint = write_demo_files(models_dir)
    loras = models_dir / "loras"
    t = _step("wrote tiny base + two kohya LoRAs", t)

    model, key_map = load_single_file(checkpoint)
    engine = PatchEngine(
        {"unet": model.unet, "text_encoder": model.text_encoder}, FileWeightSource(checkpoint, key_map)
    )
    original = {k: v.clone() for k, v in model.unet.state_dict().items()}
    original.update({f"te.{k}": v.clone() for k, v in model.text_encoder.state_dict().items()})
    t = _step("loaded base (single-file, LDM layout)", t)

    lora_all, lora_attn = (
        load_lora(loras / "demo-all.safetensors"),
        load_lora(loras / "demo-attention.safetensors"),
    )
    t = _step("loaded LoRAs", t)
    print(lora_all.report.summary())
    print(lora_attn.report.summary())

    t = time.perf_counter()
    s1 = engine.apply([PatchEntry(lora_all, 0.8, 0.5)])
    t = _step(f"apply demo-all (U-Net 0.8, TE 0.5): {s1.weights_written} weights", t)
    s2 = engine.apply([PatchEntry(lora_all, 1.0, 0.5)])
    t = _step(f"U-Net strength 0.8 -> 1.0: {s2.weights_written} weights", t)
    s3 = engine.apply([PatchEntry(lora_all, 1.0, 0.5), PatchEntry(lora_attn, 0.7, 0.0)])
    t = _step(f"stack demo-attention (0.7, TE 0): {s3.weights_written} weights", t)
    engine.restore()
    t = _step("restore", t)

    now = {k: v for k, v in model.unet.state_dict().items()}
    now.update({f"te.{k}": v for k, v in model.text_encoder.state_dict().items()})
    exact = all(torch.equal(now[k], v) for k, v in original.items())
    figures = {
        "restore_bit_exact": exact,
        "restore_overhead_bytes": engine.restore_overhead_bytes,
        "weights_written": [s1.weights_written, s2.weights_written, s3.weights_written],
        "modules_matched": lora_all.report.matched,
    }
    kept = engine.restore_overhead_bytes
    print(f"restore bit-exact: {'yes' if exact else 'NO'}; RAM kept for restoring: {kept} B")
    print(json.dumps(figures))
    if not exact:
        raise SystemExit("restore was not bit-exact")
    return figures
