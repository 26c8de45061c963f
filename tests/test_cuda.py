"""The engine on a CUDA device (skipped where there is none; run on a GPU machine before releases)."""

import pytest
import torch

from lora_loom.lora_core.patcher import PatchEngine, PatchEntry
from lora_loom.lora_core.weight_source import FileWeightSource
from lora_loom.sd15.models import build_components, load_single_file, save_single_file

from util import (
    MAX_OFF_BY_ONE_FRACTION,
    assert_bitwise_equal,
    assert_is_the_formula,
    exact_patched,
    make_lora,
    state_of,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_exact_restore_order_independence_and_cpu_agreement(tmp_path, dtype):
    path = tmp_path / "tiny.safetensors"
    save_single_file(build_components("tiny-sd15", seed=0), path)
    model, key_map = load_single_file(path, dtype=dtype, device="cuda")
    original = state_of(model)
    engine = PatchEngine({"unet": model.unet, "text_encoder": model.text_encoder}, FileWeightSource(path, key_map))
    a, b = make_lora(model, seed=1), make_lora(model, seed=2, scope="attention")

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as hosts often set it: the engine must not use TF32
    try:
        engine.apply([PatchEntry(b, 1.0, 1.0)])
        engine.apply([PatchEntry(a, 0.8, 0.5), PatchEntry(b, -1.0, 2.0)])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert engine.restore_overhead_bytes == 0
    walked = state_of(model)

    fresh, _ = load_single_file(path, dtype=dtype, device="cuda")
    PatchEngine({"unet": fresh.unet, "text_encoder": fresh.text_encoder}).apply(
        [PatchEntry(b, -1.0, 2.0), PatchEntry(a, 0.8, 0.5)]
    )
    assert_bitwise_equal(fresh, walked)

    # Every target against the formula evaluated independently (float64, CPU), with the CPU's rules: fp32
    # within float32 summation noise, fp16/bf16 rounded once (≤ 1 ulp off, on a tiny fraction of elements).
    strengths = {"unet": (0.8, -1.0), "text_encoder": (0.5, 2.0)}
    off_by_one = total = 0
    for target in sorted(a.adapters.keys() | b.adapters.keys()):
        component, name, live = engine.parameter(target)
        assert live.device.type == "cuda"
        exact = exact_patched(original[f"{component}.{name}"], zip((a, b), strengths[component], strict=True), target)
        off_by_one += assert_is_the_formula(live, exact, target)
        total += live.numel()
    assert off_by_one / total <= MAX_OFF_BY_ONE_FRACTION, (off_by_one, total)

    engine.restore()
    assert_bitwise_equal(model, original)


def test_cuda_training_stops_resumes_and_exports(tmp_path):
    from safetensors.torch import load_file

    from lora_loom.toyworld import train

    micro = train.Recipe(n_images=32, vae_steps=4, vae_batch=4, clip_steps=4, clip_batch=4, unet_steps=4, unet_batch=4)
    stops = 0
    while not train.run(tmp_path, micro, "all", tmp_path / "base.safetensors", stop_after=3, device="cuda"):
        stops += 1  # each resume reloads GPU-trained checkpoints through the CPU
    assert stops == 3
    exported = load_file(tmp_path / "base.safetensors")
    assert len(exported) == 1130 and all(torch.isfinite(t.float()).all() for t in exported.values())
