"""The canonical in-memory LoRA: one adapter per target weight, whatever file format it came from."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from .adapters import WeightAdapter

COMPONENTS = ("unet", "text_encoder")


@dataclass
class LoadReport:
    """What a load understood: modules matched per component, and what it could not use (grouped)."""

    source: str
    formats: list[str] = field(default_factory=list)
    matched: dict[str, int] = field(default_factory=dict)
    not_understood: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def not_understood_count(self) -> int:
        return sum(len(keys) for keys in self.not_understood.values())

    def summary(self, examples: int = 2) -> str:
        matched = ", ".join(f"{component} {count}" for component, count in self.matched.items()) or "none"
        lines = [f"{self.source}: format {'+'.join(self.formats) or 'unknown'}; modules matched: {matched}"]
        for group, keys in sorted(self.not_understood.items()):
            shown = ", ".join(keys[:examples]) + (", …" if len(keys) > examples else "")
            lines.append(f"  not understood ({len(keys)} keys) {group}: {shown}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass(eq=False)
class LoRA:
    """A LoRA in canonical form.

    `adapters` maps a target weight — `unet.<diffusers module path>` or
    `text_encoder.text_model.<transformers module path>` — to its adapter.
    `fingerprint` is a digest of the tensors: the engine sums stacked LoRAs in fingerprint order, so
    the same patch set gives bitwise the same weights whatever order it was built in.
    """

    name: str
    adapters: dict[str, WeightAdapter]
    report: LoadReport
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = fingerprint(self.adapters)

    def components(self) -> dict[str, int]:
        counts = dict.fromkeys(COMPONENTS, 0)
        for key in self.adapters:
            counts[component_of(key)] += 1
        return counts

    @property
    def nbytes(self) -> int:
        return sum(adapter.nbytes for adapter in self.adapters.values())


def component_of(target: str) -> str:
    return target.split(".", 1)[0]


def fingerprint(adapters: dict[str, WeightAdapter]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(adapters):
        digest.update(key.encode())
        for tensor in adapters[key].tensors():
            digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()
