"""LoRA (and kohya LoCon with an optional Tucker `lora_mid`): delta = (alpha / rank) · up @ down."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from .base import AdapterError, WeightAdapter


class LoRAAdapter(WeightAdapter):
    """Low-rank adapter in kohya's naming: `up` [out, r(,1,1)], `down` [r, in(,kh,kw)], optional `mid`.

    `mid` [r, r, kh, kw] is LoCon's Tucker core: then `down` is [r, in, 1, 1] and the
    kernel lives in `mid`. `alpha` None means alpha = rank (kohya's and diffusers' convention).
    `rank_scaling` "sqrt" is rsLoRA (alpha / sqrt(rank)).
    """

    kind: ClassVar[str] = "lora"

    def __init__(
        self,
        up: torch.Tensor,
        down: torch.Tensor,
        alpha: float | None = None,
        mid: torch.Tensor | None = None,
        rank_scaling: str = "linear",
    ) -> None:
        if down.ndim not in (2, 4) or up.ndim not in (2, 4):
            shapes = f"{tuple(up.shape)} / {tuple(down.shape)}"
            raise AdapterError(f"LoRA up/down must be 2-D or 4-D, got {shapes}")
        self.up = up
        self.down = down
        self.mid = mid
        self.rank = down.shape[0]
        if up.shape[1] != self.rank:
            raise AdapterError(f"LoRA up {tuple(up.shape)} does not match down {tuple(down.shape)} (rank)")
        if mid is not None and (mid.ndim != 4 or mid.shape[0] != self.rank or mid.shape[1] != self.rank):
            raise AdapterError(f"LoRA mid {tuple(mid.shape)} does not match rank {self.rank}")
        self.alpha = float(self.rank if alpha is None else alpha)
        self.rank_scaling = rank_scaling
        denominator = math.sqrt(self.rank) if rank_scaling == "sqrt" else self.rank
        self.scale = self.alpha / denominator
        self._factors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._finite: bool | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.up, self.down, self.mid) if t is not None]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def in_numel(self) -> int:
        """Elements of one output row of the weight this adapter produces (in · kh · kw)."""
        if self.mid is None:
            return self.down[0].numel()
        return self.down.shape[1] * self.mid.shape[2] * self.mid.shape[3]

    def check(self, weight_shape: torch.Size) -> None:
        if self._finite is None:
            self._finite = all(bool(torch.isfinite(t).all()) for t in self.tensors())
        if not self._finite:
            raise AdapterError("LoRA tensors contain NaN or Inf")
        row = math.prod(weight_shape[1:])
        if weight_shape[0] != self.out_features or row != self.in_numel:
            raise AdapterError(
                f"LoRA produces [{self.out_features}, {self.in_numel}] but the weight is {list(weight_shape)}"
            )

    @property
    def cache_nbytes(self) -> int:
        """Memory held by the cached float32 factors beyond the adapter's own tensors (a view costs nothing:
        for a float32 LoRA `down` is one, the scaled `up` is new)."""
        own = {t.untyped_storage().data_ptr() for t in self.tensors()}
        cached = (t for pair in self._factors.values() for t in pair)
        return sum(t.numel() * t.element_size() for t in cached if t.untyped_storage().data_ptr() not in own)

    def low_rank_factors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        factors = self._factors.get(device)
        if factors is None:
            up = self.up.to(device=device, dtype=torch.float32).flatten(1)
            down = self.down.to(device=device, dtype=torch.float32)
            if self.mid is None:
                down = down.flatten(1)
            else:
                # Tucker: delta[o, i, h, w] = Σ up[o, a] · mid[a, b, h, w] · down[b, i]
                mid = self.mid.to(device=device, dtype=torch.float32)
                down = torch.einsum("abhw,bi->aihw", mid, down.flatten(1)).flatten(1)
            factors = (up * self.scale, down)
            self._factors[device] = factors
        return factors

    def delta(self, weight_shape: torch.Size, device: torch.device) -> torch.Tensor:
        up, down = self.low_rank_factors(device)
        return (up @ down).reshape(weight_shape)
