"""The mirror of `formats.load_lora`: a canonical `LoRA` written as a kohya-format SD1.5 file.

kohya's layout is the one every SD1.5 tool reads (A1111, Forge, ComfyUI, diffusers' `load_lora_weights`,
kohya itself): `<kohya name>.lora_down.weight` / `.lora_up.weight` (`.lora_mid.weight` for a LoCon Tucker
core) and `.alpha` as a 0-d float32 tensor, module names from `targets.kohya_name`, and string metadata as
kohya writes it (`ss_*`, `modelspec.*`, `sshs_*` hashes). Readers know no rsLoRA flag, so an α/√r adapter is
written with the equivalent α' = α·√r, which every reader turns into α'/r = α/√r.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..files import atomic_write
from .adapters import LoRAAdapter
from .lora import LoRA
from .targets import kohya_name

STYLES = ("kohya",)
# What kohya's sd-scripts writes for an SD1.5 LoRA whatever the training settings (see
# ../shared/notes/kohya-file-format.md); callers add the training-specific `ss_*` keys.
_KOHYA_METADATA = {
    "ss_network_module": "networks.lora",
    "ss_base_model_version": "sd_v1",
    "ss_v2": "False",
    "modelspec.sai_model_spec": "1.0.1",
    "modelspec.architecture": "stable-diffusion-v1/lora",
    "modelspec.implementation": "diffusers",
    "modelspec.prediction_type": "epsilon",
}


def kohya_alpha(adapter: LoRAAdapter) -> float:
    """The alpha a kohya reader needs to get this adapter's scale as alpha / rank."""
    return adapter.scale * adapter.rank


def kohya_state_dict(lora: LoRA, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a kohya file; factors in `dtype` (default: as stored), alphas always float32."""
    tensors: dict[str, torch.Tensor] = {}
    for target in sorted(lora.adapters):
        adapter = lora.adapters[target]
        if not isinstance(adapter, LoRAAdapter):
            raise TypeError(f"{target}: a {adapter.kind} adapter has no kohya LoRA form")
        name = kohya_name(target)
        factors = {"lora_up": adapter.up, "lora_down": adapter.down, "lora_mid": adapter.mid}
        for role, tensor in factors.items():
            if tensor is not None:
                tensor = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
                tensors[f"{name}.{role}.weight"] = tensor
        tensors[f"{name}.alpha"] = torch.tensor(kohya_alpha(adapter), dtype=torch.float32)
    return tensors


def network_metadata(lora: LoRA) -> dict[str, str]:
    """`ss_network_dim` / `ss_network_alpha`: the rank and alpha when all modules share them (as kohya's
    files do), else "Dynamic" (what kohya's resize script writes for mixed ranks)."""
    ranks = {adapter.rank for adapter in lora.adapters.values()}
    alphas = {kohya_alpha(adapter) for adapter in lora.adapters.values()}
    return {
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": _number(alphas.pop()) if len(alphas) == 1 else "Dynamic",
    }


def tensor_data_hash(serialized: bytes) -> str:
    """kohya's / A1111's `sshs_model_hash`: sha256 of a safetensors file's bytes after its header."""
    header_length = int.from_bytes(serialized[:8], "little")
    return hashlib.sha256(serialized[8 + header_length :]).hexdigest()


LEGACY_HASH_OFFSET, LEGACY_HASH_LENGTH = 0x100000, 0x10000


def legacy_hash_of_span(span: bytes) -> str:
    """The legacy hash of the bytes it covers (``LEGACY_HASH_LENGTH`` at ``LEGACY_HASH_OFFSET``, or fewer)."""
    return hashlib.sha256(span).hexdigest()[:8]


def legacy_hash(serialized: bytes) -> str:
    """kohya's `sshs_legacy_hash`: the first 8 hex digits of sha256 of the 0x10000 bytes at 0x100000."""
    return legacy_hash_of_span(serialized[LEGACY_HASH_OFFSET : LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH])


def canonical_header(serialized: bytes) -> bytes:
    """The same safetensors file with its metadata in sorted key order. safetensors keeps metadata in a Rust
    hash map, so the order it writes varies from call to call; sorted, the same LoRA gives the same bytes."""
    length = int.from_bytes(serialized[:8], "little")
    header = json.loads(serialized[8 : 8 + length])
    metadata = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(metadata.items()))} if metadata else {}) | header
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text + serialized[8 + length :]


def save_lora(
    lora: LoRA,
    path: str | os.PathLike,
    *,
    style: str = "kohya",
    metadata: Mapping[str, object] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `lora` as a kohya-format .safetensors file (atomically); returns the path.

    `metadata` values are stored as kohya does: `str(value)` (JSON ones such as `ss_tag_frequency` must
    come already encoded). The file's own keys (`ss_network_*`, `modelspec.*`, `sshs_*`) are filled in.
    """
    from safetensors.torch import save

    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, not {style!r}")
    tensors = kohya_state_dict(lora, dtype)
    ss_metadata = {**{k: str(v) for k, v in (metadata or {}).items()}, **network_metadata(lora)}
    ss_metadata = {"ss_output_name": lora.name, **ss_metadata}
    full = {"modelspec.title": lora.name, **_KOHYA_METADATA, **ss_metadata}
    # kohya's hashes: the data hash does not depend on the header; the legacy one is taken from the file
    # as serialized with only the ss_* metadata.
    only_ss = {k: v for k, v in full.items() if k.startswith("ss_")}
    with_ss_only = canonical_header(save(tensors, metadata=only_ss))
    full["sshs_model_hash"] = tensor_data_hash(with_ss_only)
    full["sshs_legacy_hash"] = legacy_hash(with_ss_only)
    payload = canonical_header(save(tensors, metadata=full))
    return atomic_write(path, lambda temporary: temporary.write_bytes(payload))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
