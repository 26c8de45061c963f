"""The one small base class every adapter kind (LoRA now; LoHa, LoKr, DoRA later) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class AdapterError(ValueError):
    """An adapter does not fit the weight it targets (shape, non-finite values, unsupported layout)."""


class WeightAdapter(ABC):
    """A learned change to one weight tensor.

    `delta` is the adapter's own contribution at strength 1, in float32, already including its
    internal scale (alpha / rank for LoRA). The patch engine multiplies by the user's strength.
    """

    kind: ClassVar[str]

    @abstractmethod
    def check(self, weight_shape: torch.Size) -> None:
        """Raise AdapterError if this adapter cannot be added to a weight of this shape."""

    @abstractmethod
    def delta(self, weight_shape: torch.Size, device: torch.device) -> torch.Tensor:
        """float32 delta of shape `weight_shape` on `device`, at strength 1."""

    def low_rank_factors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(up [out, r], down [r, in]) in float32 with delta == up @ down, or None if not low rank.

        Low-rank adapters on one weight are summed as one matrix product of concatenated factors.
        """
        return None

    @abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """The stored tensors (for finiteness checks, fingerprints and memory accounting)."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
