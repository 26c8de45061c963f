"""Random LoRAs in kohya's layout, for tests and benchmarks (no trained weights exist offline)."""

from __future__ import annotations

import torch
from torch import nn

from .lora import target_module
from .targets import kohya_name


def random_kohya_lora(
    components: dict[str, nn.Module],
    targets: list[str],
    *,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    scale: float = 0.05,
) -> dict[str, torch.Tensor]:
    """A kohya-format state dict with random up *and* down (so the delta is non-zero)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for target in targets:
        weight = target_module(components, target).weight
        out_features, in_features = weight.shape[0], weight.shape[1]
        kernel = tuple(weight.shape[2:])
        name = kohya_name(target)
        down = torch.randn((rank, in_features, *kernel), generator=generator) * scale
        up = torch.randn((out_features, rank, *((1,) * len(kernel))), generator=generator) * scale
        state[f"{name}.lora_down.weight"] = down.to(dtype)
        state[f"{name}.lora_up.weight"] = up.to(dtype)
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(float(alpha))
    return state
