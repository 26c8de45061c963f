"""The boundary between a LoRA being trained and a LoRA the engine patches.

A loaded `LoRA` is immutable: the engine caches its factors and finiteness per adapter and tells patch sets
apart by adapter identity and fingerprint. Training therefore works on a separate, mutable form: a
`TrainableLoRA` holds every factor as an `nn.Parameter` (float32), and `freeze()` copies them into a *new*
`LoRA` (new adapters, new fingerprint, empty caches), which the engine patches like any loaded file. Editing
the trainable form never changes a LoRA already frozen from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .adapters import LoRAAdapter
from .lora import LoadReport, LoRA, target_module


class TrainableAdapter(nn.Module):
    """One module's LoRA factors as parameters: `up` [out, r(,1,1)], `down` [r, in(,kh,kw)], optional `mid`."""

    def __init__(
        self,
        up: torch.Tensor,
        down: torch.Tensor,
        alpha: float,
        mid: torch.Tensor | None = None,
        rank_scaling: str = "linear",
    ) -> None:
        super().__init__()
        self.up = nn.Parameter(up.detach().to(torch.float32, copy=True))
        self.down = nn.Parameter(down.detach().to(torch.float32, copy=True))
        self.register_parameter("mid", None if mid is None else nn.Parameter(mid.detach().to(torch.float32, copy=True)))
        self.alpha = float(alpha)
        self.rank_scaling = rank_scaling

    @classmethod
    def from_adapter(cls, adapter: LoRAAdapter) -> TrainableAdapter:
        return cls(adapter.up, adapter.down, adapter.alpha, adapter.mid, adapter.rank_scaling)

    @classmethod
    def initialized(
        cls, weight_shape: Sequence[int], rank: int, alpha: float, generator: torch.Generator
    ) -> TrainableAdapter:
        """kohya's and PEFT's start: `down` Kaiming-uniform (as `nn.Linear` initialises its weight, a = √5),
        `up` zeros, so the model is unchanged at step 0. Convolutions get a [r, in, kh, kw] `down` and a 1×1
        `up`, as kohya's LoRA on a conv."""
        out_features, in_features, *kernel = weight_shape
        down = torch.empty(rank, in_features, *kernel)
        fan_in = in_features * math.prod(kernel)
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=√5) = U(-1/√fan_in, 1/√fan_in)
        down.uniform_(-bound, bound, generator=generator)
        up = torch.zeros(out_features, rank, *([1] * len(kernel)))
        return cls(up, down, alpha)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rank_scaling == "sqrt" else self.rank)

    def freeze(self) -> LoRAAdapter:
        """An immutable adapter holding copies of the current factors."""

        def copy(parameter: nn.Parameter | None) -> torch.Tensor | None:
            return None if parameter is None else parameter.detach().clone()

        return LoRAAdapter(copy(self.up), copy(self.down), self.alpha, copy(self.mid), self.rank_scaling)


def _module_key(target: str) -> str:
    return target.replace(".", "/")  # nn.ModuleDict keys may not contain dots


class TrainableLoRA(nn.Module):
    """A whole LoRA in trainable form: {canonical target: TrainableAdapter}."""

    def __init__(self, adapters: Mapping[str, TrainableAdapter], name: str = "lora") -> None:
        super().__init__()
        self.name = name
        self.adapters = nn.ModuleDict({_module_key(t): a for t, a in sorted(adapters.items())})

    @classmethod
    def from_lora(cls, lora: LoRA) -> TrainableLoRA:
        """Start from a loaded LoRA (to train further); the LoRA itself is left untouched."""
        adapters = {}
        for target, adapter in lora.adapters.items():
            if not isinstance(adapter, LoRAAdapter):
                raise TypeError(f"{target}: a {adapter.kind} adapter has no trainable LoRA form")
            adapters[target] = TrainableAdapter.from_adapter(adapter)
        return cls(adapters, lora.name)

    @classmethod
    def initialized(
        cls,
        components: Mapping[str, nn.Module],
        targets: Sequence[str],
        *,
        rank: int,
        alpha: float,
        seed: int,
        name: str = "lora",
    ) -> TrainableLoRA:
        """Fresh factors for `targets` of these models (kohya's initialisation, seeded, in target order)."""
        generator = torch.Generator().manual_seed(seed)
        adapters = {
            target: TrainableAdapter.initialized(target_module(components, target).weight.shape, rank, alpha, generator)
            for target in targets
        }
        return cls(adapters, name)

    def items(self) -> list[tuple[str, TrainableAdapter]]:
        return [(key.replace("/", "."), adapter) for key, adapter in self.adapters.items()]

    def freeze(self, name: str | None = None) -> LoRA:
        """A new immutable `LoRA` with copies of the current factors (its own fingerprint and caches)."""
        name = name or self.name
        return LoRA(name, {target: adapter.freeze() for target, adapter in self.items()}, LoadReport(name))
