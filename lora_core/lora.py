"""The canonical in-memory LoRA: one adapter per target weight, whatever file format it came from."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..sd15.keys import text_encoder_is_flat
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

    Immutable once made: the engine caches each adapter's factors and tells patch sets apart by adapter
    identity. To change factors (training), take `trainable.TrainableLoRA.from_lora(lora)` and `freeze()` it
    into a new LoRA.
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


def module_path(model: nn.Module, target: str) -> str:
    """The path inside its component model of a canonical target (`text_encoder.text_model.…` loses its
    `text_model.` on a flat, transformers >= 5.6, text encoder)."""
    component, path = target.split(".", 1)
    if component == "text_encoder" and text_encoder_is_flat(model):
        path = path.removeprefix("text_model.")
    return path


def target_module(components: Mapping[str, nn.Module], target: str) -> nn.Module:
    """The module a canonical target names in `components` ({"unet": …, "text_encoder": …})."""
    model = components[component_of(target)]
    return model.get_submodule(module_path(model, target))


def fingerprint(adapters: dict[str, WeightAdapter]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted(adapters):
        digest.update(key.encode())
        for tensor in adapters[key].tensors():
            digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()
