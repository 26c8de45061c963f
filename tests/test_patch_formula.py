"""Patching in fp32, fp16 and bf16 is "computed in float32 from the untouched W0, rounded once": checked on
every target against the formula evaluated here, in float64, from the LoRA's own factors (not the engine's)."""

import pytest
import torch

from lora_loom.lora_core.patcher import PatchEngine, PatchEntry

from util import MAX_OFF_BY_ONE_FRACTION, assert_is_the_formula, exact_patched, fresh_tiny, make_lora, state_of


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_every_target_is_the_formula_rounded_once(dtype):
    model = fresh_tiny(dtype)
    original = state_of(model)
    a = make_lora(model, seed=1, rank=4, alpha=1.0)
    b = make_lora(model, seed=2, rank=8, scope="attention")
    engine = PatchEngine({"unet": model.unet, "text_encoder": model.text_encoder})
    engine.apply([PatchEntry(b, 1.0, 1.0)])  # some history first: the result must not depend on it
    engine.apply([PatchEntry(a, 0.8, 0.5), PatchEntry(b, -1.0, 2.0)])

    targets = sorted(a.adapters.keys() | b.adapters.keys())
    assert len(targets) == 264
    total = off_by_one = 0
    for target in targets:
        component, name, live = engine.parameter(target)
        strengths = (0.8, -1.0) if component == "unet" else (0.5, 2.0)
        exact = exact_patched(original[f"{component}.{name}"], zip((a, b), strengths, strict=True), target)
        assert live.dtype == dtype
        off_by_one += assert_is_the_formula(live, exact, target)
        total += live.numel()
    assert off_by_one / total <= MAX_OFF_BY_ONE_FRACTION, (off_by_one, total)
