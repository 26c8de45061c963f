"""The CPU heap while training (training/heap.py): large temporaries reuse the heap, the free space kept is bounded
when checkpointing, everything is as before afterwards; and checkpointing recomputes only the first two levels."""

import json
import subprocess
import sys
import textwrap

import pytest

from lora_loom.sd15.base import load_base
from lora_loom.training.dataset import scan_dataset
from lora_loom.training.heap import glibc
from lora_loom.training.settings import TrainSettings
from lora_loom.training.trainer import train_lora

from util import write_dataset

needs_glibc = pytest.mark.skipif(glibc() is None, reason="the heap settings are glibc's (mallopt, malloc_trim)")

# Run in a fresh interpreter: the settings are process-wide, and the readings need a heap no test has shaped.
PROBE = textwrap.dedent(
    """
    import json, torch
    from lora_loom.training.heap import CHECKPOINTING_SLACK, MIB, glibc, resident_bytes, training_heap

    def returned_when_freed(size_mib):
        buffer = torch.ones(size_mib * MIB // 4)
        before = resident_bytes()
        del buffer
        return (before - resident_bytes()) / MIB

    def churn(total):  # temporaries of 16 MiB held together, then freed: the heap keeps the space
        buffers = [torch.ones(16 * MIB // 4) for _ in range(total // (16 * MIB))]
        del buffers

    out = {"before": returned_when_freed(96)}
    glibc().malloc_trim(0)
    start = resident_bytes()
    with training_heap(torch.device("cpu"), checkpointing=True) as bound:
        out["inside"] = returned_when_freed(96)
        out["bound"] = bound is not None
        glibc().malloc_trim(0)  # the bound measures from a heap with no free space resident
        bound.floor = resident_bytes()
        churn(CHECKPOINTING_SLACK // 2)
        bound()
        out["trims_below"] = bound.trims
        churn(CHECKPOINTING_SLACK + 64 * MIB)
        kept = resident_bytes()
        bound()
        out["trims_past"], out["trimmed_mib"] = bound.trims, (kept - resident_bytes()) / MIB
        out["slack_mib"] = CHECKPOINTING_SLACK / MIB
        churn(CHECKPOINTING_SLACK * 2)
    out["left_mib"] = (resident_bytes() - start) / MIB
    with training_heap(torch.device("cpu"), checkpointing=False) as bound:
        out["bound_without_checkpointing"] = bound is not None
    print(json.dumps(out))
    """
)


@needs_glibc
def test_training_heap_keeps_large_temporaries_bounds_the_free_space_and_restores_glibc():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["before"] > 90  # glibc's default: a 96 MiB buffer is unmapped when freed
    assert out["inside"] < 8  # while training it stays in the heap for the next step's temporaries
    assert out["bound"] and not out["bound_without_checkpointing"]
    assert out["trims_below"] == 0  # half the bound kept free: no trim
    assert out["trims_past"] == 1 and out["trimmed_mib"] > out["slack_mib"]  # past the bound: handed back
    assert out["left_mib"] < 16  # leaving hands the heap's free space back


def test_checkpointing_recomputes_the_first_levels_only_and_trains_the_same(tmp_path):
    base = load_base("tiny-sd15 (built-in)")
    data = scan_dataset(write_dataset(tmp_path / "set", n=2), resolution=64)
    unet = base.model.components.unet
    # Up blocks: behind the attention LoRA, so their backward runs (the first down block's does not).
    watched = {"level 0": unet.up_blocks[-1].resnets[0], "deepest": unet.up_blocks[0].resnets[0]}
    calls = dict.fromkeys(watched, 0)
    handles = [
        module.register_forward_pre_hook(lambda _m, _a, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, module in watched.items()
    ]
    settings = dict(rank=4, alpha=4.0, steps=3, learning_rate=1e-3, resolution=64, batch_size=1, seed=1)
    try:
        checkpointed = train_lora(
            base, data, TrainSettings(**settings, gradient_checkpointing=True), tmp_path / "gc.safetensors"
        )
        counts = dict(calls)
        plain = train_lora(base, data, TrainSettings(**settings), tmp_path / "plain.safetensors")
    finally:
        for handle in handles:
            handle.remove()
    assert counts == {"level 0": 6, "deepest": 3}  # forward + recomputation vs forward only, 3 steps
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)
