"""Random LoRAs in kohya's layout, for tests and benchmarks (no trained weights exist offline)."""

from __future__ import annotations

import torch
from torch import nn

from .lora import target_module
from .targets import kohya_name, sd15_modules

_UNET_ATTENTION = (".to_q", ".to_k", ".to_v", ".to_out.0")
_UNET_TRANSFORMER_EXTRA = (".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out")
_TE_ATTENTION = (".q_proj", ".k_proj", ".v_proj", ".out_proj")
_TE_MLP = (".fc1", ".fc2")


def kohya_targets(scope: str = "all") -> list[str]:
    """Canonical targets kohya's sd-scripts trains on SD1.5.

    "all": U-Net Transformer2DModel children (192) + text-encoder attention and MLP (72) = 264.
    "attention": U-Net attn1/attn2 projections (128) + text-encoder self-attention (48) = 176.
    """
    if scope not in ("all", "attention"):
        raise ValueError(f"scope must be 'all' or 'attention', not {scope!r}")
    modules = sd15_modules()
    unet_suffixes = _UNET_ATTENTION + (_UNET_TRANSFORMER_EXTRA if scope == "all" else ())
    te_suffixes = _TE_ATTENTION + (_TE_MLP if scope == "all" else ())
    unet = [f"unet.{n}" for n in modules["unet"] if ".attentions." in n and n.endswith(unet_suffixes)]
    text = [f"text_encoder.{n}" for n in modules["text_encoder"] if n.endswith(te_suffixes)]
    return unet + text


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
