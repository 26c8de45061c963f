"""The patch engine: LoRAs are patched into the model's weights in place, reversibly and exactly.

Every patched weight is always `patched_weight(W0, contributions)` — a pure function of the
untouched base weight and the current patch set — so any history of apply / re-weight / stack /
unstack / restore lands on bitwise the same tensors as applying the final set fresh.

W0 is re-read from the safetensors file the base was loaded from when there is one (no RAM cost);
otherwise a copy of each weight is kept the first time it is patched.

Weights handed to another owner without a copy (`share_weights`, e.g. to ComfyUI's own model objects) are
copy-on-write: the engine's first write to such a weight puts a new tensor in the module, so the other owner
keeps the values it was given.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import AdapterError
from .delta import Contribution, patched_weight, write_patched
from .lora import LoRA, component_of, module_path
from .weight_source import FileWeightSource


class PatchError(RuntimeError):
    """A patch could not be applied; the model was left exactly as it was."""


@dataclass(frozen=True, eq=False)
class PatchEntry:
    """One LoRA in a patch set, with its strengths for the U-Net and the text encoder."""

    lora: LoRA
    strength_unet: float = 1.0
    strength_text_encoder: float = 1.0

    def strength_for(self, component: str) -> float:
        return self.strength_unet if component == "unet" else self.strength_text_encoder

    def sort_key(self) -> tuple:
        return (self.lora.fingerprint, self.strength_unet, self.strength_text_encoder)


PatchSet = tuple[PatchEntry, ...]
# What one weight holds: W0, then each stage's contributions added and rounded in turn. Fused
# layers are earlier stages (rounded to the weight's dtype, like a saved checkpoint); the live patch
# set is the last. Empty stages are dropped, so a weight nobody patches holds `()`.
Stages = tuple[tuple[Contribution, ...], ...]


@dataclass
class PatchStats:
    """What one engine call did."""

    weights_written: int = 0
    weights_unchanged: int = 0
    notes: list[str] = field(default_factory=list)


def contributions_by_target(patch_set: Iterable[PatchEntry]) -> dict[str, tuple[Contribution, ...]]:
    """Per target weight, the (adapter, strength) pairs of a patch set in canonical order.

    Canonical order (by LoRA fingerprint) makes the float32 sum independent of stacking order.
    Strength 0 contributes nothing, so that side of the model is not touched at all.
    """
    contributions: dict[str, list[Contribution]] = {}
    for entry in sorted(patch_set, key=PatchEntry.sort_key):
        for target, adapter in entry.lora.adapters.items():
            strength = float(entry.strength_for(component_of(target)))
            if strength != 0.0:
                contributions.setdefault(target, []).append((adapter, strength))
    return {target: tuple(pairs) for target, pairs in contributions.items()}


def stages_by_target(layers: Sequence[Iterable[PatchEntry]]) -> dict[str, Stages]:
    """Per target weight, the non-empty stages of a sequence of patch sets (fused layers, then live)."""
    stages: dict[str, list[tuple[Contribution, ...]]] = {}
    for layer in layers:
        for target, contributions in contributions_by_target(layer).items():
            stages.setdefault(target, []).append(contributions)
    return {target: tuple(layer) for target, layer in stages.items()}


class PatchEngine:
    """Patches LoRAs into `components` ({"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}).

    `source` (optional) re-reads untouched weights from the file the base was loaded from.
    Several handles may share one engine: each brings the weights to its own (fused layers, patch
    set) before use, and the engine re-computes only the weights that differ.
    """

    def __init__(self, components: Mapping[str, nn.Module], source: FileWeightSource | None = None) -> None:
        self.components = dict(components)
        self.source = source
        self.patch_set: PatchSet = ()
        self.fused_layers: tuple[PatchSet, ...] = ()
        self._applied: dict[str, Stages] = {}
        self._backups: dict[str, torch.Tensor] = {}
        self._file_backed: set[str] = set()
        self._modules: dict[str, tuple[str, str, nn.Module]] = {}  # target -> (component, name, module)

    # ---- public operations -------------------------------------------------------------------

    def apply(self, patch_set: Iterable[PatchEntry], fused_layers: Sequence[Iterable[PatchEntry]] = ()) -> PatchStats:
        """Bring the weights to exactly `fused_layers` + `patch_set`, touching only weights that change.

        `fused_layers` are patch sets made part of the base (FuseLoRA), oldest first: each is added
        and rounded to the weight's dtype in turn, as if saved and re-loaded.
        Transactional: everything is checked before any weight changes, and if writing fails half
        way the weights already written are recomputed back, so the model is bitwise unchanged.
        """
        patch_set = tuple(patch_set)
        fused_layers = tuple(tuple(layer) for layer in fused_layers)
        for entry in (e for layer in (*fused_layers, patch_set) for e in layer):
            for strength in (entry.strength_unet, entry.strength_text_encoder):
                if not math.isfinite(strength):
                    raise PatchError(f"LoRA '{entry.lora.name}': strength {strength} is not finite")
        desired = stages_by_target((*fused_layers, patch_set))
        touched = desired.keys() | self._applied.keys()
        changed = sorted(t for t in touched if desired.get(t, ()) != self._applied.get(t, ()))
        self._check(changed, desired, (*fused_layers, patch_set))

        stats = PatchStats(weights_unchanged=len(touched) - len(changed))
        previous = dict(self._applied)
        written: list[str] = []
        try:
            for target in changed:
                self._write(target, desired.get(target, ()), stats)
                written.append(target)
        except BaseException:
            for target in reversed(written):
                self._write(target, previous.get(target, ()), PatchStats())
            raise
        stats.weights_written = len(written)
        self.patch_set, self.fused_layers = patch_set, fused_layers
        return stats

    def check(self, patch_set: Iterable[PatchEntry]) -> None:
        """Raise PatchError if any LoRA in `patch_set` does not fit this model; changes nothing."""
        patch_set = tuple(patch_set)
        desired = stages_by_target([patch_set])
        self._check(sorted(desired), desired, [patch_set])

    def restore(self) -> PatchStats:
        """Put every patched weight back to its base value, bit for bit."""
        return self.apply(())

    def share_weights(self) -> None:
        """Mark every weight of the components as shared with another owner: from now on the engine's first write
        to each one goes to a new tensor (copy-on-write) instead of into the shared one."""
        for model in self.components.values():
            for parameter in model.parameters():
                parameter.lora_loom_shared = True

    @property
    def restore_overhead_bytes(self) -> int:
        """RAM held only to be able to restore: copies of weights no file backs."""
        return sum(t.numel() * t.element_size() for t in self._backups.values())

    @property
    def patched_targets(self) -> list[str]:
        return sorted(self._applied)

    # ---- internals ------------------------------------------------------------------------

    def parameter(self, target: str) -> tuple[str, str, nn.Parameter]:
        """(component, model parameter name, parameter) for a canonical target key."""
        found = self._modules.get(target)
        if found is None:
            found = self._modules[target] = self._find_module(target)
        component, name, module = found
        return component, name, module.weight  # looked up each time: `.to()` may swap the tensor

    def _find_module(self, target: str) -> tuple[str, str, nn.Module]:
        component = target.split(".", 1)[0]
        model = self.components.get(component)
        if model is None:
            raise PatchError(f"target {target}: this model has no {component}")
        path = module_path(model, target)
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise PatchError(f"target {target}: this model has no module '{path}'") from None
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise PatchError(f"target {target}: module '{path}' has no weight")
        return component, f"{path}.weight", module

    def _check(self, targets: list[str], desired: Mapping[str, Stages], layers: Sequence[PatchSet]) -> None:
        for target in targets:
            _, _, weight = self.parameter(target)
            for adapter, _strength in (pair for stage in desired.get(target, ()) for pair in stage):
                try:
                    adapter.check(weight.shape)
                except AdapterError as error:
                    entries = (e for layer in layers for e in layer)
                    name = next(e.lora.name for e in entries if adapter in e.lora.adapters.values())
                    raise PatchError(f"LoRA '{name}' does not fit {target}: {error}") from None

    def _write(self, target: str, stages: Stages, stats: PatchStats) -> None:
        component, name, weight = self.parameter(target)
        base = self._base_weight(target, component, name, weight, stats)
        if getattr(weight, "lora_loom_shared", False):
            weight = self._unshare(target, weight)  # `base` may still be the shared tensor: only read from
        try:
            self._compute_into(weight, base, stages)
        except BaseException as error:
            # The weight may be half written: put back what it held, from the remembered base.
            self._compute_into(
                weight, self._stored_base(target, component, name, weight), self._applied.get(target, ())
            )
            if isinstance(error, OverflowError):
                raise PatchError(f"{target}: {error}") from None
            raise
        if stages:
            self._applied[target] = stages
        else:
            self._applied.pop(target, None)

    def _unshare(self, target: str, weight: nn.Parameter) -> nn.Parameter:
        """Give the target's module a new, not yet written tensor in place of a shared one (whose other owner
        keeps it as it is); the caller fills it."""
        _, _, module = self._modules[target]
        own = nn.Parameter(torch.empty_like(weight), requires_grad=weight.requires_grad)
        module.weight = own
        return own

    @staticmethod
    def _compute_into(weight: torch.Tensor, base: torch.Tensor, stages: Stages) -> None:
        """weight ← base with each stage added and rounded in turn (`base` may be `weight` itself)."""
        if not stages:
            if base is not weight:
                with torch.no_grad():
                    weight.copy_(base)
            return
        for stage in stages[:-1]:
            base = patched_weight(base, stage)
        write_patched(weight, base, stages[-1])

    def _base_weight(
        self, target: str, component: str, name: str, weight: torch.Tensor, stats: PatchStats
    ) -> torch.Tensor:
        """W0 of `target` (the untouched base), in the live weight's dtype/device."""
        if target not in self._applied:
            # The live weight *is* the base right now: make sure it can be recovered later.
            self._remember(target, component, name, weight, stats)
            return weight
        return self._stored_base(target, component, name, weight)

    def _stored_base(self, target: str, component: str, name: str, weight: torch.Tensor) -> torch.Tensor:
        """W0 as remembered (re-read from the file, or the copy) — never the live weight."""
        if target in self._file_backed:
            return self.source.read(component, name, weight)
        return self._backups[target]

    def _remember(self, target: str, component: str, name: str, weight: torch.Tensor, stats: PatchStats) -> None:
        if target in self._file_backed or target in self._backups:
            return
        if self.source is not None:
            from_file = self.source.read(component, name, weight)
            if from_file is not None and _same_sample(from_file, weight):
                self._file_backed.add(target)
                return
            if from_file is not None:
                stats.notes.append(f"{target}: differs from {self.source.path}; keeping a copy instead")
        self._backups[target] = weight.detach().clone()


def _same_sample(a: torch.Tensor, b: torch.Tensor, samples: int = 32) -> bool:
    """Bitwise equality at `samples` evenly spaced elements (and the last): a cheap check that the
    live weight is still the file's. Any merge, fine-tune or dtype change rewrites essentially every
    element, and reading a few pages of the mapped file costs far less than reading all of it."""
    a, b = a.detach().reshape(-1), b.detach().reshape(-1)
    if a.shape != b.shape:
        return False
    stride = max(1, a.numel() // samples)
    return torch.equal(a[::stride], b[::stride]) and torch.equal(a[-1:], b[-1:])
