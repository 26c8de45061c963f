"""A base loaded from a safetensors file restores from that file: exact, and no RAM copy kept."""

import pytest
import torch

from lora_loom.lora_core.patcher import PatchEngine, PatchEntry
from lora_loom.lora_core.weight_source import FileWeightSource
from lora_loom.sd15.models import build_components, load_single_file, save_single_file

from util import assert_bitwise_equal, fail_writes_after, make_lora, state_of


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_single_file(build_components("tiny-sd15", seed=0), path)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_restore_from_file_is_exact_and_costs_no_copy(checkpoint, dtype):
    model, key_map = load_single_file(checkpoint, dtype=dtype)
    original = state_of(model)
    parts = {"unet": model.unet, "text_encoder": model.text_encoder}
    engine = PatchEngine(parts, FileWeightSource(checkpoint, key_map))
    a, b = make_lora(model, seed=1), make_lora(model, seed=2, scope="attention")
    engine.apply([PatchEntry(a, 1.0, 1.0)])
    engine.apply([PatchEntry(a, 0.5, -1.0), PatchEntry(b, 1.0, 1.0)])
    engine.apply([PatchEntry(b, 2.0, 0.5)])
    assert engine.restore_overhead_bytes == 0
    engine.restore()
    assert_bitwise_equal(model, original)

    # Same set from either engine: the file-backed path gives bitwise what the copy-backed path gives.
    copy_backed, _ = load_single_file(checkpoint, dtype=dtype)
    PatchEngine({"unet": copy_backed.unet, "text_encoder": copy_backed.text_encoder}).apply([PatchEntry(b, 2.0, 0.5)])
    engine.apply([PatchEntry(a, 1.0, 1.0)])
    engine.apply([PatchEntry(b, 2.0, 0.5)])
    assert_bitwise_equal(model, state_of(copy_backed))


def test_weights_changed_after_loading_fall_back_to_a_copy(checkpoint):
    model, key_map = load_single_file(checkpoint)
    target = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    engine = PatchEngine(
        {"unet": model.unet, "text_encoder": model.text_encoder}, FileWeightSource(checkpoint, key_map)
    )
    with torch.no_grad():
        engine.parameter(target)[2].add_(1.0)  # someone edited the model outside the engine
    edited = state_of(model)
    lora = make_lora(model, seed=3, targets=[target])
    stats = engine.apply([PatchEntry(lora, 1.0, 1.0)])
    assert any("keeping a copy" in note for note in stats.notes)
    assert engine.restore_overhead_bytes == engine.parameter(target)[2].numel() * 4
    engine.restore()
    assert_bitwise_equal(model, edited)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_failure_half_way_rolls_back_exactly_from_the_file(checkpoint, dtype, monkeypatch):
    """A write that fails after ~100 weights were already overwritten: the engine recomputes them back, re-reading
    W0 from the file (no copies exist), and the model is bitwise what it was before the call."""
    model, key_map = load_single_file(checkpoint, dtype=dtype)
    engine = PatchEngine(
        {"unet": model.unet, "text_encoder": model.text_encoder}, FileWeightSource(checkpoint, key_map)
    )
    a, b = make_lora(model, seed=11), make_lora(model, seed=12)
    engine.apply([PatchEntry(a, 1.0, 1.0)])
    before = state_of(model)
    calls = fail_writes_after(monkeypatch, 100)
    with pytest.raises(MemoryError):
        engine.apply([PatchEntry(a, 0.2, 1.0), PatchEntry(b, 1.0, 1.0)])
    assert len(calls) > 100 and engine.restore_overhead_bytes == 0
    assert_bitwise_equal(model, before)
    monkeypatch.undo()
    engine.restore()
    assert_bitwise_equal(model, state_of(load_single_file(checkpoint, dtype=dtype)[0]))
