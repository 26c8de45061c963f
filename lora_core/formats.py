"""LoRA files of every common SD1.5 flavour -> the canonical `LoRA`.

Understood: kohya / A1111 (`lora_unet_*`, `lora_te_*`, `lora_te1_*`, `lora_down`/`lora_up`/`alpha`,
Linear and conv incl. LoCon 3×3 and Tucker `lora_mid`, names after diffusers or LDM paths), diffusers
and PEFT (`lora_A`/`lora_B`, `lora.down`/`lora.up`, `lora_linear_layer`, `processor.to_q_lora`,
`text_encoder.…` with and without `text_model.`, `base_model.model.…`; alpha from safetensors
metadata or a PEFT `adapter_config.json`), and ComfyUI trainer output (`diffusion_model.<ldm path>`).
Missing alpha means alpha = rank.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .adapters import AdapterError, LoRAAdapter
from .lora import COMPONENTS, LoadReport, LoRA, component_of
from .targets import alias_table


class LoRAFormatError(ValueError):
    """The file is not a LoRA this package can apply to SD1.5 (the message names file and keys)."""


# (suffix, role, format family); matched longest first.
_SUFFIXES = [
    (".lora_up.weight", "up", "kohya"),
    (".lora_down.weight", "down", "kohya"),
    (".lora_mid.weight", "mid", "kohya"),
    (".alpha", "alpha", None),
    (".lora_B.default.weight", "up", "peft"),
    (".lora_A.default.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    (".lora_A.weight", "down", "peft"),
    (".lora_B", "up", "peft"),
    (".lora_A", "down", "peft"),
    (".lora_linear_layer.up.weight", "up", "diffusers"),
    (".lora_linear_layer.down.weight", "down", "diffusers"),
    ("_lora.up.weight", "up", "diffusers-attn-processor"),
    ("_lora.down.weight", "down", "diffusers-attn-processor"),
    (".lora.up.weight", "up", "diffusers"),
    (".lora.down.weight", "down", "diffusers"),
    (".dora_scale", "dora", None),
    (".lora_magnitude_vector.weight", "dora", None),
    (".lora_magnitude_vector", "dora", None),
]
_SUFFIXES.sort(key=lambda item: -len(item[0]))

_WEIGHT_FILES = (
    "pytorch_lora_weights.safetensors",
    "adapter_model.safetensors",
    "pytorch_lora_weights.bin",
    "adapter_model.bin",
)


def load_lora(path: str | os.PathLike, name: str | None = None) -> LoRA:
    """Read a LoRA file (or a diffusers/PEFT folder) into canonical form; raises LoRAFormatError."""
    path = Path(path)
    if path.is_dir():
        found = next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)
        if found is None:
            raise LoRAFormatError(f"{path}: folder holds none of {', '.join(_WEIGHT_FILES)}")
        path = found
    if not path.is_file():
        raise LoRAFormatError(f"{path}: no such LoRA file")
    state_dict, metadata = _read_tensors(path)
    config = path.with_name("adapter_config.json")
    if config.is_file():
        metadata = {**metadata, "peft_adapter_config": config.read_text()}
    return parse_lora(state_dict, metadata, name=name or path.stem, source=str(path))


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        data = torch.load(path, map_location="cpu", weights_only=True)  # safe unpickling only
    except Exception as error:  # corrupt, truncated, or not a tensor file at all
        raise LoRAFormatError(f"{path}: not a readable LoRA file ({type(error).__name__}: {error})") from None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise LoRAFormatError(f"{path}: holds a {type(data).__name__}, not a dict of tensors")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, {}


def parse_lora(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    name: str = "lora",
    source: str = "<memory>",
) -> LoRA:
    """Canonical LoRA from a state dict in any understood format (see module docstring)."""
    report = LoadReport(source=source)
    table = alias_table()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    group_alias: dict[str, str] = {}
    formats: set[str] = set()
    for key, tensor in state_dict.items():
        split = _split_suffix(key)
        target = table.get(split[0]) if split else None
        if target is None:
            _not_understood(report, key, split[0] if split else key)
            continue
        alias, role, family = split
        roles = groups.setdefault(target, {})
        if role in roles:
            raise LoRAFormatError(f"{source}: two tensors for {role} of {target} (second: {key})")
        roles[role] = tensor
        group_alias[target] = alias
        if family:
            formats.add(family)

    alphas = _MetadataAlphas(metadata or {})
    adapters = {}
    for target, roles in groups.items():
        if "dora" in roles:
            report.not_understood.setdefault("DoRA modules (not supported yet; skipped)", []).append(target)
            continue
        if "up" not in roles or "down" not in roles:
            missing = "up" if "up" not in roles else "down"
            raise LoRAFormatError(f"{source}: {target} has no {missing} matrix ({group_alias[target]})")
        for role, tensor in roles.items():
            if not torch.isfinite(tensor).all():
                raise LoRAFormatError(f"{source}: {group_alias[target]} {role} contains NaN or Inf")
        alpha = roles.get("alpha")
        alpha_value = float(alpha) if alpha is not None else alphas.alpha(target, group_alias[target])
        try:
            adapters[target] = LoRAAdapter(
                up=roles["up"],
                down=roles["down"],
                alpha=alpha_value,
                mid=roles.get("mid"),
                rank_scaling="sqrt" if alphas.rslora(target) else "linear",
            )
        except AdapterError as error:
            raise LoRAFormatError(f"{source}: {group_alias[target]}: {error}") from None

    if not adapters:
        hint = _architecture_hint(state_dict)
        raise LoRAFormatError(
            f"{source}: no tensor matches a Stable Diffusion 1.5 U-Net or text-encoder module{hint}.\n"
            + report.summary()
        )
    report.formats = sorted(formats)
    lora = LoRA(name=name, adapters=adapters, report=report)
    report.matched = {c: n for c, n in lora.components().items() if n}
    if alphas.used_metadata:
        report.notes.append("alpha taken from " + alphas.used_metadata)
    return lora


def _split_suffix(key: str) -> tuple[str, str, str | None] | None:
    for suffix, role, family in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role, family
    return None


def not_understood_group(stem: str) -> str:
    """The group a key the loader does not understand is reported under: its name up to the first index."""
    match = re.search(r"(?<=[._])\d+(?=[._]|$)", stem)  # the first block/layer index
    return stem[: match.start()] + "*…" if match else stem


def _not_understood(report: LoadReport, key: str, stem: str) -> None:
    report.not_understood.setdefault(not_understood_group(stem), []).append(key)


def _architecture_hint(state_dict: Mapping[str, torch.Tensor]) -> str:
    keys = " ".join(state_dict)
    if "lora_te2_" in keys or "text_encoder_2" in keys or "add_embedding" in keys:
        return " (it looks like an SDXL LoRA)"
    if "transformer_blocks" in keys and ("double_blocks" in keys or "joint" in keys or "single_blocks" in keys):
        return " (it looks like a LoRA for a transformer model such as SD3 or Flux)"
    return ""


class _MetadataAlphas:
    """Alpha (and rsLoRA) from diffusers' `lora_adapter_metadata` or a PEFT adapter_config.json."""

    def __init__(self, metadata: Mapping[str, str]) -> None:
        self.configs: dict[str, dict] = {}
        self.used_metadata = ""
        raw = metadata.get("lora_adapter_metadata")
        if raw:
            packed = json.loads(raw)
            for component in COMPONENTS:
                prefix = component + "."
                config = {k[len(prefix) :]: v for k, v in packed.items() if k.startswith(prefix)}
                if config:
                    self.configs[component] = config
            if not self.configs:
                self.configs = dict.fromkeys(COMPONENTS, packed)
            self.used_metadata = "safetensors metadata (lora_adapter_metadata)"
        elif metadata.get("peft_adapter_config"):
            self.configs = dict.fromkeys(COMPONENTS, json.loads(metadata["peft_adapter_config"]))
            self.used_metadata = "adapter_config.json"

    def alpha(self, target: str, alias: str) -> float | None:
        config = self.configs.get(component_of(target))
        if not config:
            return None
        module = alias.split("base_model.model.")[-1]
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return float(value)
        alpha = config.get("lora_alpha")
        return float(alpha) if alpha is not None else None

    def rslora(self, target: str) -> bool:
        return bool((self.configs.get(component_of(target)) or {}).get("use_rslora"))
