"""The patch engine's contract: exact, order independent, transactional, minimal, reversible."""

import pytest
import torch

from lora_loom.lora_core import delta as delta_module
from lora_loom.lora_core.adapters import LoRAAdapter
from lora_loom.lora_core.lora import LoadReport, LoRA
from lora_loom.lora_core.patcher import PatchEngine, PatchEntry, PatchError
from lora_loom.lora_core.targets import kohya_targets

from util import assert_bitwise_equal, fail_writes_after, fresh_tiny, make_lora, state_of

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def engine_for(components, source=None):
    return PatchEngine({"unet": components.unet, "text_encoder": components.text_encoder}, source)


def weight(components, target):
    return engine_for(components).parameter(target)[2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_restore_is_bit_exact_after_any_history(dtype):
    model = fresh_tiny(dtype)
    original = state_of(model)
    a, b = make_lora(model, seed=1, alpha=1.0), make_lora(model, seed=2, rank=8, scope="attention")
    engine = engine_for(model)
    history = [
        [PatchEntry(a, 0.8, 0.5)],
        [PatchEntry(a, 1.7, -0.3)],
        [PatchEntry(a, 1.7, -0.3), PatchEntry(b, 0.4, 0.9)],
        [PatchEntry(b, 0.4, 0.9)],
        [PatchEntry(b, -2.0, 0.0)],
        [PatchEntry(a, 0.0, 1.0), PatchEntry(b, 1.0, 1.0), PatchEntry(a, 0.3, 0.3)],
    ]
    for patch_set in history:
        engine.apply(patch_set)
        assert any(not torch.equal(v, original[k]) for k, v in state_of(model).items())
    engine.restore()
    assert_bitwise_equal(model, original)
    assert engine.patched_targets == []


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_any_history_equals_applying_the_set_fresh(dtype):
    walked, fresh = fresh_tiny(dtype), fresh_tiny(dtype)
    a, b = make_lora(walked, seed=1), make_lora(walked, seed=2, rank=2, alpha=0.5)
    engine = engine_for(walked)
    engine.apply([PatchEntry(b, 3.0, 1.0)])
    engine.apply([PatchEntry(a, 1.0, 1.0)])
    engine.apply([PatchEntry(a, 0.7, 0.2), PatchEntry(b, 0.1, 0.1)])
    engine.apply([PatchEntry(a, 0.7, 0.2), PatchEntry(b, -0.5, 1.0)])

    engine_for(fresh).apply([PatchEntry(b, -0.5, 1.0), PatchEntry(a, 0.7, 0.2)])  # other stacking order
    assert_bitwise_equal(walked, state_of(fresh))


def test_patched_weight_is_the_lora_formula():
    model = fresh_tiny()
    original = state_of(model)
    lora = make_lora(model, seed=3, rank=4, alpha=2.0)
    engine_for(model).apply([PatchEntry(lora, 0.8, 0.5)])
    for target in (
        "unet.down_blocks.0.attentions.0.proj_in",
        "text_encoder.text_model.encoder.layers.3.mlp.fc1",
    ):
        adapter = lora.adapters[target]
        strength = 0.8 if target.startswith("unet") else 0.5
        component, name, live = engine_for(model).parameter(target)
        w0 = original[f"{component}.{name}"].double()
        up, down = adapter.up.double().flatten(1), adapter.down.double().flatten(1)
        expected = w0 + strength * (2.0 / 4) * (up @ down).reshape(w0.shape)
        torch.testing.assert_close(live.double(), expected, rtol=1e-6, atol=1e-7)


def test_conv_and_tucker_mid_deltas():
    model = fresh_tiny()
    target = "unet.down_blocks.1.resnets.0.conv1"  # a 3x3 conv (LoCon)
    w = weight(model, target)
    out_ch, in_ch = w.shape[:2]
    g = torch.Generator().manual_seed(0)
    plain = LoRAAdapter(up=torch.randn(out_ch, 3, 1, 1, generator=g), down=torch.randn(3, in_ch, 3, 3, generator=g))
    mid = torch.randn(3, 3, 3, 3, generator=g)
    down_1x1 = torch.randn(3, in_ch, 1, 1, generator=g)
    tucker = LoRAAdapter(up=plain.up, down=down_1x1, mid=mid, alpha=1.5)
    expected_plain = (plain.up.flatten(1) @ plain.down.flatten(1)).reshape(w.shape)
    expected_tucker = 0.5 * torch.einsum("oa,abhw,bi->oihw", plain.up.flatten(1), mid, down_1x1.flatten(1))
    torch.testing.assert_close(plain.delta(w.shape, w.device), expected_plain)
    torch.testing.assert_close(tucker.delta(w.shape, w.device), expected_tucker, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["unet", "text_encoder"])
def test_strength_zero_leaves_that_side_untouched(side):
    model = fresh_tiny()
    original = state_of(model)
    lora = make_lora(model, seed=4)
    strengths = (0.0, 1.0) if side == "unet" else (1.0, 0.0)
    stats = engine_for(model).apply([PatchEntry(lora, *strengths)])
    other = "text_encoder" if side == "unet" else "unet"
    now = state_of(model)
    assert all(torch.equal(v, original[k]) for k, v in now.items() if k.startswith(side + "."))
    assert any(not torch.equal(v, original[k]) for k, v in now.items() if k.startswith(other + "."))
    assert stats.weights_written == lora.components()[other]


def test_strength_change_recomputes_only_affected_weights(monkeypatch):
    model = fresh_tiny()
    both = make_lora(model, seed=5)
    te_only = make_lora(model, seed=6, targets=[t for t in kohya_targets() if t.startswith("text_encoder")])
    engine = engine_for(model)
    engine.apply([PatchEntry(both, 1.0, 1.0), PatchEntry(te_only, 1.0, 1.0)])
    calls = []
    real = delta_module.write_patched
    monkeypatch.setattr("lora_loom.lora_core.patcher.write_patched", lambda *a: calls.append(1) or real(*a))
    stats = engine.apply([PatchEntry(both, 0.5, 1.0), PatchEntry(te_only, 1.0, 1.0)])
    assert stats.weights_written == both.components()["unet"] == len(calls) == 192
    calls.clear()
    assert engine.apply([PatchEntry(both, 0.5, 1.0), PatchEntry(te_only, 1.0, 1.0)]).weights_written == 0
    assert not calls


def test_shape_mismatch_is_rejected_before_any_weight_changes():
    model = fresh_tiny()
    good = make_lora(model, seed=7)
    engine = engine_for(model)
    engine.apply([PatchEntry(good, 1.0, 1.0)])
    before = state_of(model)
    adapters = dict(make_lora(model, seed=8).adapters)
    last = sorted(adapters)[-1]  # the check must run before *any* write, not just before this one
    adapters[last] = LoRAAdapter(up=torch.ones(7, 2), down=torch.ones(2, 5))
    wrong = LoRA("wrong-arch", adapters, LoadReport("mem"))
    with pytest.raises(PatchError, match=r"wrong-arch.*does not fit " + last.replace(".", r"\.")):
        engine.apply([PatchEntry(good, 1.0, 1.0), PatchEntry(wrong, 1.0, 1.0)])
    assert_bitwise_equal(model, before)
    assert engine.patch_set[0].lora is good and len(engine.patch_set) == 1


def test_non_finite_adapter_or_strength_is_rejected():
    model = fresh_tiny()
    original = state_of(model)
    adapters = dict(make_lora(model, seed=9).adapters)
    key = sorted(adapters)[0]
    bad_up = adapters[key].up.clone()
    bad_up[0, 0] = float("nan")
    adapters[key] = LoRAAdapter(up=bad_up, down=adapters[key].down)
    engine = engine_for(model)
    with pytest.raises(PatchError, match="NaN"):
        engine.apply([PatchEntry(LoRA("nan", adapters, LoadReport("mem")), 1.0, 1.0)])
    with pytest.raises(PatchError, match="not finite"):
        engine.apply([PatchEntry(make_lora(model, seed=10), float("inf"), 1.0)])
    assert_bitwise_equal(model, original)


def test_failure_half_way_rolls_back_exactly(monkeypatch):
    model = fresh_tiny(torch.float16)
    a, b = make_lora(model, seed=11), make_lora(model, seed=12)
    engine = engine_for(model)
    engine.apply([PatchEntry(a, 1.0, 1.0)])
    before = state_of(model)
    calls = fail_writes_after(monkeypatch, 100)
    with pytest.raises(MemoryError):
        engine.apply([PatchEntry(a, 0.2, 1.0), PatchEntry(b, 1.0, 1.0)])
    assert len(calls) > 100  # it did write ~99 weights, then put them back
    assert_bitwise_equal(model, before)
    monkeypatch.undo()
    engine.restore()
    fresh = fresh_tiny(torch.float16)
    assert_bitwise_equal(model, state_of(fresh))


def test_fp16_overflow_is_refused_and_model_unchanged():
    model = fresh_tiny(torch.float16)
    original = state_of(model)
    huge = make_lora(model, seed=13)
    for adapter in huge.adapters.values():
        adapter.up.mul_(1e6)
    with pytest.raises(PatchError, match="does not fit float16"):
        engine_for(model).apply([PatchEntry(huge, 10.0, 10.0)])
    assert_bitwise_equal(model, original)


def test_fused_layers_are_a_base_rounded_like_a_saved_checkpoint():
    model = fresh_tiny(torch.bfloat16)
    a, b = make_lora(model, seed=14), make_lora(model, seed=15, scope="attention")
    engine = engine_for(model)
    engine.apply([PatchEntry(a, 0.9, 0.4)])
    fused = state_of(model)
    engine.apply([PatchEntry(b, 1.0, 1.0)], fused_layers=[[PatchEntry(a, 0.9, 0.4)]])
    engine.apply([PatchEntry(b, 0.5, 2.0)], fused_layers=[[PatchEntry(a, 0.9, 0.4)]])
    on_top = state_of(model)
    engine.apply([], fused_layers=[[PatchEntry(a, 0.9, 0.4)]])
    assert_bitwise_equal(model, fused)

    # Same as patching a checkpoint that was saved with `a` merged in (two roundings, not one).
    saved = fresh_tiny(torch.bfloat16)
    engine_for(saved).apply([PatchEntry(a, 0.9, 0.4)])
    merged = fresh_tiny(torch.bfloat16)
    for name in ("unet", "text_encoder"):
        getattr(merged, name).load_state_dict(getattr(saved, name).state_dict())
    engine_for(merged).apply([PatchEntry(b, 0.5, 2.0)])
    assert_bitwise_equal(merged, on_top)

    engine.restore()
    assert_bitwise_equal(model, state_of(fresh_tiny(torch.bfloat16)))


def test_restore_without_a_file_keeps_copies_only_of_patched_weights():
    model = fresh_tiny()
    lora = make_lora(model, seed=16, scope="attention")
    engine = engine_for(model)
    engine.apply([PatchEntry(lora, 1.0, 1.0)])
    patched_bytes = sum(engine.parameter(t)[2].numel() * engine.parameter(t)[2].element_size() for t in lora.adapters)
    assert engine.restore_overhead_bytes == patched_bytes


@pytest.mark.parametrize("kind", ["locon-3x3", "tucker-mid", "1x1-proj_in"])
def test_conv_loras_patch_what_their_layers_compute(kind):
    """Reference: the LoRA as the layers its file describes (down conv → [mid conv] → up conv, as kohya's LoCon
    module runs them), applied to a random input in float64 — not a formula for the weight."""
    import torch.nn.functional as F

    model = fresh_tiny()
    target = (
        "unet.down_blocks.0.attentions.0.proj_in" if kind == "1x1-proj_in" else "unet.down_blocks.1.resnets.0.conv1"
    )
    w0 = weight(model, target).detach().clone()
    out_ch, in_ch, kh, kw = w0.shape
    g = torch.Generator().manual_seed(7)
    up = torch.randn(out_ch, 3, 1, 1, generator=g) * 0.1
    if kind == "tucker-mid":
        down, mid = torch.randn(3, in_ch, 1, 1, generator=g) * 0.1, torch.randn(3, 3, kh, kw, generator=g) * 0.1
    else:
        down, mid = torch.randn(3, in_ch, kh, kw, generator=g) * 0.1, None
    adapter = LoRAAdapter(up=up, down=down, mid=mid, alpha=1.5)
    engine = engine_for(model)
    engine.apply([PatchEntry(LoRA(kind, {target: adapter}, LoadReport("mem")), 0.8, 1.0)])
    live = weight(model, target).detach()

    x = torch.randn(2, in_ch, 9, 9, generator=g, dtype=torch.float64)
    padding = kh // 2
    hidden = F.conv2d(x, down.double(), padding=0 if mid is not None else padding)
    if mid is not None:
        hidden = F.conv2d(hidden, mid.double(), padding=padding)
    lora_out = F.conv2d(hidden, up.double())
    expected = F.conv2d(x, w0.double(), padding=padding) + 0.8 * (1.5 / 3) * lora_out
    torch.testing.assert_close(F.conv2d(x, live.double(), padding=padding), expected, rtol=1e-5, atol=1e-6)
    engine.restore()
    assert torch.equal(weight(model, target), w0)


def test_cache_nbytes_counts_only_new_factor_memory():
    """For a float32 LoRA the cached `down` is a view (free) and the scaled `up` is new; half precision: both new."""
    model = fresh_tiny()
    lora = make_lora(model, seed=17, scope="attention")
    assert all(adapter.cache_nbytes == 0 for adapter in lora.adapters.values())  # nothing cached yet
    engine_for(model).apply([PatchEntry(lora, 1.0, 1.0)])
    for adapter in lora.adapters.values():
        assert adapter.cache_nbytes == adapter.up.numel() * 4
    half = LoRAAdapter(up=torch.ones(8, 2, dtype=torch.float16), down=torch.ones(2, 5, dtype=torch.float16))
    half.low_rank_factors(torch.device("cpu"))
    assert half.cache_nbytes == (8 * 2 + 2 * 5) * 4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shared_weights_are_copy_on_write(dtype):
    """Weights handed to another owner without a copy (LoomToComfy) keep the values they were handed with,
    whatever the engine applies later; the engine's own weights are what it would be without sharing."""
    model, alone = fresh_tiny(dtype), fresh_tiny(dtype)
    a, b = make_lora(model, seed=17), make_lora(model, seed=18, scope="attention")
    engine = engine_for(model)
    engine.apply([PatchEntry(a, 0.7, 0.4)])
    handed_state = state_of(model)
    handed = {
        f"{name}.{key}": value
        for name in ("unet", "text_encoder")
        for key, value in getattr(model, name).state_dict().items()
    }
    engine.share_weights()

    engine.apply([PatchEntry(a, 0.7, 0.4), PatchEntry(b, 1.5, 0.5)])
    engine.apply([PatchEntry(b, -1.0, 2.0)])
    for key, tensor in handed.items():
        assert torch.equal(tensor, handed_state[key]), f"{key} changed under its other owner"
    engine_for(alone).apply([PatchEntry(b, -1.0, 2.0)])
    assert_bitwise_equal(model, state_of(alone))

    # Only written weights got new tensors; a weight made our own is written in place from then on.
    untouched = "unet.conv_in.weight"
    assert model.unet.state_dict()["conv_in.weight"].data_ptr() == handed[untouched].data_ptr()
    target = next(iter(b.adapters))
    own = engine.parameter(target)[2]
    assert own.data_ptr() != handed[f"{target.split('.', 1)[0]}.{engine.parameter(target)[1]}"].data_ptr()
    engine.restore()
    assert engine.parameter(target)[2] is own
    assert_bitwise_equal(model, state_of(fresh_tiny(dtype)))
