"""Helpers shared by the tests."""

import torch

from lora_loom.lora_core.formats import parse_lora
from lora_loom.lora_core.synthetic import random_kohya_lora
from lora_loom.lora_core.targets import kohya_targets
from lora_loom.sd15.models import build_components
from lora_loom.toyworld import dataset as toy_dataset


def state_of(components) -> dict[str, torch.Tensor]:
    """A deep copy of every parameter, keyed by component-qualified name."""
    return {
        f"{name}.{key}": value.detach().clone()
        for name in ("unet", "text_encoder", "vae")
        for key, value in getattr(components, name).state_dict().items()
    }


def assert_bitwise_equal(components, expected: dict[str, torch.Tensor]) -> None:
    different = [k for k, v in state_of(components).items() if not torch.equal(v, expected[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def fresh_tiny(dtype=torch.float32, seed=0):
    return build_components("tiny-sd15", seed=seed, dtype=dtype)


def make_lora(components, *, seed=1, rank=4, alpha=None, scope="all", name=None, targets=None):
    parts = {"unet": components.unet, "text_encoder": components.text_encoder}
    state = random_kohya_lora(parts, targets or kohya_targets(scope), rank=rank, alpha=alpha, seed=seed)
    return parse_lora(state, name=name or f"lora{seed}")


def exact_patched(w0: torch.Tensor, loras_and_strengths, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """W0 + Σ ηᵢ · (αᵢ / rᵢ) · Bᵢ Aᵢ in float64, from the LoRAs' own factors (independent of the engine), and
    the magnitude |W0| + Σ |ηᵢ αᵢ / rᵢ| · |Bᵢ| |Aᵢ| that bounds a float32 evaluation's rounding error."""
    expected, magnitude = w0.double().cpu(), w0.double().cpu().abs()
    for lora, strength in loras_and_strengths:
        adapter = lora.adapters.get(target)
        if adapter is not None:
            up, down = adapter.up.double().cpu().flatten(1), adapter.down.double().cpu().flatten(1)
            factor = strength * adapter.alpha / adapter.rank
            expected = expected + factor * (up @ down).reshape(w0.shape)
            magnitude = magnitude + abs(factor) * (up.abs() @ down.abs()).reshape(w0.shape)
    return expected, magnitude


def ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of `values`' dtype at each value, in float64."""
    return (torch.nextafter(values, torch.full_like(values, float("inf"))).double() - values.double()).abs()


# An engine that sums in float32 and rounds once differs from the float64 formula by float32 summation noise
# (≤ 16·2⁻²⁴ of the terms' magnitude here) and, in half precision, by the final rounding: equal to the formula
# rounded to fp16/bf16 except where the float32 sum lands across a rounding boundary (1 ulp). Measured: 51
# (fp16) and 9 (bf16) of 2 146 304 elements. Rounding twice (the delta to half precision, then the sum)
# misplaces many more; dropping the LoRA, nearly all.
MAX_OFF_BY_ONE_FRACTION = 1e-3
FLOAT32_NOISE = 16 * 2.0**-24


def assert_is_the_formula(live: torch.Tensor, exact: tuple[torch.Tensor, torch.Tensor], target: str) -> int:
    """`live` is the formula (`exact_patched`) evaluated in float32 and rounded once to its dtype; returns how
    many elements differ from the formula rounded directly to that dtype (≤ 1 ulp + float32 noise each)."""
    value, magnitude = exact
    live = live.detach().cpu()
    allowed = FLOAT32_NOISE * magnitude
    if live.dtype != torch.float32:
        allowed = allowed + ulp(live)
    error = (live.double() - value).abs()
    assert bool((error <= allowed).all()), (target, float((error / allowed).max()))
    return int((live != value.to(live.dtype)).sum()) if live.dtype != torch.float32 else 0


def fail_writes_after(monkeypatch, count: int) -> list[int]:
    """Make the engine's weight writes raise MemoryError right *after* the `count`-th one has overwritten its
    weight (a failure half way through an apply); returns the list that counts the writes."""
    from lora_loom.lora_core import delta

    real, calls = delta.write_patched, []

    def failing(*args):
        calls.append(1)
        real(*args)
        if len(calls) == count:
            raise MemoryError("simulated out of memory")

    monkeypatch.setattr("lora_loom.lora_core.patcher.write_patched", failing)
    return calls


def write_dataset(folder, n=6):
    """A small TrainLoRA dataset folder: toy-world scenes (64×64 PNGs) with their captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(toy_dataset(n, seed=3)):
        item.image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(item.caption)
    return folder


def peft_state_for_kohya_converter() -> dict[str, torch.Tensor]:
    """PEFT adapters on a tiny SD1.5 (U-Net rank 4 on to_q / proj_in / ff.net.2, text encoder rank 2 on k_proj /
    fc2, alpha = rank), named as diffusers' `convert_state_dict_to_kohya` expects them (`unet.…`, `text_encoder.…`)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    model = build_components("tiny-sd15", seed=0)
    torch.manual_seed(5)
    unet_config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "proj_in", "ff.net.2"])
    te_config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["k_proj", "fc2"])
    inject_adapter_in_model(unet_config, model.unet)
    inject_adapter_in_model(te_config, model.text_encoder)
    return {
        **{f"unet.{k}": v for k, v in get_peft_model_state_dict(model.unet).items()},
        **{f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(model.text_encoder).items()},
    }


def attention_processor_state(lora) -> dict[str, torch.Tensor]:
    """A parsed LoRA's U-Net attention adapters under old diffusers attention-processor names
    (`….processor.to_q_lora.up.weight`), which carry no alpha: the scale goes into the up factor."""
    state = {}
    for target, adapter in lora.adapters.items():
        if target.startswith("unet.") and ".attn" in target:
            attention, proj = target[5:].rsplit(".", 1) if not target.endswith("to_out.0") else (target[5:-9], "to_out")
            state[f"{attention}.processor.{proj}_lora.up.weight"] = adapter.up * adapter.scale
            state[f"{attention}.processor.{proj}_lora.down.weight"] = adapter.down
    return state
