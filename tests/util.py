"""Helpers shared by the tests."""

import torch

from lora_loom.lora_core.formats import parse_lora
from lora_loom.lora_core.sd15_models import build_components
from lora_loom.lora_core.synthetic import kohya_targets, random_kohya_lora


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
